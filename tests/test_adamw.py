"""lipkit.train.adamw.FusedAdamW against torch.optim.AdamW(fused=True): the same parameters and moments,
bit for bit, the same state-dict layout both ways, and a CPU Trainer that never imports torch._dynamo."""

import copy
import subprocess
import sys

import pytest
import torch

from lipkit.train.adamw import FusedAdamW, adamw


def model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
    m.register_parameter("unused", torch.nn.Parameter(torch.ones(2)))  # never gets a gradient
    return m


def groups(m: torch.nn.Module) -> list[dict]:
    decay = [p for n, p in m.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in m.named_parameters() if p.ndim < 2]
    return [
        {"params": rest, "weight_decay": 0.0, "lr_scale": 1.0},
        {"params": decay, "weight_decay": 0.1, "lr_scale": 0.5},
    ]


def train(m: torch.nn.Module, opt, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for i in range(steps):
        for group in opt.param_groups:
            group["lr"] = 1e-2 * (i + 1) * group["lr_scale"]
        opt.zero_grad(set_to_none=True)
        x = torch.randn(5, 6, generator=g)
        m(x).square().mean().backward()
        opt.step()


def torch_adamw(m: torch.nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups(m), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, fused=True)


def ours(m: torch.nn.Module) -> FusedAdamW:
    return FusedAdamW(groups(m), lr=1e-3, betas=(0.9, 0.98), eps=1e-6)


def same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_same_parameters_and_state_as_torch():
    a, b = model(), model()
    opt_a, opt_b = torch_adamw(a), ours(b)
    train(a, opt_a, 5)
    train(b, opt_b, 5)
    same_tensors(a.state_dict(), b.state_dict())  # bitwise: the same kernel on the same inputs
    sd_a, sd_b = opt_a.state_dict(), opt_b.state_dict()
    assert sd_a["param_groups"] == sd_b["param_groups"]  # the same keys, values and order
    for ga, gb in zip(sd_a["param_groups"], sd_b["param_groups"], strict=True):
        assert list(ga) == list(gb)
    assert sd_a["state"].keys() == sd_b["state"].keys()  # no state for the parameter without a gradient
    for i in sd_a["state"]:
        same_tensors(sd_a["state"][i], sd_b["state"][i])
        assert sd_b["state"][i]["step"].dtype == torch.float32


@pytest.mark.parametrize("direction", ["torch→lipkit", "lipkit→torch"])
def test_state_dicts_load_across(direction):
    """A checkpoint's optimizer state from either implementation resumes in the other, bitwise."""
    make_first, make_second = (torch_adamw, ours) if direction == "torch→lipkit" else (ours, torch_adamw)
    first = model()
    first_opt = make_first(first)
    train(first, first_opt, 3)
    # copies, as a checkpoint holds them (a loaded state dict shares its tensors with the optimizer)
    saved_weights, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(first_opt.state_dict())
    resumed = model(seed=7)
    resumed.load_state_dict(saved_weights)
    resumed_opt = make_second(resumed)
    resumed_opt.load_state_dict(saved_opt)
    train(resumed, resumed_opt, 3, seed=2)
    train(first, first_opt, 3, seed=2)
    same_tensors(first.state_dict(), resumed.state_dict())


def test_zero_grad_keeps_buffers_when_asked():
    m = model()
    opt = ours(m)
    train(m, opt, 1)
    grads = {id(p): p.grad for p in m.parameters() if p.grad is not None}
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is None or (id(p) in grads and not p.grad.any()) for p in m.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in m.parameters())


def test_rejects_a_parameter_in_two_groups():
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="more than one"):
        FusedAdamW([{"params": [p]}, {"params": [p]}], lr=1e-3)


def test_devices():
    m = model()
    assert isinstance(adamw(groups(m), 1e-3, torch.device("cpu"), (0.9, 0.98), 1e-6), FusedAdamW)
    assert isinstance(adamw(groups(m), 1e-3, torch.device("meta"), (0.9, 0.98), 1e-6), torch.optim.AdamW)


def test_cpu_trainer_step_does_not_import_dynamo(tmp_path):
    """The point of FusedAdamW: a CPU training process without torch._dynamo (~150 MB of RSS)."""
    code = f"""
import sys
from pathlib import Path
import torch
sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parent)!r})
from tiny_batch import SPEC, BATCH, batch
from lipkit.config import AugmentConfig, TrainConfig
from lipkit.models.dual_encoder import DualEncoder
from lipkit.models.presets import get_spec
from lipkit.objectives import build_objective
from lipkit.text.tokenizer import TextTokenizer
from lipkit.train.trainer import Trainer
images, captions = batch()
tok = TextTokenizer.train(captions * 4, vocab_size=300, context_length=SPEC["context_length"])
spec = get_spec("tiny", **SPEC, vocab_size=tok.vocab_size, eot_id=tok.eot_id, pad_id=tok.pad_id)
cfg = TrainConfig(batch_size=BATCH, precision="bf16")
t = Trainer(DualEncoder(spec), build_objective("infonce"), tok, cfg, AugmentConfig(), Path({str(tmp_path)!r}),
            torch.device("cpu"))
for _ in range(2):
    t.step(images, captions, 1e-3)
t.load_training_state(t.training_state())
print("dynamo" if "torch._dynamo" in sys.modules else "no dynamo")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "no dynamo"
