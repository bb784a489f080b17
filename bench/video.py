"""Temporal heads on the motion clips (issue 28): mean pooling against the temporal transformer and attention
(slice) pooling, each trained for the demo's 8-minute budget on the demo model's locked frame embeddings
(configs/motion.yaml), scored on the test clips (the held-out artist) — docs/video-bench.json, the table of
docs/video.md.

    make demo && lipkit data build motion
    python bench/video.py                 # trains runs/motion-{mean,transformer,...} (~9 min each)
    python bench/video.py --no-train      # scores the runs already there (and runs/demo, runs/demo-vit untrained)

GLSCL (configs/methods/glscl.yaml) and the temporal transformer are scored a second time by GLSCL's global
score S^g (eval/frame_similarity.py; rows "…, scored by S^g"), as `lipkit eval` scores a glscl run.

EZ-CLIP and its mean-pooling baseline start from runs/demo-vit (`lipkit train --config configs/demo-vit.yaml`):
EZ-CLIP prompts a ViT tower.

Scores, per model (all on the 1,000 test clips, 100 objects × 10 motions):
- motion top-1: zero-shot over the 9 motion classes ("moving left" … "turning into another"), prompt "{}";
- direction: on the 800 clips of the 4 opposite pairs, the clip's own motion scored above its time reverse
  (mean pooling embeds both clips of a pair identically, so it is right on exactly one of the two: 50 %);
- within-object t→v R@1: each caption against its own object's 10 clips (captions that differ only in the
  motion, or in the order of a cross-fade's two objects);
- t→v R@1 over all 1,000 clips, and object top-1: zero-shot over the 100 objects' names (the image model's
  level is mean pooling's).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import torch

from lipkit.checkpoint import load_checkpoint
from lipkit.data.builtin.motion import PAIRS
from lipkit.data.frames import DEFAULT_FRAMES, with_frame_count
from lipkit.data.image_store import ImageStore
from lipkit.data.sources.registry import read_table
from lipkit.eval.embedding import embed_images, embed_texts
from lipkit.eval.frame_similarity import frame_scores, frame_states

# run → the `lipkit train` arguments that make it (each on the demo's 8-minute budget)
RUNS = {
    "mean": ["-c", "configs/motion.yaml", "--set", "model.overrides.temporal=mean"],
    "transformer": ["-c", "configs/motion.yaml", "--set", "model.overrides.temporal=transformer"],
    "attention": ["-c", "configs/motion.yaml", "--set", "model.overrides.temporal=attention"],
    "script": ["-c", "configs/motion.yaml", "-c", "configs/methods/script_order.yaml"],
    "vdi": ["-c", "configs/motion.yaml", "-c", "configs/methods/vdi.yaml"],
    "vit-mean": [
        "-c", "configs/motion.yaml", "--set", "model.init_from=runs/demo-vit/checkpoint",
        "--set", "model.overrides.temporal=mean", "--set", "train.batch_size=32",
    ],
    "ezclip": ["-c", "configs/motion.yaml", "-c", "configs/methods/ezclip.yaml"],
    "glscl": ["-c", "configs/motion.yaml", "-c", "configs/methods/glscl.yaml"],
    # the transformer's 1,000 steps (20 epochs) with the budget lifted: GLSCL's decoder halves the step rate
    "glscl-1000": ["-c", "configs/motion.yaml", "-c", "configs/methods/glscl.yaml", "--set", "train.max_minutes=30"],
}  # fmt: skip
GLOBAL_SCORED = ("transformer", "glscl", "glscl-1000")  # also scored by GLSCL's text-conditioned pooling (S^g)
UNTRAINED = {
    "demo (untrained, mean)": "runs/demo/checkpoint",
    "demo-vit (untrained, mean)": "runs/demo-vit/checkpoint",
}
OPPOSITE = {
    "moving right": "moving left",
    "moving down": "moving up",
    "growing": "shrinking",
    "turning counterclockwise": "turning clockwise",
}
OPPOSITE.update({v: k for k, v in OPPOSITE.items()})


def train(name: str) -> None:
    subprocess.run(["lipkit", "train", *RUNS[name], "--set", f"train.output=runs/motion-{name}"], check=True)


def trainable_share(model: torch.nn.Module, checkpoint: Path) -> float:
    """The share of the model's parameters its run trained (its config's locks applied again)."""
    run = json.loads((checkpoint.parent / "config.json").read_text())
    model.lock("text", run["train"]["lock_text"])
    model.lock("image", run["train"]["lock_image"])
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad) / sum(p.numel() for p in params)


@torch.no_grad()
def score(model: torch.nn.Module, tokenizer, test: Path, gim: float = 0.0) -> dict:
    """The scores of the module docstring: by the dense cosine of pooled clip embeddings, or (`gim`: its
    temperature) by GLSCL's text-conditioned pooling of the frame states."""
    model.eval()
    records = with_frame_count(read_table(test), model.spec.clip_frames or DEFAULT_FRAMES)
    store = ImageStore(records, model.spec.image_size, cache=True, desc="clips")
    if gim:
        states = frame_states(model, store, 32)
        sim = lambda texts: frame_scores(texts, states, gim).T  # noqa: E731
    else:
        clips = embed_images(model, store, 32)
        sim = lambda texts: clips @ texts.T  # noqa: E731
    motions = sorted({r.meta["motion"] for r in records})
    labels = sorted({r.meta["label"] for r in records})
    m_sims = sim(embed_texts(model, tokenizer, motions, 256))
    c_sims = sim(embed_texts(model, tokenizer, [r.captions[0] for r in records], 256)).T  # captions × clips
    own = torch.tensor([motions.index(r.meta["motion"]) for r in records])
    direction = [
        m_sims[i, own[i]] > m_sims[i, motions.index(OPPOSITE[r.meta["motion"]])]
        for i, r in enumerate(records)
        if r.meta["motion"] in OPPOSITE
    ]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[_object_of(r)].append(i)
    within = []
    for rows in groups.values():
        sims = c_sims[rows][:, rows]  # each caption against its object's clips
        within += (sims.argmax(1) == torch.arange(len(rows))).tolist()
    t2v = c_sims.argmax(1) == torch.arange(len(records))
    lab = torch.tensor([labels.index(r.meta["label"]) for r in records])
    l_sims = sim(embed_texts(model, tokenizer, labels, 256))
    return {
        "motion top-1": round(100 * (m_sims.argmax(1) == own).float().mean().item(), 1),
        "direction": round(100 * sum(map(bool, direction)) / len(direction), 1),
        "within-object t→v R@1": round(100 * sum(within) / len(within), 1),
        "t→v R@1": round(100 * t2v.float().mean().item(), 1),
        "object top-1": round(100 * (l_sims.argmax(1) == lab).float().mean().item(), 1),
        "head parameters": sum(p.numel() for p in model.temporal.parameters()),
    }


