"""Evaluation sets as the field keeps them: class folders and CLIP_benchmark's WebDataset eval shards
(written by `lipkit data export-eval`, read as source kinds), their own class lists and templates, and
`eval.protocol: clip_benchmark` (every caption a query relevant to its image only; OpenCLIP's decode)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch
from PIL import Image

from conftest import tiny_eval_setup
from lipkit.config import EvalConfig
from lipkit.data.eval_export import export_eval_set
from lipkit.data.images import load_image
from lipkit.data.label_sets import read_label_set
from lipkit.data.records import Record
from lipkit.data.sources.registry import eval_labels, read_records, read_table, source_kind
from lipkit.errors import UserError
from lipkit.eval.evaluate import evaluate_records

CFG = EvalConfig(class_columns=["subcategory"], batch_size=8)


@pytest.fixture(scope="module")
def setup(table):
    records, tok, model = tiny_eval_setup(table, n=24)
    return records, tok, model


@pytest.fixture(scope="module")
def sets(table, tmp_path_factory, setup):
    """The 24 records as a JSONL table and as the three exported sets."""
    records = setup[0]
    root = tmp_path_factory.mktemp("eval-sets")
    src = root / "rows.jsonl"
    with src.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({"image": str(r.image), "captions": r.captions, **r.meta}) + "\n")
    export_eval_set(src, root / "folders", "class-folders", "subcategory", ["{}", "an emoji of {}."])
    export_eval_set(
        src, root / "cls", "clip-benchmark", "subcategory", ["{}", "an emoji of {}."], shard_size=10
    )
    export_eval_set(src, root / "ret", "clip-benchmark", shard_size=10)
    return src, root


def test_kinds_are_detected_and_read_back(sets):
    src, root = sets
    assert source_kind(root / "folders").name == "class_folders"
    assert source_kind(root / "cls").name == "benchmark_shards"
    assert source_kind(root / "cls" / "test").name == "benchmark_shards"  # a split folder
    assert source_kind(root / "ret").name == "benchmark_shards"
    rows = read_table(src)
    for name in ("folders", "cls"):
        got, skipped = read_records(root / name)
        assert not skipped and len(got) == len(rows)
        assert sorted(r.meta["class"] for r in got) == sorted(r.meta["subcategory"] for r in rows)
        assert all(r.captions == [] for r in got)
        labels = eval_labels(root / name)["class"]
        assert labels.classes == sorted({r.meta["subcategory"] for r in rows})
        assert labels.templates in (["{}", "an emoji of {}."], ["{c}", "an emoji of {c}."])
    got, _ = read_records(root / "ret")
    assert [r.captions for r in got] == [r.captions for r in rows]  # every caption, one per line
    assert eval_labels(root / "ret") == {} and eval_labels(src) == {}
    # the same pixels as the original files (PNG, transparency put on white when written)
    first = next(r for r in got if r.key == "s0000000")
    assert torch.equal(load_image(first.data, 32), load_image(rows[0].image, 32))


def test_class_sets_evaluate_like_the_table_they_came_from(sets, setup):
    src, root = sets
    _, tok, model = setup
    cfg = EvalConfig(class_columns=["subcategory"], templates=["{}", "an emoji of {}."], batch_size=8)
    want = evaluate_records(model, tok, read_table(src), cfg, details=False)["metrics"]
    for name in ("folders", "cls"):
        records, _ = read_records(root / name)
        got = evaluate_records(
            model, tok, records, EvalConfig(batch_size=8), details=False, labels=eval_labels(root / name)
        )
        for k in ("top1", "top5", "mean_recall"):
            assert got["metrics"][f"zeroshot/class/{k}"] == pytest.approx(
                want[f"zeroshot/subcategory/{k}"], abs=1e-9
            )
        assert not any(k.startswith("retrieval/") for k in got["metrics"])  # no captions: no retrieval
    records, _ = read_records(root / "ret")
    got = evaluate_records(model, tok, records, cfg, details=False)["metrics"]
    assert {k: v for k, v in got.items() if k.startswith("retrieval/")} == pytest.approx(
        {k: v for k, v in want.items() if k.startswith("retrieval/")}
    )


def test_classes_without_images_still_compete(tmp_path, setup, sets):
    """A class listed but with no image changes the scores: it competes as CLIP_benchmark's do."""
    _, tok, model = setup
    _, root = sets
    labels = eval_labels(root / "folders")["class"]
    records, _ = read_records(root / "folders")
    from lipkit.data.label_sets import LabelSet

    bigger = LabelSet([*labels.classes, "zzz extra class"], labels.templates)
    cfg = EvalConfig(batch_size=8, class_columns=[])
    a = evaluate_records(model, tok, records, cfg, details=False, labels={"class": labels})
    b = evaluate_records(model, tok, records, cfg, details=False, labels={"class": bigger})
    assert a["chance"]["zeroshot/class/top1"] == pytest.approx(1 / len(labels.classes))
    assert b["chance"]["zeroshot/class/top1"] == pytest.approx(1 / (len(labels.classes) + 1))


