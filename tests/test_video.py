"""Clips and slice stacks: the `frames` column, its decode (image lists and PyAV videos), the motion-clip
benchmark, temporal heads (at initialisation T = 1 equals the image model; order and permutation), the
objectives made for clips, training, embedding, search and serving of clips."""

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL, tiny_run_cfg
from lipkit.data.frames import Frames, frame_indices, try_load_frames, with_frame_count
from lipkit.data.image_store import ImageStore
from lipkit.data.sources.registry import read_records
from lipkit.data.table_batches import TrainBatches
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.presets import get_spec
from lipkit.models.temporal import SlicePooling, TemporalTransformer, temporal_head_of


@pytest.fixture(scope="module")
def motion(table, tmp_path_factory) -> Path:
    """A small motion build (8 frames of 32 px; 12 training pairs, 3 test objects) from the fixture tables."""
    from lipkit.data.builtin.motion import MotionOptions, build_motion

    out = tmp_path_factory.mktemp("video") / "motion"
    opt = MotionOptions(frames=8, size=32, train_pairs=12, test_objects=3)
    build_motion(out, {"train": table, "test": table.parent / "test-style.jsonl"}, opt, progress=False)
    return out


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines()]


def test_motion_pairs_are_exact_time_reverses(motion):
    test = rows(motion / "test.jsonl")
    assert len(test) == 3 * 10  # every object with all five pairs, both directions
    by_key = {r["key"]: r for r in test}
    for r in test:
        if r["key"].endswith("-0"):
            other = by_key[r["key"][:-1] + "1"]
            assert other["frames"] == r["frames"][::-1]
            if r["pair"] != "morph":  # captions differ only in the motion
                assert r["label"] == other["label"] and r["captions"][0] != other["captions"][0]
                assert r["captions"][0].removeprefix(r["label"]) in (
                    " moving right",
                    " moving down",
                    " growing",
                    " turning counterclockwise",
                )
    assert Counter(r["motion"] for r in test)["moving left"] == 3
    # decoded, the reverse clip is the same tensor flipped in time
    recs, skipped = read_records(motion / "test.jsonl")
    assert not skipped and all(r.frames is not None for r in recs)
    a, _, _ = try_load_frames(recs[0].frames, recs[0].key, 32)
    b, _, _ = try_load_frames(recs[1].frames, recs[1].key, 32)
    assert a.shape == (8, 3, 32, 32) and torch.equal(a.flip(0), b) and not torch.equal(a, b)


def test_frame_sampling():
    assert frame_indices(8, 8, "uniform", "k") == list(range(8))
    assert frame_indices(16, 4, "uniform", "k") == [2, 6, 9, 13]  # nearest the segment centres 1.5, 5.5, ...
    assert frame_indices(2, 4, "uniform", "k") == [0, 0, 1, 1]
    for n in range(1, 40):  # symmetric: a list and its reverse decode to exactly reversed frames
        for t in range(1, 12):
            idx = frame_indices(n, t, "uniform", "k")
            assert all(0 <= i < n for i in idx)
            # (but for an odd T over an even n: the middle segment's centre falls between two frames)
            assert [n - 1 - i for i in idx[::-1]] == idx or (t % 2 and not n % 2)
    r = frame_indices(100, 5, "random", "clip-7")
    assert r == frame_indices(100, 5, "random", "clip-7")  # a fixed draw per key
    assert all(20 * i <= x < 20 * (i + 1) for i, x in enumerate(r))  # one per segment
    assert r != frame_indices(100, 5, "random", "clip-8")


