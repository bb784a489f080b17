"""The objectives that keep a momentum (EMA) model — TCL's with its queues, RS-M-CLIP's teacher, head and
centre, BYOL's target — resume bitwise: a real run SIGKILLed mid-way and resumed ends with the same weights
and the same objective state (the EMA model included) as the run that was never stopped."""

import signal

import pytest
from safetensors.torch import load_file

from test_resume import assert_same, config, start, wait_for_step, weights

CASES = {
    "tcl_momentum": {"queue_size": 32},
    "rs_m_clip": {"local_crops": 2, "prototypes": 64, "hidden": 32, "bottleneck": 16},
    "improved_baselines": {"image_ssl": "byol", "ssl_hidden": 16},
}


@pytest.mark.parametrize("objective", list(CASES))
def test_a_killed_run_resumes_bitwise_with_its_momentum_state(table, tmp_path, objective):
    args = {"objective": objective, "objective_args": CASES[objective]}
    ref = tmp_path / "ref"
    proc = start(config(table, ref, **args), tmp_path)
    assert proc.wait() == 0, proc.stderr.read()[-2000:]
    out = tmp_path / "run"
    cfg = config(table, out, resume="auto", **args)
    proc = start(cfg, tmp_path)
    wait_for_step(proc, out / "metrics.jsonl", 9)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc = start(cfg, tmp_path)
    assert proc.wait() == 0, proc.stderr.read()[-2000:]
    assert_same(weights(out), weights(ref))
    states = [sorted((run / "checkpoints").glob("step-*"))[-1] for run in (ref, out)]
    assert states[0].name == states[1].name
    saved = [
        {k: v for k, v in load_file(str(next(s.glob("train*.safetensors")))).items() if "objective." in k}
        for s in states
    ]
    assert any(k.startswith("objective.momentum_model.") for k in saved[0])
    assert_same(saved[0], saved[1])