def _object_of(record) -> str:
    """The test object a clip belongs to: test clips are keyed test-<pair number>-<direction>, and each
    object's five pairs are numbered in a row (data/builtin/motion.py)."""
    _, number, _ = record.key.split("-")
    return str(int(number) // len(PAIRS))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-train", action="store_true", help="score the runs already in runs/motion-*")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    ap.add_argument(
        "--test", type=Path, default=Path("~/.cache/lipkit/datasets/motion/test.jsonl").expanduser()
    )
    ap.add_argument("--out", type=Path, default=Path("docs/video-bench.json"))
    ap.add_argument("--gim-temperature", type=float, default=0.03, help="τ_g of GLSCL's global score")
    a = ap.parse_args()
    results = json.loads(a.out.read_text()) if a.out.is_file() else {}  # the rows of runs not scored now stay
    results.update({name: score(*load_checkpoint(ckpt)[:2], a.test) for name, ckpt in UNTRAINED.items()})
    for name in a.runs:
        if not a.no_train:
            train(name)
        run = Path(f"runs/motion-{name}")
        log = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        steps = max((x.get("step", 0) for x in log), default=0)
        model, tokenizer, _ = load_checkpoint(run / "checkpoint")
        row = score(model, tokenizer, a.test)  # then the run's locks, to count what it trained
        share = round(100 * trainable_share(model, run / "checkpoint"), 2)
        results[name] = {**row, "steps": steps, "trainable %": share}
        print(name, results[name], file=sys.stderr)
        if name in GLOBAL_SCORED:
            results[f"{name}, scored by S^g"] = score(model, tokenizer, a.test, gim=a.gim_temperature)
    a.out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    for name, row in results.items():
        print(name, row)


if __name__ == "__main__":
    main()
