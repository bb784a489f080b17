"""Heat maps, the pointing game and zero-shot segmentation against naive references: Grad-CAM against a
hand-written forward and a per-token sum for lipkit's ViT and a timm CNN, similarity / FILIP / context maps
against per-token loops, the split's metrics against a per-row, per-box loop; masks read as the model sees
its image."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import TINY_MODEL
from lipkit.data.records import Record
from lipkit.data.regions import mask_labels
from lipkit.errors import UserError
from lipkit.eval import heatmaps
from lipkit.eval.localization import THRESHOLD, segment
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.presets import get_spec


def vit_model(size: int = 32) -> DualEncoder:
    torch.manual_seed(0)
    return DualEncoder(get_spec("tiny", **{**TINY_MODEL, "image_size": size}, vocab_size=64)).eval()


def naive_vit_cam(model: DualEncoder, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Grad-CAM over the patch tokens entering the last block, the ViT's forward written out."""
    v = model.visual
    x = v.conv1(image).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(1, 1, -1), x], dim=1) + v.positional_embedding
    x = v.ln_pre(x)
    for block in v.transformer.resblocks[:-1]:
        x = block(x)
    x = x.detach().requires_grad_(True)
    pooled = v.ln_post(v.transformer.resblocks[-1](x))[:, 0] @ v.proj
    (grad,) = torch.autograd.grad(F.normalize(pooled, dim=-1)[0] @ text, x)
    acts, grad = x[0, 1:].detach(), grad[0, 1:]
    alpha = [grad[:, c].mean() for c in range(acts.shape[1])]
    cam = [
        max(0.0, float(sum(acts[n, c] * alpha[c] for c in range(acts.shape[1])))) for n in range(len(acts))
    ]
    side = int(len(cam) ** 0.5)
    return torch.tensor(cam).reshape(side, side)


def test_gradcam_of_the_vit_matches_a_hand_written_forward():
    model = vit_model()
    images = torch.randn(2, 3, 32, 32)
    texts = F.normalize(torch.randn(2, 3, model.spec.embed_dim), dim=-1)
    maps = heatmaps.gradcam_maps(model, images, texts)
    assert maps.shape == (2, 3, 4, 4)
    for b in range(2):
        for k in range(3):
            ref = naive_vit_cam(model, images[b : b + 1], texts[b, k])
            assert torch.allclose(maps[b, k], ref, atol=1e-5), (b, k)
    assert all(p.grad is None for p in model.parameters())
    assert maps.amax() > 0


def test_gradcam_of_a_timm_cnn_weights_its_last_feature_map():
    pytest.importorskip("timm")
    spec = get_spec(
        "tiny", vision_tower="timm", timm_model_name="test_efficientnet", image_size=64, embed_dim=32
    )
    model = DualEncoder(spec).eval()
    images = torch.randn(1, 3, 64, 64)
    text = F.normalize(torch.randn(1, 2, 32), dim=-1)
    maps = heatmaps.gradcam_maps(model, images, text)
    v = model.visual
    for k in range(2):
        grid = v.trunk.forward_features(images).detach().requires_grad_(True)  # (1, C, h, w)
        pooled = v.head(v.trunk.forward_head(grid, pre_logits=True))
        (grad,) = torch.autograd.grad(F.normalize(pooled, dim=-1)[0] @ text[0, k], grid)
        alpha = grad[0].mean((1, 2))
        ref = F.relu((grid[0].detach() * alpha[:, None, None]).sum(0))
        assert torch.allclose(maps[0, k], ref, atol=1e-5)