def _write_video(path: Path, frames: torch.Tensor, codec: str = "ffv1", options: dict | None = None) -> None:
    av = pytest.importorskip("av")
    with av.open(str(path), "w", options=options or {}) as out:
        stream = out.add_stream(codec, rate=8)
        stream.width, stream.height = frames.shape[-1], frames.shape[-2]
        stream.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        for f in frames:
            frame = av.VideoFrame.from_ndarray(f.permute(1, 2, 0).contiguous().numpy(), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_video_files_decode_and_broken_ones_are_skipped(motion, tmp_path):
    recs, _ = read_records(motion / "test.jsonl")
    clip, _, _ = try_load_frames(recs[0].frames, recs[0].key, 32)
    _write_video(tmp_path / "good.mkv", clip)
    _write_video(tmp_path / "lossy.mp4", clip, "mpeg4")
    _write_video(tmp_path / "front.mp4", clip.repeat(4, 1, 1, 1), "mpeg4", {"movflags": "faststart"})
    data = (tmp_path / "front.mp4").read_bytes()  # its index first: half of it opens, declaring 32 frames
    (tmp_path / "truncated.mp4").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.mp4").write_bytes(b"\x00not a video" * 50)
    good, reason, _ = try_load_frames(Frames(video=tmp_path / "good.mkv"), "good", 32)
    assert reason == "" and good.shape == clip.shape
    _, reason, detail = try_load_frames(Frames(video=tmp_path / "truncated.mp4"), "t", 32)
    assert reason == "broken_video" and "truncated" in detail, detail  # opened, fewer frames than declared
    _, reason, _ = try_load_frames(Frames(video=tmp_path / "good.mkv"), "g", 32, max_frames=4)
    assert reason == "too_long_video"
    _, reason, _ = try_load_frames(Frames(video=tmp_path / "good.mkv"), "g", 32, max_pixels=100)
    assert reason == "too_large"
    assert (good.float() - clip.float()).abs().max() <= 2  # lossless up to the RGB round trip
    table = tmp_path / "clips.jsonl"
    lines = [
        {"frames": "good.mkv", "captions": ["a"]},
        {"frames": "lossy.mp4", "captions": ["b"]},
        {"frames": "truncated.mp4", "captions": ["c"]},
        {"frames": "garbage.mp4", "captions": ["d"]},
        {"frames": "missing.mp4", "captions": ["e"]},
        {"frames": [str(motion / "frames/test/test-00000/0.png"), "gone.png"], "captions": ["f"]},
        {"frames": 7, "captions": ["g"]},
    ]
    table.write_text("".join(json.dumps(x) + "\n" for x in lines))
    recs, skipped = read_records(table)
    assert skipped == Counter(bad_row=1) and len(recs) == 6
    store = ImageStore(with_frame_count(recs, 4), 32, cache=True)
    assert store.cache.shape == (2, 4, 3, 32, 32)
    assert store.skipped == Counter(broken_video=2, missing_file=2)
    assert [r.captions[0] for r in store.records] == ["a", "b"]


def _tiny_model(**spec) -> DualEncoder:
    torch.manual_seed(0)
    return DualEncoder(
        get_spec("tiny", **{**TINY_MODEL, **spec}, vocab_size=64, eot_id=1, context_length=8)
    ).eval()


@pytest.mark.parametrize("kind", ["", "mean", "transformer", "attention"])
def test_one_frame_is_the_image_model(kind):
    model = _tiny_model(temporal=kind, temporal_layers=2)
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        still = model.encode_image(images)
        clip = model.encode_image(images[:, None])  # T = 1 through the clip path
        frames = model.encode_image(images[:, None].expand(-1, 3, -1, -1, -1))  # three equal frames
    assert (still - clip).abs().max() <= 1e-6
    if kind != "transformer":  # positions make equal frames differ for the transformer
        assert (still - frames).abs().max() <= 1e-5


def _perturbed(head: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return head


def test_order_and_permutation():
    x = torch.randn(4, 6, 32)
    perm = torch.randperm(6)
    for kind in ("mean", "attention"):
        head = _perturbed(temporal_head_of(kind, 32, 1, 4, 16))
        assert torch.allclose(head(x), head(x[:, perm]), atol=1e-5)
    transformer = _perturbed(TemporalTransformer(32, 1, 4, 16))
    assert not torch.allclose(transformer(x), transformer(x.flip(1)), atol=1e-3)  # order is seen
    with pytest.raises(Exception, match="positions for 16 frames"):
        transformer(torch.randn(1, 17, 32))
    pool = _perturbed(SlicePooling(32, 4))
    w = pool.weights(pool.block(x))
    assert torch.allclose(w.sum(1), torch.ones(4, 4), atol=1e-5)
    assert (w.max(1).values - w.min(1).values).max() > 0.01  # the perturbed query weighs slices unequally


def test_slice_pooling_finds_the_slice_that_holds_the_answer():
    """Volumes of 8 slices: one slice (anywhere) carries the class and a marker, the others carry random
    classes without it. Attention pooling learns to read that slice; mean pooling mixes all eight."""
    g = torch.Generator().manual_seed(0)
    d, t, classes = 32, 8, 6
    protos = torch.randn(classes, d, generator=g)
    marker = torch.randn(d, generator=g)

    def volumes(n):
        y = torch.randint(classes, (n,), generator=g)
        x = protos[torch.randint(classes, (n, t), generator=g)] + 0.3 * torch.randn(n, t, d, generator=g)
        where = torch.randint(t, (n,), generator=g)
        x[torch.arange(n), where] = protos[y] + marker
        return x, y

    (xt, yt), (xv, yv) = volumes(600), volumes(300)
    acc = {}
    for kind in ("mean", "attention"):
        torch.manual_seed(0)
        head, probe = temporal_head_of(kind, d, 1, 4, t), torch.nn.Linear(d, classes)
        opt = torch.optim.Adam([*head.parameters(), *probe.parameters()], lr=1e-2)
        for _ in range(150):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(probe(head(xt)), yt).backward()
            opt.step()
        with torch.no_grad():
            acc[kind] = (probe(head(xv)).argmax(1) == yv).float().mean().item()
    assert acc["attention"] > acc["mean"] + 0.2, acc


def test_clip_batches_shard_over_ranks_like_one_process(motion):
    recs, _ = read_records(motion / "train.jsonl")
    one = TrainBatches(recs, 32, 8, seed=3, caption_policy="first", cache=True)
    two = [
        TrainBatches(recs, 32, 8, seed=3, caption_policy="first", cache=True, rank=r, world=2) for r in (0, 1)
    ]
    for whole, *parts in zip(one.epoch(1), two[0].epoch(1), two[1].epoch(1), strict=True):
        assert whole[0].shape[1:] == (8, 3, 32, 32)
        assert torch.equal(whole[0], torch.cat([p[0] for p in parts]))
        assert whole[2] == [k for p in parts for k in p[2]]


def test_train_eval_and_reload_a_temporal_model(motion, tmp_path):
    from lipkit.checkpoint import load_checkpoint
    from lipkit.train.launch import run_training

    cfg = tiny_run_cfg(
        motion / "train.jsonl",
        tmp_path / "run",
        "infonce",
        data={"eval": {"test": str(motion / "test.jsonl")}, "num_frames": 4},
        augment={"scale_min": 1.0, "rotate_deg": 0},
        epochs=1,
    )
    cfg.model.overrides = {**TINY_MODEL, "temporal": "transformer"}
    cfg.eval.class_columns = ["motion", "label"]
    _, result = run_training(cfg)
    assert result.steps == 3
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["split"] == "test" and "zeroshot/motion/top1" in metrics["metrics"]
    loaded, _, _ = load_checkpoint(tmp_path / "run" / "checkpoint")
    assert loaded.spec.temporal == "transformer"
    assert loaded.temporal.blocks[0].attn.out_proj.weight.abs().sum() > 0  # trained away from zero
    clips = torch.randint(0, 255, (2, 4, 3, 32, 32), dtype=torch.uint8)
    forward, backward = loaded.embed_images_u8(clips), loaded.embed_images_u8(clips.flip(1))
    assert (forward - backward).abs().max() > 1e-6  # three steps in, the head already sees the order


def test_embed_search_and_serve_clips(motion, tmp_path):
    """A clip table embeds like an image table; a video file searches from the CLI, and an uploaded video
    over HTTP (a broken one refused with 400, one over the frame limit with 413)."""
    import numpy as np
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from lipkit.cli import app
    from lipkit.search.embed import run_embed
    from lipkit.search.index import build_index
    from lipkit.search.query import Searcher
    from lipkit.search.request_guards import Limits
    from lipkit.search.server import create_app
    from test_search_index import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    run_embed(ckpt, motion / "test.jsonl", tmp_path / "emb", batch_size=8, progress=False)
    items = json.loads((tmp_path / "emb" / "ids.json").read_text())
    assert len(items) == 30 and items[0]["path"].endswith("frames/test/test-00000/0.png")
    build_index(np.load(tmp_path / "emb" / "image_emb.npy"), "flat", items).save(tmp_path / "index")
    recs, _ = read_records(motion / "test.jsonl")
    clip, _, _ = try_load_frames(recs[1].frames, recs[1].key, 32)  # uniform sampling of 8 frames: all
    _write_video(tmp_path / "clip.mkv", clip)
    out = CliRunner().invoke(
        app, ["search", str(ckpt), str(tmp_path / "index"), "--image", str(tmp_path / "clip.mkv"), "--json"]
    )
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["results"][0]["id"] == 1  # the clip finds itself
    data = (tmp_path / "clip.mkv").read_bytes()
    with TestClient(create_app(Searcher(ckpt, tmp_path / "index"), limits=Limits(max_video_frames=8))) as c:
        r = c.post("/search", files={"file": ("clip.mkv", data, "video/x-matroska")}, data={"k": "3"})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["id"] == 1
        bad = c.post("/search", files={"file": ("clip.mkv", data[:200], "video/x-matroska")})
        assert bad.status_code == 400 and "video" in bad.json()["error"]
    with TestClient(create_app(Searcher(ckpt, tmp_path / "index"), limits=Limits(max_video_frames=4))) as c:
        long = c.post("/search", files={"file": ("clip.mkv", data, "video/x-matroska")})
        assert long.status_code == 413 and "frames" in long.json()["error"]


def _motion_loss_loop(e: torch.Tensor) -> torch.Tensor:
    b, t, d = e.shape
    central, var = [], []
    for i in range(b):
        for k in range(d):
            col = [e[i, j, k] for j in range(t)]
            for j in range(t):
                central.append((col[min(j + 1, t - 1)] - col[max(j - 1, 0)]).abs() / 2)
            mean = sum(col) / t
            var.append(sum((c - mean) ** 2 for c in col) / (t - 1))
    return 1 / (sum(central) / len(central) + sum(var) / len(var) + 1)


def test_ezclip_motion_loss_matches_a_loop():
    from lipkit.objectives.ezclip import motion_loss

    e = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    fast, slow = motion_loss(e), _motion_loss_loop(e)
    assert abs(fast.item() - slow.item()) <= 1e-10
    (g_fast,) = torch.autograd.grad(fast, e)
    (g_slow,) = torch.autograd.grad(slow, e)
    assert (g_fast - g_slow).abs().max() <= 1e-10


def test_ezclip_prompts_match_a_per_frame_loop():
    """FramePrompts.frames against a loop: each frame's blocks run one at a time, the temporal token of
    each layer computed from every frame's mean token by the layer's attention."""
    model = _tiny_model(temporal="ezclip", temporal_frames=4)
    torch.manual_seed(2)
    with torch.no_grad():
        for a in model.temporal.adapters:  # away from zero: the adapters must be in the loop too
            a.fc2.weight.normal_(std=0.1)
    vit, fp = model.visual, model.temporal
    clips = torch.randn(2, 3, 3, 32, 32)
    with torch.no_grad():
        fast = model.frame_features(clips)
        for b in range(2):
            xs = [vit.embed(clips[b, t][None])[0] for t in range(3)]
            for layer, block in enumerate(vit.transformer.resblocks):
                z = torch.stack([fp.prompts[layer, t] + xs[t].mean(0) for t in range(3)])
                z = block.attn(block.ln_1(z)[None])[0]
                new = []
                for t in range(3):
                    h = torch.cat([xs[t], z[t][None]])
                    x = xs[t] + block.attn(block.ln_1(h)[None])[0][:-1]
                    x = x + fp.adapters[layer](x)
                    new.append(x + block.mlp(block.ln_2(x)))
                xs = new
            for t in range(3):
                ref = vit.ln_post(xs[t])[0] @ vit.proj
                assert (fast[b, t] - ref).abs().max() <= 1e-5
    assert torch.allclose(
        model.encode_image(clips), torch.nn.functional.normalize(fast.mean(1), dim=-1), atol=1e-6
    )
    with pytest.raises(Exception, match="prompts for 4 frames"):
        model.frame_features(torch.randn(1, 5, 3, 32, 32))


def test_ezclip_trains_prompts_and_adapters_only(motion, tmp_path):
    from lipkit.checkpoint import load_checkpoint
    from lipkit.train.launch import run_training

    cfg = tiny_run_cfg(
        motion / "train.jsonl",
        tmp_path / "run",
        "ezclip",
        data={"num_frames": 4},
        augment={"scale_min": 1.0, "rotate_deg": 0},
        epochs=1,
        lock_image="all",
    )
    cfg.model.overrides = {**TINY_MODEL, "temporal": "ezclip", "temporal_frames": 4}
    run_training(cfg)
    model, _, _ = load_checkpoint(tmp_path / "run" / "checkpoint")
    start = _tiny_model(temporal="ezclip", temporal_frames=4)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, dict(start.named_parameters())[n])]
    assert any(n.startswith("temporal.prompts") for n in moved) and any("adapters" in n for n in moved)
    assert not any(n.startswith("visual.") for n in moved)


