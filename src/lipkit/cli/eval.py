"""`lipkit eval | report`: evaluate a checkpoint on named splits, write the HTML report of a run."""

from __future__ import annotations

from pathlib import Path

import typer

from lipkit.cli.common import console, print_results, report_to_trackers
from lipkit.errors import UserError


def eval_(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory written by `lipkit train`."),
    data: list[str] = typer.Option(
        [],
        "--data",
        "-d",
        help="NAME=SOURCE to evaluate on: a table, parquet, shards, a saved Hugging Face dataset, a folder "
        "with one sub-folder per class, or a CLIP_benchmark WebDataset set, e.g. "
        "--data test-style=~/.cache/lipkit/datasets/emoji/test-style.jsonl. Repeatable.",
    ),
    config: Path = typer.Option(
        None,
        "--config",
        "-c",
        help="Config whose eval: section (and its data.eval splits, beside any --data) to use.",
    ),
    set_: list[str] = typer.Option(
        [], "--set", "-s", help="Override a config key, e.g. --set eval.templates=['{}']."
    ),
    out: Path = typer.Option(
        None,
        "--out",
        "-o",
        help="Where to write results JSON (default: eval/results.json beside the checkpoint).",
    ),
) -> None:
    """Zero-shot classification (top-1/top-5/mean recall) and image↔text retrieval (R@1/5/10); with
    --set eval.linear_probe=train a linear probe, with --set 'eval.few_shot=[1,4,16]' the few-shot protocol
    (K-shot probe and Tip-Adapter on CoOp's base/novel split, mean over seeds; docs/adapt.md)."""
    from lipkit.config import load_config
    from lipkit.eval.suite import run_eval

    cfg = load_config(config, set_)
    splits = dict(cfg.data.eval)
    for item in data:
        if "=" not in item:
            raise UserError(f"--data '{item}' must look like NAME=TABLE, e.g. test-style=data/test.jsonl.")
        name, path = item.split("=", 1)
        splits[name] = path
    if not splits:
        raise UserError("Nothing to evaluate on; pass --data NAME=TABLE or a --config with data.eval splits.")
    out = out or checkpoint.expanduser().parent / "eval" / "results.json"
    print_results(run_eval(checkpoint, splits, cfg, out))
    console.print(f"results: {out}")


def report(
    run_dir: Path = typer.Argument(..., help="Run directory (holding metrics.jsonl and eval/results.json)."),
):
    """Write an HTML report (curves, metrics vs chance, heat map, retrieval examples) for a run."""
    from lipkit.eval.report import write_report

    if not any((run_dir / f).is_file() for f in ("metrics.jsonl", "eval/results.json")):
        raise UserError(
            f"'{run_dir}' is not a run directory (it has neither metrics.jsonl nor eval/results.json); "
            "pass the train.output folder of a `lipkit train` run."
        )
    index = write_report(run_dir)
    console.print(f"report: {index}")
    report_to_trackers(run_dir, index)


def caption(
    checkpoint: Path = typer.Argument(
        ..., help="Checkpoint directory with a caption decoder (the coca, capdec or connector objective)."
    ),
    images: list[Path] = typer.Argument(..., help="Image files to caption."),
    beam: int = typer.Option(3, "--beam", "-b", min=1, max=64, help="Beam width (1: greedy decoding)."),
    max_tokens: int = typer.Option(
        0, "--max-tokens", min=0, help="Most tokens per caption (0: the context length)."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="One JSON object per image: path, caption, log_prob, tokens."
    ),
    samples: int = typer.Option(
        0,
        "--samples",
        min=0,
        max=64,
        help="Text-only decoders: also decode N noised copies of the image embedding and keep the caption the "
        "towers match best with the image (MacCap's sampling and CLIP re-ranking).",
    ),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
) -> None:
    """Caption images with a checkpoint's caption decoder, by beam search (deterministic: the same
    checkpoint and images give the same captions). Train a decoder with -c configs/methods/coca.yaml,
    a text-only one on a trained checkpoint with -c configs/methods/capdec.yaml, or a connector into a
    small language model with configs/methods/text_lm.yaml then connector.yaml (docs/captioning.md)."""
    import json

    from lipkit.checkpoint import load_checkpoint
    from lipkit.device import pick_device
    from lipkit.eval.captioning import caption_files

    model, tokenizer, _ = load_checkpoint(checkpoint)
    model = model.to(pick_device(device))
    for row in caption_files(model, tokenizer, [str(p) for p in images], beam, max_tokens, samples):
        if as_json:
            print(json.dumps(row, ensure_ascii=False))
        else:
            print(f"{row['path']}\t{row['caption']}")
