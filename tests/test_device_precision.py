"""bf16 autocast only where the hardware computes it: a CPU without native bf16 trains and evaluates in fp32."""

import lipkit.device as device


def test_bf16_only_on_gpus_and_cpus_that_compute_it(monkeypatch):
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: False)
    assert not device.use_bf16("bf16", "cpu") and device.use_bf16("bf16", "cuda")
    assert not device.use_bf16("fp32", "cuda")
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: True)
    assert device.use_bf16("bf16", "cpu") and not device.use_bf16("fp32", "cpu")