def test_script_order_loss_matches_a_loop():
    from lipkit.objectives.infonce import InfoNCE
    from lipkit.objectives.script_order import ScriptOrder

    torch.manual_seed(0)
    b, k, d = 4, 3, 8
    obj = ScriptOrder(sentences=k, width=16)
    obj.bind_width(d)
    obj.double()
    img = torch.nn.functional.normalize(torch.randn(b, d, dtype=torch.float64), dim=-1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.randn(b * (k + 1), d, dtype=torch.float64), dim=-1)
    scale = torch.tensor(10.0, dtype=torch.float64)
    script = txt.view(b, k + 1, d)[:, 1:]  # what the trainer's script_features input holds
    fast = obj(img, txt[:: k + 1], scale, script)
    order = 0.0
    for i in range(b):
        for j in range(k):
            u = txt[i * (k + 1) + 1 + j]
            logits = obj.head(torch.cat([img[i], u, img[i] * u]))
            order = order - torch.log_softmax(logits, dim=0)[j]
    slow = InfoNCE()(img, txt[:: k + 1], scale) + order / (b * k)
    assert abs(fast.item() - slow.item()) <= 1e-10
    (g_fast,) = torch.autograd.grad(fast, img)
    (g_slow,) = torch.autograd.grad(slow, img)
    assert (g_fast - g_slow).abs().max() <= 1e-10
    with pytest.raises(ValueError, match="sentences=2"):
        obj(img, txt[:: k + 1], scale, script[:, :2])


