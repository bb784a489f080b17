"""Data curation with a model (`lipkit data score | filter | dedup | cluster | reduce | associate`): it
embeds with `lipkit.search.embed` (reusing `lipkit embed`'s resumable output), so it sits above search;
each command is one module here and one thin CLI function in `lipkit.cli`."""
