"""The objectives that keep a momentum (EMA) model — TCL's with its queues, RS-M-CLIP's teacher, head and
centre, BYOL's target — resume bitwise: a real run SIGKILLed mid-way and resumed ends with the same weights
and the same objective state (the EMA model included) as the run that was never stopped."""

import pytest

from test_resume import assert_same, killed_and_resumed_objective_states

CASES = {
    "tcl_momentum": {"queue_size": 32},
    "rs_m_clip": {"local_crops": 2, "prototypes": 64, "hidden": 32, "bottleneck": 16},
    "improved_baselines": {"image_ssl": "byol", "ssl_hidden": 16},
}


# tcl_momentum runs in every suite; the others (~25 s each on 2 cores) with `-m slow`
@pytest.mark.parametrize(
    "objective", [n if n == "tcl_momentum" else pytest.param(n, marks=pytest.mark.slow) for n in CASES]
)
def test_a_killed_run_resumes_bitwise_with_its_momentum_state(table, tmp_path, objective):
    args = {"objective": objective, "objective_args": CASES[objective]}
    straight, resumed = killed_and_resumed_objective_states(table, tmp_path, **args)
    assert any(k.startswith("objective.momentum_model.") for k in straight)
    assert_same(straight, resumed)