def test_classnames_and_templates_files_and_their_errors(tmp_path):
    for c in ("b_dir", "a_dir"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / c / "x.png")
    assert read_label_set(tmp_path, ["a_dir", "b_dir"], "the set").classes == ["a_dir", "b_dir"]
    (tmp_path / "classnames.txt").write_text("apple\nbanana\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n{}\n")
    recs, _ = read_records(tmp_path)
    assert [(r.key, r.meta["class"]) for r in recs] == [("a_dir/x.png", "apple"), ("b_dir/x.png", "banana")]
    assert eval_labels(tmp_path)["class"].templates == ["a photo of a {c}.", "{}"]
    (tmp_path / "classnames.txt").write_text("apple\n")
    with pytest.raises(UserError, match="names 1 classes but .* has 2"):
        read_label_set(tmp_path, ["a_dir", "b_dir"], "the set")
    (tmp_path / "classnames.txt").write_text("apple\napple\n\n")  # names may repeat (ImageNet's do)
    recs, _ = read_records(tmp_path)
    assert [(r.meta["class"], r.meta["class_index"]) for r in recs] == [("apple", 0), ("apple", 1)]
    assert eval_labels(tmp_path)["class"].classes == ["apple", "apple"]
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a {shape} of {c}\n")
    with pytest.raises(UserError, match="Prompt template 'a {shape} of {c}'"):
        read_label_set(tmp_path, ["a_dir", "b_dir"], "the set")


def test_captioned_folders_stay_the_folder_kind(tmp_path):
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "sub" / "cat.png")
    (tmp_path / "sub" / "cat.txt").write_text("a cat")
    assert source_kind(tmp_path).name == "folder"
    Image.new("RGB", (8, 8)).save(tmp_path / "top.png")
    (tmp_path / "sub" / "cat.txt").unlink()
    assert source_kind(tmp_path).name == "folder"  # an image at the top: not a class folder


def _shard(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_benchmark_shards_errors(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    (tmp_path / "test").mkdir()
    _shard(tmp_path / "test" / "0.tar", {"a.png": png.getvalue(), "a.cls": b"3", "b.png": png.getvalue()})
    (tmp_path / "test" / "nshards.txt").write_text("1\n")
    with pytest.raises(UserError, match="has no classnames.txt"):
        read_records(tmp_path)
    (tmp_path / "classnames.txt").write_text("x\ny\n")
    with pytest.raises(UserError, match="has class 3 but classnames.txt names 2"):
        read_records(tmp_path)
    (tmp_path / "classnames.txt").write_text("x\ny\nz\nw\n")
    records, skipped = read_records(tmp_path)
    assert [r.meta["class"] for r in records] == ["w"] and skipped == {"no_label": 1}
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "nshards.txt").write_text("0\n")
    assert len(read_records(tmp_path)[0]) == 1  # two splits: the test split
    (tmp_path / "test" / "nshards.txt").rename(tmp_path / "test" / "n.txt")
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "nshards.txt").write_text("0\n")
    with pytest.raises(UserError, match="has the splits train, val; point at one of them"):
        read_records(tmp_path)
    (tmp_path / "dataset_type.txt").write_text("multilabel\n")
    with pytest.raises(UserError, match="multi-label sets are not supported"):
        read_records(tmp_path / "val")