def test_script_order_trains_on_the_script_column(motion, tmp_path):
    from lipkit.train.launch import run_training

    cfg = tiny_run_cfg(
        motion / "train.jsonl",
        tmp_path / "run",
        "script_order",
        data={
            "num_frames": 4,
            "caption_column": "script",
            "captions_per_image": 4,
            "caption_policy": "first",
        },
        augment={"scale_min": 1.0, "rotate_deg": 0},
        epochs=1,
    )
    cfg.model.overrides = {**TINY_MODEL, "temporal": "transformer"}
    _, result = run_training(cfg)
    assert result.steps == 3
    rows_ = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["loss"] > 0 for r in rows_ if r.get("kind") == "train")


def test_clip_augmentation_is_one_draw_per_clip():
    """A clip's frames get the same crop and rotation (one draw per clip, as per image): a clip of equal
    frames stays a clip of equal frames, the next clip gets another draw, and two ranks' windows draw what one
    process draws."""
    from lipkit.config import AugmentConfig
    from lipkit.data.transforms import jitter_colour
    from lipkit.train.views import ViewMaker

    spec = get_spec("tiny", **TINY_MODEL)
    clip = torch.randint(0, 255, (1, 1, 3, 32, 32), dtype=torch.uint8).expand(
        4, 3, -1, -1, -1
    )  # 4 equal clips
    aug, cpu = AugmentConfig(blur_p=0.5, colour=0.4), torch.device("cpu")
    x = ViewMaker(spec, aug, torch.Generator().manual_seed(0), cpu, None).view(clip)
    assert x.shape == (4, 3, 3, 32, 32) and torch.equal(x[:, 0], x[:, 2])  # one crop for a clip's frames
    assert not torch.equal(x[0], x[1])  # another for the next clip
    halves = [ViewMaker(spec, aug, torch.Generator().manual_seed(0), cpu, (r * 2, 4)) for r in (0, 1)]
    assert torch.allclose(torch.cat([h.view(clip[r * 2 : r * 2 + 2]) for r, h in enumerate(halves)]), x)
    with pytest.raises(Exception, match="mirroring"):
        ViewMaker(spec, AugmentConfig(hflip=True), torch.Generator(), cpu, None).view(clip)
    # a clip's frames take the colour factors an image takes from the same draws
    frames = torch.rand(2, 3, 3, 8, 8)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    jittered = jitter_colour(frames.flatten(1, 2), gen(), 0.5).unflatten(1, (3, 3))
    for t in range(3):
        assert torch.allclose(jittered[:, t], jitter_colour(frames[:, t], gen(), 0.5), atol=1e-6)
    assert not torch.allclose(jittered, frames, atol=1e-2)


