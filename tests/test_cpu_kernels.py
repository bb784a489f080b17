"""lipkit's own CPU paths against PyTorch's reference kernels, and the process malloc settings."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lipkit.models.transformer import Attention, Mlp, explicit_attention


def reference(qkv: torch.Tensor, heads: int, causal: bool) -> torch.Tensor:
    b, n, three_d = qkv.shape
    q, k, v = qkv.view(b, n, 3, heads, three_d // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(b, n, three_d // 3)


@pytest.mark.parametrize("causal", [False, True])
def test_explicit_attention_matches_sdpa_with_gradients(causal):
    torch.manual_seed(0)
    qkv = (2 * torch.randn(3, 9, 3 * 24, dtype=torch.float64)).requires_grad_()
    weight = torch.randn(3, 9, 24, dtype=torch.float64)
    ours = explicit_attention(qkv, heads=2, causal=causal)
    (grad_ours,) = torch.autograd.grad((ours * weight).sum(), qkv)
    ref = reference(qkv, 2, causal)
    (grad_ref,) = torch.autograd.grad((ref * weight).sum(), qkv)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-10, atol=1e-10)
    if causal:  # a token never sees a later one
        probe = qkv.detach().clone()
        probe[:, -1] += 100.0
        torch.testing.assert_close(explicit_attention(probe, 2, True)[:, :-1], ours.detach()[:, :-1])


def test_explicit_attention_with_a_key_mask_matches_sdpa_with_gradients():
    """A boolean mask (OpenCLIP CoCa's [cls] text tower: causal, some keys hidden) as SDPA applies it."""
    torch.manual_seed(2)
    b, n, heads, d = 3, 9, 2, 24
    qkv = (2 * torch.randn(b, n, 3 * d, dtype=torch.float64)).requires_grad_()
    mask = (torch.rand(b, 1, n, n) > 0.4) & torch.ones(n, n, dtype=torch.bool).tril()
    mask[..., 0] = True  # every query sees some key
    ours = explicit_attention(qkv, heads, False, mask)
    q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, n, d)
    weight = torch.randn(b, n, d, dtype=torch.float64)
    grads = [torch.autograd.grad((out * weight).sum(), qkv)[0] for out in (ours, ref)]
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_module_in_cpu_bf16_is_close_to_fp32(causal, monkeypatch):
    """The bf16 autocast path takes the explicit attention and stays within bf16 rounding of the fp32
    path (SDPA), outputs and input gradients alike."""
    import lipkit.models.transformer as tr

    calls = []
    monkeypatch.setattr(tr, "explicit_attention", lambda *a: calls.append(1) or explicit_attention(*a))
    torch.manual_seed(1)
    attn = Attention(48, 3)
    x = torch.randn(4, 17, 48, requires_grad=True)
    exact = attn(x, causal=causal)
    (grad_exact,) = torch.autograd.grad(exact.square().sum(), x)
    assert not calls  # fp32: SDPA
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = attn(x, causal=causal)
    assert calls and fast.dtype == torch.bfloat16
    (grad_fast,) = torch.autograd.grad(fast.float().square().sum(), x)
    err = (fast.float() - exact).abs().max() / exact.abs().max()
    assert err < 0.03, f"relative error {err:.4f}"
    err = (grad_fast - grad_exact).abs().max() / grad_exact.abs().max()
    assert err < 0.05, f"relative gradient error {err:.4f}"


def mallopt_value_in_child(env: dict[str, str]) -> str:
    code = "import lipkit.malloc as m; first = m.keep_freed_memory(); print(first, m._applied is first)"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def needs_glibc() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc settings")
    try:
        ctypes.CDLL(None).gnu_get_libc_version  # noqa: B018
    except AttributeError:
        pytest.skip("not glibc")


