"""Where the zero-shot ceiling is for a given text tower: the accuracy an *ideal* image tower would get.

An image tower trained contrastively at best puts an image where its training captions are. So for each
test image, take the text embedding of its caption(s) instead of the image embedding and classify that
against the prompt-template class embeddings, exactly as zero-shot evaluation does. The result bounds
what any image tower can reach with this text tower and these training captions (e.g. the label alone,
the keyword list, the "label (subcategory, category)" caption, or the mean of several).

    python bench/caption_ceiling.py runs/demo/checkpoint                  # test-style, subcategory
    python bench/caption_ceiling.py runs/demo/checkpoint --column category --split test-novel
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from lipkit.checkpoint import load_checkpoint
from lipkit.config import EvalConfig
from lipkit.data.emoji import default_root
from lipkit.data.sources.registry import read_table
from lipkit.eval.evaluate import embed_texts
from lipkit.eval.zeroshot import class_embeddings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--split", default="test-style")
    ap.add_argument("--column", default="subcategory")
    ap.add_argument("--captions", default="0,1,2", help="caption positions to try, alone and averaged")
    args = ap.parse_args()
    model, tok, _ = load_checkpoint(args.checkpoint)
    records = read_table(default_root() / f"{args.split}.jsonl")
    templates = EvalConfig().templates
    classes = sorted({r.meta[args.column] for r in records})
    labels = torch.tensor([classes.index(r.meta[args.column]) for r in records])
    prompts = [t.format(c) for c in classes for t in templates]
    cls = class_embeddings(embed_texts(model, tok, prompts, 256), len(classes), len(templates))
    positions = [int(p) for p in args.captions.split(",")]
    feats = {p: embed_texts(model, tok, [r.captions[p] for r in records], 256) for p in positions}
    rows = [(f"caption {p} (e.g. {records[0].captions[p]!r})", feats[p]) for p in positions]
    rows.append((f"mean of captions {positions}", F.normalize(sum(feats.values()), dim=-1)))
    print(f"{args.split} {args.column} zero-shot top-1 if each image sat exactly on its caption(s):")
    print(f"  chance {100 / len(classes):.1f} %")
    for name, f in rows:
        acc = ((f @ cls.t()).argmax(1) == labels).double().mean().item()
        print(f"  {100 * acc:5.1f} %  {name}")


if __name__ == "__main__":
    with torch.no_grad():
        main()