def test_tables_of_clips_validate_and_refuse_mixing(motion, tmp_path):
    from lipkit.data.convert import image_bytes
    from lipkit.data.inspection import validate

    report = validate(motion / "test.jsonl", progress=False)
    assert report.samples == 30 and not report.skipped
    recs, _ = read_records(motion / "test.jsonl")
    with pytest.raises(Exception, match="is a clip"):
        image_bytes(recs[0])
    mixed = tmp_path / "mixed.jsonl"
    lines = [{"frames": [str(p) for p in recs[0].frames.items], "captions": ["a clip"]}]
    lines.append({"image": str(recs[0].frames.items[0]), "captions": ["an image"], "frames": ""})
    mixed.write_text("".join(json.dumps(x) + "\n" for x in lines))
    got, skipped = read_records(mixed)
    assert len(got) == 2 and not skipped and got[1].frames is None
    with pytest.raises(Exception, match="images or clips"):
        ImageStore(got, 32, cache=True)


def _decoded(records, frames: int = 4) -> list[torch.Tensor]:
    return [try_load_frames(r.frames, r.key, 32)[0] for r in with_frame_count(records, frames)]


def test_clips_convert_to_shards_that_decode_shard_and_train_alike(motion, tmp_path):
    """Frame lists and videos through `lipkit data convert`: the shards decode to the table's frames, their
    batches split over 2 ranks exactly as 1 process, resume exactly, and train a clip model."""
    from lipkit.data.convert import convert
    from lipkit.data.shard_batches import ShardBatches
    from lipkit.data.sources.shards import expand_shards
    from lipkit.train.launch import run_training

    report = convert(motion / "train.jsonl", tmp_path / "shards", shard_size=5, verify=True, progress=False)
    assert report.samples == 24 and not report.skipped
    table, _ = read_records(motion / "train.jsonl")
    shards, _ = read_records(report.extra["pattern"])
    assert [r.key for r in shards] == [r.key for r in table]
    assert all(torch.equal(a, b) for a, b in zip(_decoded(shards), _decoded(table), strict=True))
    urls = expand_shards(report.extra["pattern"])

    def make(rank: int, world: int, workers: int = 0) -> ShardBatches:
        return ShardBatches(
            urls, 32, 8, 3, "first", workers=workers, rank=rank, world=world, clip=(4, "uniform")
        )

    one, two = make(0, 1, 2), [make(r, 2, 1) for r in (0, 1)]  # 2 streams each way (data/shard_batches.py)
    for whole, *parts in zip(one.epoch(0), two[0].epoch(0), two[1].epoch(0), strict=True):
        assert whole[0].shape[1:] == (4, 3, 32, 32)
        assert torch.equal(whole[0], torch.cat([p[0] for p in parts]))
        assert whole[2] == [k for p in parts for k in p[2]]
    first = make(0, 1)
    batches = first.epoch(1)
    next(batches)
    resumed = make(0, 1)
    resumed.load_state(first.state())
    assert [b[2] for b in resumed.epoch(1, 1)] == [b[2] for b in batches]
    cfg = tiny_run_cfg(report.extra["pattern"], tmp_path / "run", "infonce", data={"num_frames": 4}, epochs=1)
    cfg.model.overrides = {**TINY_MODEL, "temporal": "transformer"}
    run_dir, result = run_training(cfg)
    assert result.steps == 3
    from lipkit.checkpoint import load_checkpoint

    assert load_checkpoint(run_dir / "checkpoint")[0].spec.clip_frames == 4