def test_malloc_settings_apply_once_and_respect_the_environment():
    needs_glibc()
    base = {"PATH": "/usr/bin:/bin"}
    assert mallopt_value_in_child(base) == "True True"
    assert mallopt_value_in_child({**base, "LIPKIT_MALLOC": "default"}) == "False True"
    assert mallopt_value_in_child({**base, "MALLOC_TRIM_THRESHOLD_": "131072"}) == "False True"
    assert mallopt_value_in_child({**base, "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}) == "False True"


def test_malloc_settings_stop_page_faults_on_repeated_steps():
    """What a training step does: many buffers freed together at its end. With glibc's initial settings
    (which its adaptive threshold only sometimes leaves, depending on the process's history; pinned
    here) the freed top of the heap goes back to the kernel and every step faults it in again as the
    first step did; with lipkit's settings the next steps reuse it. Only ratios are asserted (absolute
    counts depend on the host's page size, THP and libraries)."""
    needs_glibc()
    code = """
import ctypes, resource, sys, torch
torch.set_num_threads(1)
libc = ctypes.CDLL(None)
libc.prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages, so fault counts do not depend on the host's THP
mallopt = libc.mallopt
assert mallopt(-3, 128 * 1024) == 1 and mallopt(-1, 128 * 1024) == 1  # mmap/trim thresholds: glibc's initial
if sys.argv[1] == "tuned":
    import lipkit.malloc as m
    assert m.keep_freed_memory()
def step():
    buffers = [torch.ones(1024, 2048) for _ in range(10)]  # ten 8 MiB activations
    return sum(float(b[0, 0]) for b in buffers)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
per_step = []
for _ in range(8):
    before = faults()
    step()
    per_step.append(faults() - before)
print(per_step[0], sum(per_step[3:]) / 5)  # the first step (all pages new); the steady state
"""
    first, steady = {}, {}
    for mode in ("default", "tuned"):
        out = subprocess.run(
            [sys.executable, "-c", code, mode],
            env={"PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            check=True,
        )
        first[mode], steady[mode] = map(float, out.stdout.split())
    # tuned: after the first step or two the freed memory is reused (the first step faults in all of
    # its 80 MiB; the steady state next to nothing)
    assert steady["tuned"] < 0.05 * first["tuned"], (first, steady)
    # default: every step faults its buffers in again, about as many pages as the first step
    assert steady["default"] > 0.5 * first["default"], (first, steady)
    assert steady["tuned"] < 0.05 * steady["default"], (first, steady)


@pytest.mark.parametrize("quick_gelu", [False, True])
def test_mlp_recomputing_its_activation_gives_autograds_gradients(quick_gelu):
    """ActivationProjection keeps h instead of act(h); loss and every gradient equal plain autograd's."""
    torch.manual_seed(2)
    mlp = Mlp(16, 64, quick_gelu).double()
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 5, 16, dtype=torch.float64)
    params = [x, *mlp.parameters()]
    saved: list[int] = []

    def count(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        ours = (mlp(x) * weight).sum()  # x requires grad: the recomputing path
    grads = torch.autograd.grad(ours, params)
    plain = (mlp.c_proj(mlp.gelu(mlp.c_fc(x))) * weight).sum()
    ref = torch.autograd.grad(plain, params)
    torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert 3 * 5 * 64 in saved and saved.count(3 * 5 * 64) == 1, saved  # h kept once, act(h) not at all


def test_mlp_recompute_under_bf16_autocast_and_a_frozen_projection():
    torch.manual_seed(3)
    mlp = Mlp(32, 128, False)
    mlp.c_proj.requires_grad_(False)  # a locked layer: no weight gradient asked for
    x = torch.randn(4, 7, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mlp(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = mlp.c_proj(mlp.gelu(mlp.c_fc(ref_x)))
    ref.float().square().sum().backward()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=2e-2, atol=2e-2)
    assert mlp.c_proj.weight.grad is None and mlp.c_proj.bias.grad is None
    assert mlp.c_fc.weight.grad is not None


def test_mlp_recompute_refuses_a_second_derivative():
    mlp = Mlp(8, 16, False).double()
    x = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(mlp(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|differentiable"):
        g.sum().backward()
