"""The objectives that add a head to the model — ITM's matching head (with UNITER's OT term and ALBEF's
seeded draws), CoCa's caption decoder — resume bitwise: a real run SIGKILLed mid-way and resumed ends with
the same weights, head included, as the run that was never stopped."""

import pytest

from test_resume import killed_and_resumed_objective_states, weights

CASES = {
    "itm": ({"ot_weight": 0.1}, "matcher."),
    "coca": ({}, "captioner."),
}


# itm runs in every suite; coca (~25 s on 2 cores) with `-m slow`
@pytest.mark.parametrize(
    "objective", [n if n == "itm" else pytest.param(n, marks=pytest.mark.slow) for n in CASES]
)
def test_a_killed_run_resumes_bitwise_with_its_head(table, tmp_path, objective):
    args, prefix = CASES[objective]
    killed_and_resumed_objective_states(table, tmp_path, objective=objective, objective_args=args)  # asserts
    assert any(k.startswith(prefix) for k in weights(tmp_path / "run"))