def test_videos_convert_to_shards_and_mixed_shards_are_refused(motion, tmp_path):
    from lipkit.data.convert import convert
    from lipkit.data.inspection import inspect
    from lipkit.data.shard_batches import ShardBatches
    from lipkit.data.sources.shards import expand_shards

    recs, _ = read_records(motion / "test.jsonl")
    clip, _, _ = try_load_frames(recs[0].frames, recs[0].key, 32)
    _write_video(tmp_path / "good.mkv", clip)
    (tmp_path / "garbage.mp4").write_bytes(b"\x00not a video" * 50)
    lines = [
        {"frames": "good.mkv", "captions": ["a video"]},
        {"frames": "garbage.mp4", "captions": ["garbage"]},
        {"image": str(recs[0].frames.items[0]), "captions": ["an image"]},
    ]
    table = tmp_path / "videos.jsonl"
    table.write_text("".join(json.dumps(x) + "\n" for x in lines[:2]))
    seen = inspect(table, progress=False)  # the container by its first bytes, not as an image
    assert seen.extra["image_formats"] == {"MKV": 1} and seen.skipped == Counter(broken_video=1)
    report = convert(table, tmp_path / "shards", verify=True, progress=False)
    assert report.samples == 1 and report.skipped == Counter(broken_video=1)
    shards, _ = read_records(report.extra["pattern"])
    assert shards[0].frames.video[:4] == b"\x1aE\xdf\xa3"  # the .mkv member: the file's bytes as they were
    direct = try_load_frames(Frames(video=tmp_path / "good.mkv"), "v", 32)[0]
    assert torch.equal(_decoded(shards, 8)[0], direct)
    table.write_text("".join(json.dumps(x) + "\n" for x in [lines[0], lines[2]] * 2))
    with pytest.raises(Exception, match="mix clips and single images"):
        convert(table, tmp_path / "mixed", progress=False)
    # shards of images after shards of clips: the first shard's first sample decides, any other kind stops
    table.write_text(json.dumps(lines[2]) + "\n")
    images = convert(table, tmp_path / "images", progress=False)
    urls = expand_shards(report.extra["pattern"]) + expand_shards(images.extra["pattern"])
    with pytest.raises(Exception, match="sample '.*' is a single image among clips"):
        list(ShardBatches(urls, 32, 2, 3, "first", clip=(8, "uniform")).epoch(0))


def test_shard_frame_members_in_number_order():
    from lipkit.data.frames import shard_frames
    from lipkit.data.sources.shards import parse_sample

    frames = shard_frames({"__key__": "k", "10.jpg": b"ten", "2.png": b"two", "0.jpg": b"zero", "txt": b"x"})
    assert frames.items == (b"zero", b"two", b"ten")  # by number, not by name
    assert shard_frames({"mp4": b"video", "0.jpg": b"zero"}).video == b"video"  # the video wins
    assert shard_frames({"jpg": b"image", "٣.jpg": b"not ascii"}) is None  # a single image
    got = parse_sample({"__key__": "k", "0001.jpg": b"a", "1.png": b"b", "txt": b"cap"})
    assert got.reason == "no_frames" and "share the number 1" in got.detail


def test_change_phrases_by_rules():
    from lipkit.data.change_phrases import change_phrase

    assert change_phrase("grinning face moving left") == "moving left"
    assert change_phrase("raising hands: medium-light skin tone growing") == "growing"
    assert change_phrase("a cat turning into a smiling dog") == "turning into a smiling dog"
    assert change_phrase("cat turning counterclockwise") == "turning counterclockwise"
    assert change_phrase("a red building") == change_phrase("something") == change_phrase("a cat") == ""
    # a verb ending the caption wins over an earlier verb + direction in the object's name
    assert change_phrase("backhand index pointing right: medium-light skin tone growing") == "growing"
    assert change_phrase("right arrow curving left shrinking") == "shrinking"
    assert change_phrase("A cat Turning into a dog.") == "Turning into a dog"


