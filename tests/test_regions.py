"""Region features and CLOC's region–text contrast against naive references: RoI pooling against a
per-point bilinear loop and against crop-and-pool of the upsampled token grid; the region loss against a
per-region loop, values and gradients; the region table's lookup and refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_MODEL
from lipkit.data.records import Record
from lipkit.errors import UserError
from lipkit.eval.regions import crops
from lipkit.models.regions import BINS, SAMPLES, as_rois, region_pool
from lipkit.objectives import build_objective
from lipkit.objectives.cloc import region_contrast
from lipkit.objectives.infonce import InfoNCE
from lipkit.train.inputs import sample_ids
from lipkit.train.regions import RegionTable


def bilinear(grid: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """grid (D, h, w) read at (y, x) in token units (token centres at integers), clamped at the border."""
    h, w = grid.shape[1:]
    y, x = min(max(y, 0.0), h - 1.0), min(max(x, 0.0), w - 1.0)
    y0, x0 = math.floor(y), math.floor(x)
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    ly, lx = y - y0, x - x0
    return (
        grid[:, y0, x0] * (1 - ly) * (1 - lx)
        + grid[:, y0, x1] * (1 - ly) * lx
        + grid[:, y1, x0] * ly * (1 - lx)
        + grid[:, y1, x1] * ly * lx
    )


def naive_region(grid: torch.Tensor, box: list[float]) -> torch.Tensor:
    """The mean of BINS² bins of SAMPLES² points spread evenly over the box (pixel units → token units)."""
    side = grid.shape[1]
    x0, y0, x1, y1 = (v * side - 0.5 for v in box)
    bw, bh = (x1 - x0) / BINS, (y1 - y0) / BINS
    points = [
        bilinear(grid, y0 + (by + (sy + 0.5) / SAMPLES) * bh, x0 + (bx + (sx + 0.5) / SAMPLES) * bw)
        for by in range(BINS)
        for bx in range(BINS)
        for sy in range(SAMPLES)
        for sx in range(SAMPLES)
    ]
    return torch.stack(points).mean(0)


BOXES = [[[0.0, 0.0, 1.0, 1.0], [0.1, 0.2, 0.45, 0.9]], [[0.5, 0.5, 0.75, 0.8], [0.03, 0.6, 0.97, 0.99]]]


def test_region_pool_matches_a_per_point_loop_and_its_gradient_checks():
    torch.manual_seed(0)
    tokens = torch.randn(2, 16, 5, dtype=torch.float64, requires_grad=True)  # 4 × 4 grid
    rois = as_rois(BOXES).double()
    got = region_pool(tokens, rois)
    grids = tokens.detach().transpose(1, 2).reshape(2, 5, 4, 4)
    want = torch.stack([naive_region(grids[i], b) for i, per in enumerate(BOXES) for b in per])
    assert torch.allclose(got, want, atol=1e-10)
    assert torch.autograd.gradcheck(lambda t: region_pool(t, rois), (tokens,))


def test_region_pool_approximates_crop_and_pool_of_the_upsampled_grid():
    torch.manual_seed(1)
    tokens = torch.randn(2, 64, 3, dtype=torch.float64)  # 8 × 8 grid, 32 px per token at 256 px
    grids = tokens.transpose(1, 2).reshape(2, 3, 8, 8)
    pixels = F.interpolate(grids, size=(256, 256), mode="bilinear", align_corners=False)
    got = region_pool(tokens, as_rois(BOXES).double())
    for n, (i, box) in enumerate((i, b) for i, per in enumerate(BOXES) for b in per):
        x0, y0, x1, y1 = (round(v * 256) for v in box)
        crop = pixels[i, :, y0:y1, x0:x1].mean(dim=(1, 2))  # naive: crop the box's pixels, average
        assert torch.allclose(got[n], crop, atol=0.05), (box, got[n], crop)


def naive_region_loss(r: torch.Tensor, y: torch.Tensor, keys: list[int], scale: float) -> torch.Tensor:
    m, total = len(keys), 0.0
    for a in range(m):
        for x, z in ((r, y), (y, r)):  # region → captions, caption → regions
            others = [b for b in range(m) if b == a or keys[b] != keys[a]]
            logits = torch.stack([scale * (x[a] @ z[b]) for b in others])
            total = total - (logits[others.index(a)] - torch.logsumexp(logits, 0))
    return total / (2 * m)


def test_region_contrast_matches_a_per_region_loop_values_and_gradients():
    torch.manual_seed(2)
    r = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=-1).requires_grad_()
    keys = [3, 7, 3, 1, 9, 7]  # two pairs of equal captions
    scale = torch.tensor(10.0, dtype=torch.float64)
    got = region_contrast(r, y, torch.tensor(keys), scale)
    want = naive_region_loss(r, y, keys, 10.0)
    assert torch.allclose(got, want, atol=1e-10)
    g1 = torch.autograd.grad(got, (r, y))
    g2 = torch.autograd.grad(want, (r, y))
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(g1, g2, strict=True))


def test_objective_is_infonce_without_regions_weight_and_masks_padding():
    torch.manual_seed(3)
    img, txt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(5.0)
    plain = build_objective("cloc", region_weight=0)
    assert plain.inputs == ("image_features", "text_features", "logit_scale")
    assert torch.allclose(plain(img, txt, scale), InfoNCE()(img, txt, scale))
    obj = build_objective("cloc", region_weight=0.5)
    reg = F.normalize(torch.randn(4, 3, 8), dim=-1)
    rtx = F.normalize(torch.randn(4, 3, 8), dim=-1)
    valid = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    keys = torch.arange(12).reshape(4, 3)
    got = obj(img, txt, scale, reg, rtx * valid[..., None], valid, keys)
    want = InfoNCE()(img, txt, scale) + 0.5 * region_contrast(reg[valid], rtx[valid], keys[valid], scale)
    assert torch.allclose(got, want)
    with pytest.raises(UserError, match="region_weight"):
        build_objective("cloc", region_weight=-1)


class Tok:
    context_length, pad_id = 4, 0

    def __call__(self, texts):
        return torch.tensor([[len(t), ord(t[0]), 0, 0] for t in texts])


def test_region_table_looks_up_by_key_and_refuses_bad_rows():
    recs = [
        Record(
            "a.png",
            ["x"],
            {"boxes": [[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]], "object_captions": ["cat", "dog"]},
            "a",
        ),
        Record("b.png", ["y"], {"boxes": [[0.1, 0.1, 0.2, 0.3]], "object_captions": ["bird"]}, "b"),
        Record("c.png", ["z"], {}, "c"),
    ]
    table = RegionTable.from_records(recs, "boxes", "object_captions", Tok(), "t")
    boxes, ids, valid = table.lookup(sample_ids(["b", "zzz", "a", "c"]))
    assert valid.tolist() == [[True, False], [False, False], [True, True], [False, False]]
    assert boxes[0, 0].tolist() == pytest.approx([0.1, 0.1, 0.2, 0.3]) and boxes[2, 1].tolist() == [
        0.5,
        0.5,
        1,
        1,
    ]
    assert ids[2, 1].tolist() == [3, ord("d"), 0, 0] and table.regions == 3
    bad = Record("d.png", ["w"], {"boxes": [[0.5, 0, 0.2, 1]], "object_captions": ["cat"]}, "d")
    with pytest.raises(UserError, match="x0 < x1"):
        RegionTable.from_records([bad], "boxes", "object_captions", Tok(), "t")
    short = Record("e.png", ["w"], {"boxes": [[0, 0, 1, 1]], "object_captions": []}, "e")
    with pytest.raises(UserError, match="equal length"):
        RegionTable.from_records([short], "boxes", "object_captions", Tok(), "t")
    with pytest.raises(UserError, match="No row"):
        RegionTable.from_records(recs[2:], "boxes", "object_captions", Tok(), "t")


def region_cfg(table, out, **augment):
    from conftest import tiny_run_cfg

    return tiny_run_cfg(table, out, "cloc", augment={"scale_min": 1.0, "rotate_deg": 0, **augment})


def test_cloc_trains_on_canvases_and_the_checkpoint_embeds_regions(canvas_table, tmp_path):
    import json

    from lipkit.checkpoint import load_checkpoint
    from lipkit.train.launch import run_training

    _, result = run_training(region_cfg(canvas_table, tmp_path / "run"))
    assert result.steps == 6 and math.isfinite(result.last_loss) and result.faults == 0
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(math.isfinite(r.get("region_loss", math.nan)) for r in logged)
    model = load_checkpoint(tmp_path / "run" / "checkpoint")[0]
    size = model.spec.image_size
    images = torch.rand(2, 3, size, size)
    with torch.no_grad():
        got = model.encode_region(images, [[[0, 0, 0.5, 0.5]], [[0.2, 0.2, 1, 1], [0, 0, 1, 1]]])
        _, tokens = model.visual(images, return_tokens=True)
        rois = torch.tensor([[1, 0.2, 0.2, 1, 1]])
        assert torch.allclose(got[1], F.normalize(region_pool(tokens, rois), dim=-1)[0], atol=1e-6)
    assert got.shape == (3, model.spec.embed_dim)


def test_cloc_refuses_geometric_augmentation_and_tables_without_boxes(canvas_table, table, tmp_path):
    from lipkit.train.launch import run_training

    with pytest.raises(UserError, match="augment.scale_min=1"):
        run_training(region_cfg(canvas_table, tmp_path / "a", scale_min=0.6))
    with pytest.raises(UserError, match="No row"):
        run_training(region_cfg(table, tmp_path / "b"))


def test_region_retrieval_metrics_match_a_per_region_loop(canvas_table, tmp_path):
    from lipkit.checkpoint import load_checkpoint
    from lipkit.config import EvalConfig
    from lipkit.data.image_store import ImageStore
    from lipkit.data.sources.registry import read_table
    from lipkit.data.transforms import normalize
    from lipkit.eval.evaluate import evaluate_records
    from lipkit.eval.regions import crops
    from lipkit.train.launch import run_training

    run_training(region_cfg(canvas_table, tmp_path / "run"))
    model, tok, _ = load_checkpoint(tmp_path / "run" / "checkpoint")
    records = read_table(canvas_table.parent / "test.jsonl")
    cfg = EvalConfig(class_columns=["subcategory"], batch_size=3)  # list-valued: multi-label mAP
    got = evaluate_records(model, tok, records, cfg, details=False)
    m, chance = got["metrics"], got["chance"]
    assert [k for k in m if k.startswith("zeroshot/")] == ["zeroshot/subcategory/mAP"]
    assert 0 < chance["zeroshot/subcategory/mAP"] < m["zeroshot/subcategory/mAP"] + 1
    store = ImageStore(records, model.spec.image_size, cache=True)
    first: dict[str, str] = {}  # folded name → its first spelling, which the text tower reads
    for c in (c for r in records for c in r.meta["object_captions"]):
        first.setdefault(" ".join(c.split()).casefold(), c)
    names = sorted(first)
    with torch.no_grad():
        text = torch.cat([model.encode_text(tok([first[n]])) for n in names])
        hits = {"region_to_text": [], "crop_to_text": []}
        for i, r in enumerate(records):
            image = store.get([i])
            x = normalize(image, model.spec.image_mean, model.spec.image_std)
            for box, cap in zip(r.meta["boxes"], r.meta["object_captions"], strict=True):
                own = names.index(" ".join(cap.split()).casefold())
                region = model.encode_region(x, [[box]])[0]
                crop = model.embed_images_u8(crops(image, torch.tensor([[0.0, *box]])))[0]
                for kind, e in (("region_to_text", region), ("crop_to_text", crop)):
                    sims = (text @ e).tolist()
                    hits[kind].append(max(range(len(names)), key=lambda j: (sims[j], -j)) == own)
    for kind, h in hits.items():
        assert m[f"regions/{kind}/R@1"] == pytest.approx(sum(h) / len(h), abs=1e-6), kind
        assert chance[f"regions/{kind}/R@1"] == pytest.approx(1 / len(names))


def test_crops_cut_the_box_and_fill_the_side():
    image = torch.zeros(1, 3, 8, 8, dtype=torch.uint8)
    image[0, :, 2:6, 4:8] = 200  # a block: x 4–8, y 2–6
    out = crops(image, torch.tensor([[0.0, 0.5, 0.25, 1.0, 0.75]]))
    assert out.shape == (1, 3, 8, 8) and (out == 200).all()


def test_region_pool_reads_the_right_image_of_a_large_bf16_batch():
    value = (
        torch.arange(301, dtype=torch.float32) % 7
    )  # exact in bf16; images 300 and 256 differ from 299, 257
    tokens = value[:, None, None].expand(301, 4, 2).contiguous()
    rois = torch.tensor([[299, 0.0, 0.0, 1.0, 1.0], [257, 0.2, 0.2, 0.6, 0.7]])
    got = region_pool(tokens.bfloat16(), rois)
    assert got.dtype == torch.bfloat16 and got.float()[:, 0].tolist() == [299 % 7, 257 % 7]


def test_evaluation_refuses_boxes_without_their_captions(canvas_table, tmp_path):
    from lipkit.config import EvalConfig
    from lipkit.data.sources.registry import read_table
    from lipkit.eval.evaluate import evaluate_records
    from lipkit.models.dual_encoder import DualEncoder
    from lipkit.models.presets import get_spec

    records = read_table(canvas_table.parent / "test.jsonl")[:2]
    records[1].meta.pop("object_captions")
    model = DualEncoder(
        get_spec(
            "tiny",
            **TINY_MODEL,
            vocab_size=256,
            context_length=4,
            eot_id=0,
        )
    )
    with pytest.raises(UserError, match="object_captions"):
        evaluate_records(model, Tok(), records, EvalConfig(class_columns=[]), details=False)