def test_clip_benchmark_protocol_scores_every_caption_against_its_own_image(setup):
    """A naive loop: each caption is a query; a hit at K when its own image is in its top K; an image
    hits when any of its own captions is in its top K — duplicates across images are not relevant."""
    records, tok, model = setup
    records = [Record(r.image, r.captions, r.meta, r.key) for r in records[:10]]
    records[1].captions = [records[0].captions[0], *records[1].captions]  # a caption two images share
    cfg = EvalConfig(class_columns=[], batch_size=8, protocol="clip_benchmark")
    got = evaluate_records(model, tok, records, cfg, details=False)
    texts = [c for r in records for c in r.captions]
    owner = [i for i, r in enumerate(records) for _ in r.captions]
    from lipkit.data.image_store import ImageStore
    from lipkit.eval.evaluate import embed_images, embed_texts

    img = embed_images(model, ImageStore(records, 32, cache=True, style="open_clip"), 8)
    sims = embed_texts(model, tok, texts, 8) @ img.t()  # (T, N)

    def top(scores, k):  # ties (the shared caption's two copies) ranked by index, as recall_at_k does
        return scores.argsort(descending=True, stable=True)[:k].tolist()

    for k in (1, 5, 10):
        t2i = sum(owner[t] in top(sims[t], k) for t in range(len(texts))) / len(texts)
        i2t = sum(any(owner[t] == i for t in top(sims[:, i], k)) for i in range(len(records))) / len(records)
        assert got["metrics"][f"retrieval/text_to_image/R@{k}"] == pytest.approx(t2i)
        assert got["metrics"][f"retrieval/image_to_text/R@{k}"] == pytest.approx(i2t)
    assert got["n_texts"] == len(texts)


def test_open_clip_decode_style_is_what_clip_benchmark_feeds_open_clip(tmp_path):
    """CLIP_benchmark's loaders (torchvision's pil_loader, webdataset's "pil" decoder) convert to RGB,
    then OpenCLIP's evaluation transform resizes and crops."""
    open_clip = pytest.importorskip("open_clip")
    from open_clip.transform import image_transform

    g = torch.Generator().manual_seed(0)
    cases = {"wide.png": (3, 37, 61), "tall.jpg": (3, 70, 33), "square.png": (3, 20, 20)}
    for name, shape in cases.items():
        x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(x).save(tmp_path / name)
    rgba = torch.randint(0, 256, (45, 30, 4), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    Image.fromarray(rgba[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "p.png")
    for size in (24, 32):
        t = image_transform(size, is_train=False, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        for f in sorted(tmp_path.iterdir()):
            ref = (t(Image.open(f).convert("RGB")) * 255).round().to(torch.uint8)
            assert torch.equal(load_image(f, size, style="open_clip"), ref), (f.name, size)
    del open_clip


def test_max_images_spreads_over_a_class_sorted_split():
    """eval.max_images takes rows spread evenly over the split, so class folders sorted by name all appear."""
    from lipkit.eval.suite import spread_subset

    rows = [f"class{c}/{i}" for c in range(5) for i in range(20)]
    picked = spread_subset(rows, 10)
    assert len(picked) == 10 and {r.split("/")[0] for r in picked} == {f"class{c}" for c in range(5)}
    assert picked == sorted(picked, key=rows.index) and spread_subset(rows, 0) == rows == spread_subset(
        rows, 500
    )
