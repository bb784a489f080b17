"""Datasets lipkit builds itself from data it already has (`lipkit data build NAME`): `noisy`, a copy of
any captions table with mispaired captions and duplicate images injected and the ground truth kept apart
(the benchmark of `lipkit data dedup | score | filter`)."""