def _vdi_loop(img, txt, scale, frames, phrases, g):
    """VDI's loss written out pair by pair."""
    from lipkit.objectives.infonce import InfoNCE

    b = img.shape[0]
    d = [torch.nn.functional.normalize(g(frames[i, -1] - frames[i, 0]), dim=0) for i in range(b)]
    same = [[bool(phrases[i] @ phrases[j] > 1 - 1e-4) for j in range(b)] for i in range(b)]
    logit = [[scale * d[i] @ phrases[j] for j in range(b)] for i in range(b)]
    rows = cols = 0.0
    for i in range(b):
        lse_r = torch.logsumexp(torch.stack(logit[i]), 0)
        lse_c = torch.logsumexp(torch.stack([logit[j][i] for j in range(b)]), 0)
        pos_r, pos_c = [j for j in range(b) if same[i][j]], [j for j in range(b) if same[j][i]]
        rows = rows - sum(logit[i][j] - lse_r for j in pos_r) / len(pos_r)
        cols = cols - sum(logit[j][i] - lse_c for j in pos_c) / len(pos_c)
    return InfoNCE()(img, txt, scale) + 0.5 * (rows + cols) / b


def test_vdi_loss_matches_a_loop():
    from lipkit.objectives.vdi import VisualDynamics

    torch.manual_seed(0)
    b, t, d = 5, 4, 8
    obj = VisualDynamics()
    obj.bind_width(d)
    obj.double()
    unit = lambda *s: torch.nn.functional.normalize(torch.randn(*s, dtype=torch.float64), dim=-1)  # noqa: E731
    img, txt = unit(b, d).requires_grad_(), unit(b, d)
    phrases = unit(b, d)
    phrases[3] = phrases[1]  # two clips with the same phrase: positives of each other
    phrases.requires_grad_()
    frames = torch.randn(b, t, d, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(10.0, dtype=torch.float64)
    fast = obj(img, txt, scale, frames, phrases)
    slow = _vdi_loop(img, txt, scale, frames, phrases, obj.g)
    assert abs(fast.item() - slow.item()) <= 1e-10
    for x in (img, frames, phrases, obj.g.weight):
        (g_fast,) = torch.autograd.grad(fast, x, retain_graph=True)
        (g_slow,) = torch.autograd.grad(slow, x, retain_graph=True)
        assert (g_fast - g_slow).abs().max() <= 1e-10


def test_vdi_trains_on_change_phrases(motion, tmp_path):
    from lipkit.train.launch import run_training

    data = {"num_frames": 4, "captions_per_image": 2, "caption_policy": "first"}
    cfg = tiny_run_cfg(
        motion / "train.jsonl",
        tmp_path / "run",
        "vdi",
        data=data,
        augment={"scale_min": 1.0, "rotate_deg": 0},
        epochs=1,
    )
    cfg.model.overrides = {**TINY_MODEL, "temporal": "transformer"}
    with pytest.raises(Exception, match="change_phrases=true"):
        run_training(cfg)
    cfg.data.change_phrases, cfg.train.objective = True, "infonce"
    with pytest.raises(Exception, match="only for the vdi objective"):
        run_training(cfg)
    cfg.train.objective = "vdi"
    _, result = run_training(cfg)
    assert result.steps == 3


def _glscl_loop(obj, txt, scale, frames, words, mask):
    """GLSCL's loss written out pair by pair and query by query; each caption's decoder reads its real words
    only (no padding mask)."""
    import torch.nn.functional as F

    b, t = frames.shape[:2]
    k = obj.queries
    unit = lambda x: x / x.norm()  # noqa: E731
    clips = [obj.local(frames[i : i + 1])[0] for i in range(b)]
    caps = [obj.local(words[i : i + 1, : int(mask[i].sum())])[0] for i in range(b)]
    s = torch.zeros(b, b, dtype=txt.dtype)
    for a in range(b):
        for c in range(b):
            w = torch.softmax(torch.stack([unit(txt[a]) @ unit(frames[c, j]) for j in range(t)]) / 0.03, 0)
            pooled = sum(w[j] * frames[c, j] for j in range(t))
            local = sum(caps[a][q] @ clips[c][q] for q in range(k)) / k
            s[a, c] = unit(txt[a]) @ unit(pooled) + 0.5 * local
    logits = scale * s
    contrast = (
        0.5
        * sum(-torch.log_softmax(logits[i], 0)[i] - torch.log_softmax(logits[:, i], 0)[i] for i in range(b))
        / b
    )
    d = [[sum(clips[n][i] @ clips[n][j] for n in range(b)) / b for j in range(k)] for i in range(k)]
    div = sum(
        torch.clamp(0.1 + d[i][j] - d[i][i], min=0) + torch.clamp(0.1 + d[i][j] - d[j][j], min=0)
        for i in range(k)
        for j in range(k)
        if i != j
    ) / (k * (k - 1))
    mean_v, mean_w = sum(clips) / b, sum(caps) / b
    paired = [sum(clips[n][q] @ caps[n][q] for n in range(b)) / b for q in range(k)]
    con = F.mse_loss(mean_v, mean_w) + 0.02 * sum((p - 0.75) ** 2 for p in paired)
    return contrast + 1e-4 * div + con


def test_glscl_loss_matches_a_loop():
    from lipkit.objectives.glscl import GlobalLocalConsistency

    torch.manual_seed(0)
    b, t, d, length = 4, 3, 8, 5
    obj = GlobalLocalConsistency(queries=3, layers=2, heads=2, diversity_weight=1e-4)
    obj.bind_width(d)
    obj.double()
    txt = torch.nn.functional.normalize(torch.randn(b, d, dtype=torch.float64), dim=-1).requires_grad_()
    frames = torch.randn(b, t, d, dtype=torch.float64, requires_grad=True)
    words = torch.randn(b, length, d, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1] * n + [0] * (length - n) for n in (5, 2, 3, 1)], dtype=torch.bool)
    scale = torch.tensor(10.0, dtype=torch.float64)
    fast = obj(txt, scale, frames, words, mask)
    slow = _glscl_loop(obj, txt, scale, frames, words, mask)
    assert abs(fast.item() - slow.item()) <= 1e-10
    for x in (
        txt,
        frames,
        words,
        obj.local.queries,
        obj.local.decoder.layers[0].multihead_attn.in_proj_weight,
    ):
        (g_fast,) = torch.autograd.grad(fast, x, retain_graph=True)
        (g_slow,) = torch.autograd.grad(slow, x, retain_graph=True)
        assert (g_fast - g_slow).abs().max() <= 1e-10
    with pytest.raises(ValueError, match="heads=3"):
        GlobalLocalConsistency(heads=3).bind_width(8)