def test_similarity_filip_and_context_maps_match_per_token_loops():
    torch.manual_seed(1)
    tokens = F.normalize(torch.randn(2, 9, 6), dim=-1)
    text = F.normalize(torch.randn(2, 2, 6), dim=-1)
    words = F.normalize(torch.randn(2, 2, 4, 6), dim=-1)
    real = torch.tensor([[[1, 1, 0, 0], [1, 1, 1, 1]], [[1, 0, 0, 0], [1, 1, 1, 0]]], dtype=torch.bool)
    sim = heatmaps.similarity_maps(tokens, text)
    fil = heatmaps.filip_maps(tokens, words, real)
    ctx = heatmaps.context_prompted(tokens, text, scale=7.0, gamma=1.0)
    for b in range(2):
        for k in range(2):
            for n in range(9):
                assert sim[b, k, n // 3, n % 3] == pytest.approx(float(tokens[b, n] @ text[b, k]), abs=1e-6)
                best = max(float(tokens[b, n] @ words[b, k, r]) for r in range(4) if real[b, k, r])
                assert fil[b, k, n // 3, n % 3] == pytest.approx(best, abs=1e-6)
            weights = torch.softmax(torch.stack([7.0 * text[b, k] @ tokens[b, n] for n in range(9)]), 0)
            moved = text[b, k] + sum(weights[n] * tokens[b, n] for n in range(9))
            assert torch.allclose(ctx[b, k], moved / moved.norm(), atol=1e-6)


def test_peak_points_and_segmentation_by_hand():
    maps = torch.zeros(2, 2, 2)
    maps[0, 0, 1] = 1.0  # row 0, column 1
    maps[1, 1, 0] = 3.0
    assert heatmaps.peak_points(maps).tolist() == [[0.75, 0.25], [0.25, 0.75]]
    flat = torch.zeros(1, 2, 2)
    assert heatmaps.peak_points(flat).tolist() == [[0.25, 0.25]]  # ties: the first token
    labels = segment(maps, 2)  # at the grid's own size the upsampling is the identity
    assert labels.tolist() == [[0, 1], [2, 0]]
    one = torch.tensor([[[0.0, 2.0], [2 * THRESHOLD, 2 * THRESHOLD - 0.01]]])  # min–max normalised: ÷ 2
    assert segment(one, 2).tolist() == [[0, 1], [1, 0]]


def test_masks_are_read_as_the_model_sees_the_image(tmp_path):
    labels = Image.new("L", (40, 20), 0)
    labels.paste(1, (10, 0, 20, 20))
    labels.paste(2, (20, 0, 30, 20))
    labels.save(tmp_path / "m.png")
    got = mask_labels(Record(tmp_path / "x.png", [], {"mask": str(tmp_path / "m.png")}, key="x"), 10)
    assert got.shape == (10, 10) and set(got.unique().tolist()) == {1, 2}  # the centre crop keeps 1 and 2
    assert got[:, :5].eq(1).all() and got[:, 5:].eq(2).all()
    with pytest.raises(UserError, match="names the mask .*cannot be read"):
        mask_labels(Record(tmp_path / "x.png", [], {"mask": str(tmp_path / "no.png")}, key="x"), 10)


def test_a_table_finds_its_masks_beside_it(canvas_table):
    from lipkit.data.sources.registry import read_table

    row = json.loads((canvas_table.parent / "test.jsonl").read_text().splitlines()[0])
    record = read_table(canvas_table.parent / "test.jsonl")[0]
    assert record.meta["mask"] == str(canvas_table.parent / row["mask"])


def naive_localization(model, tok, records, size):
    """Pointing hits per kind, box areas and IoU sums per caption, one row and one box at a time."""
    from lipkit.data.image_store import ImageStore
    from lipkit.data.transforms import normalize

    store = ImageStore(records, size, cache=True)
    hits, areas = {"similarity": [], "gradcam": []}, []
    inter, union, base_i, base_u, ctx_i, ctx_u = {}, {}, {}, {}, {}, {}
    for i, r in enumerate(records):
        x = normalize(store.get([i]), model.spec.image_mean, model.spec.image_std)
        tokens = F.normalize(model.visual(x, return_tokens=True)[1][0], dim=-1)
        caps, boxes = r.meta["object_captions"], r.meta["boxes"]
        with torch.no_grad():
            text = torch.cat([model.encode_text(tok([c])) for c in caps])
        sims = torch.stack([torch.stack([tokens[n] @ t for n in range(len(tokens))]) for t in text]).detach()
        moved = []
        for t in text:  # DenseCLIP-style context prompting, γ = 1, the model's own temperature
            w = torch.softmax(torch.stack([float(model.scale().detach()) * (t @ v) for v in tokens]), 0)
            m = t + sum(w[n] * tokens[n] for n in range(len(tokens)))
            moved.append(m / m.norm())
        ctx = torch.stack([torch.stack([v @ t for v in tokens]) for t in moved]).detach()
        side = int(len(tokens) ** 0.5)
        cams = heatmaps.gradcam_maps(model, x, text[None])[0].flatten(1)
        for kind, m in (("similarity", sims), ("gradcam", cams)):
            for k, (x0, y0, x1, y1) in enumerate(boxes):
                n = int(m[k].argmax())
                px, py = (n % side + 0.5) / side, (n // side + 0.5) / side
                flat = bool(m[k].max() == m[k].min())  # a flat map points nowhere
                hits[kind].append(not flat and x0 <= px <= x1 and y0 <= py <= y1)
        areas += [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
        truth = mask_labels(r, size)
        pred, pred_ctx = (
            segment(sims.reshape(-1, side, side), size),
            segment(ctx.reshape(-1, side, side), size),
        )
        names = [" ".join(c.split()).casefold() for c in caps]
        for name in set(names):  # boxes of one image with one caption are one class
            ks = [k + 1 for k, n in enumerate(names) if n == name]
            t = sum(truth == k for k in ks).bool()
            for (i_, u_), pr in (((inter, union), pred), ((ctx_i, ctx_u), pred_ctx)):
                p = sum(pr == k for k in ks).bool()
                i_[name] = i_.get(name, 0) + int((p & t).sum())
                u_[name] = u_.get(name, 0) + int((p | t).sum())
            base_i[name] = base_i.get(name, 0) + int(t.sum())
            base_u[name] = base_u.get(name, 0) + size * size
    miou = sum(inter[n] / max(union[n], 1) for n in union) / len(union)
    ctx_miou = sum(ctx_i[n] / max(ctx_u[n], 1) for n in ctx_u) / len(ctx_u)
    base = sum(base_i[n] / base_u[n] for n in base_u) / len(base_u)
    return hits, areas, miou, ctx_miou, base


def test_pointing_and_segmentation_metrics_match_a_per_row_loop(canvas_table, tmp_path):
    from lipkit.config import EvalConfig
    from lipkit.data.sources.registry import read_table
    from lipkit.eval.evaluate import evaluate_records
    from lipkit.text.tokenizer import TextTokenizer

    records = read_table(canvas_table.parent / "test.jsonl")
    tok = TextTokenizer.train(
        [c for r in records for c in r.meta["object_captions"]], vocab_size=300, context_length=16
    )
    torch.manual_seed(0)
    spec = get_spec(
        "tiny",
        **{**TINY_MODEL, "image_size": 64},
        vocab_size=tok.vocab_size,
        eot_id=tok.eot_id,
        context_length=16,
    )
    model = DualEncoder(spec).eval()
    got = evaluate_records(model, tok, records, EvalConfig(class_columns=[], batch_size=3), details=True)
    m, chance = got["metrics"], got["chance"]
    hits, areas, miou, ctx_miou, base = naive_localization(model, tok, records, 64)
    for kind, h in hits.items():
        assert m[f"localization/pointing/{kind}"] == pytest.approx(sum(h) / len(h)), kind
        assert chance[f"localization/pointing/{kind}"] == pytest.approx(sum(areas) / len(areas))
    assert m["localization/segmentation/mIoU"] == pytest.approx(miou, abs=1e-9)
    assert chance["localization/segmentation/mIoU"] == pytest.approx(base, abs=1e-9)
    assert m["localization/segmentation/context_mIoU"] == pytest.approx(ctx_miou, abs=1e-9)
    drawn = got["localization"]
    assert 1 <= len(drawn) <= 4 and {"image", "captions", "boxes", "maps"} <= set(drawn[0])
    assert len(drawn[0]["maps"]["gradcam"]) == len(drawn[0]["captions"])
    from lipkit.eval.report import write_report

    page = write_report(tmp_path, {"splits": {"canvases": got}}).read_text()
    assert "Heat maps" in page and (tmp_path / "report" / "localization_canvases.png").stat().st_size > 1000


def test_a_tower_without_a_token_grid_skips_the_region_metrics(canvas_table):
    """MobileNetV3 pools through a layer of its own (timm's head_hidden_size): its tokens are not in the
    projection's space, so a split with boxes is scored on the whole images only, without an error."""
    pytest.importorskip("timm")
    from lipkit.config import EvalConfig
    from lipkit.data.sources.registry import read_table
    from lipkit.eval.evaluate import evaluate_records
    from lipkit.text.tokenizer import TextTokenizer

    records = read_table(canvas_table.parent / "test.jsonl")
    tok = TextTokenizer.train([c for r in records for c in r.captions], vocab_size=300, context_length=16)
    spec = get_spec(
        "tiny",
        **{**TINY_MODEL, "image_size": 64},
        vision_tower="timm",
        timm_model_name="mobilenetv3_small_050",
        vocab_size=tok.vocab_size,
        eot_id=tok.eot_id,
        context_length=16,
    )
    model = DualEncoder(spec).eval()
    assert not model.visual.has_token_grid
    got = evaluate_records(model, tok, records, EvalConfig(class_columns=[], batch_size=4), details=False)
    assert "retrieval/text_to_image/R@1" in got["metrics"]
    assert not [k for k in got["metrics"] if k.startswith(("regions/", "localization/"))]