def test_glscl_trains_and_its_global_score_tends_to_the_dense_cosine(motion, tmp_path):
    from dataclasses import replace

    from lipkit.checkpoint import load_checkpoint
    from lipkit.config import EvalConfig
    from lipkit.eval.evaluate import evaluate_records
    from lipkit.eval.similarity_choice import resolve_similarity, resolve_trained_settings
    from lipkit.objectives.glscl import global_scores
    from lipkit.train.launch import run_training

    cfg = tiny_run_cfg(
        motion / "train.jsonl",
        tmp_path / "run",
        "glscl",
        data={"num_frames": 4},
        augment={"scale_min": 1.0, "rotate_deg": 0},
        epochs=1,
        objective_args={"queries": 4, "layers": 1, "heads": 2},
    )
    cfg.model.overrides = {**TINY_MODEL, "temporal": "transformer"}
    _, result = run_training(cfg)
    assert result.steps == 3
    # lipkit eval scores the run by its global score (eval.similarity auto → frames); with a flat softmax
    # that is the dense cosine of the pooled clip, metric for metric
    model, tok, _ = load_checkpoint(tmp_path / "run" / "checkpoint")
    recs = with_frame_count(read_records(motion / "test.jsonl")[0], 4)
    ecfg = EvalConfig(class_columns=["motion", "label"], templates=["{}", "a {}"])
    got = {
        t: evaluate_records(model, tok, recs, replace(ecfg, frame_temperature=t), similarity="frames")
        for t in (0.03, 1e9)
    }
    dense = evaluate_records(model, tok, recs, ecfg, similarity="dense")
    assert got[1e9]["metrics"] == pytest.approx(dense["metrics"]) and got[0.03]["metrics"] != dense["metrics"]
    assert resolve_similarity("auto", "glscl") == "frames"
    assert resolve_trained_settings(EvalConfig(), "glscl", {"pool_temperature": 0.5}).frame_temperature == 0.5
    images = read_records(motion / "train.jsonl")[0][:2]
    for r in images:
        r.frames = None
    assert evaluate_records(model, tok, images, ecfg, similarity="frames")["similarity"] == "dense"
    # S^g with a flat softmax is the cosine of the mean-pooled clip (what the dense index serves)
    torch.manual_seed(0)
    text, frames = torch.randn(3, 8, dtype=torch.float64), torch.randn(5, 4, 8, dtype=torch.float64)
    dense = (
        torch.nn.functional.normalize(text, dim=-1)
        @ torch.nn.functional.normalize(frames.mean(1), dim=-1).t()
    )
    assert torch.allclose(global_scores(text, frames, 1e9), dense, atol=1e-9)
    sharp = global_scores(text, frames, 1e-4)  # a sharp softmax: the best-aligned frame's cosine
    best = torch.einsum("ad,btd->abt", *(torch.nn.functional.normalize(x, dim=-1) for x in (text, frames)))
    assert torch.allclose(sharp, best.max(-1).values, atol=1e-6)
