"""Subnormal floats are flushed to zero while training on the CPU, and only then."""

from __future__ import annotations

import pytest
import torch

from applications.sparsify.denormals import flush_denormals, flushing_denormals
from applications.sparsify.train import TrainConfig, train

SMALLEST_NORMAL = torch.finfo(torch.float32).tiny

pytestmark = pytest.mark.skipif(not torch.set_flush_denormal(False),
                                reason="this CPU cannot flush subnormal floats")


def _subnormals(t: torch.Tensor) -> int:
    return int(((t != 0) & (t.abs() < SMALLEST_NORMAL)).sum())


def _adam_moments_of_a_pruned_unit(steps: int) -> torch.Tensor:
    """Adam's first moment of weights whose gradient has been zero for ``steps`` steps (a
    unit gated off), starting from moments just above the subnormal range."""
    w = torch.nn.Parameter(torch.ones(64))
    opt = torch.optim.Adam([w], lr=1e-3)
    w.grad = torch.full_like(w, 1e-36)
    opt.step()
    for _ in range(steps):
        w.grad = torch.zeros_like(w)
        opt.step()
    return opt.state[w]["exp_avg"]


def test_context_flushes_and_restores():
    assert not flushing_denormals()
    with flush_denormals() as on:
        assert on and flushing_denormals()
        assert float(torch.tensor([1e-40]) * 1.0) == 0.0
    assert not flushing_denormals()
    assert float(torch.tensor([1e-40]) * 1.0) > 0.0
    with flush_denormals(False) as on:
        assert not on and not flushing_denormals()


def test_context_keeps_flushing_that_was_on_before():
    torch.set_flush_denormal(True)
    try:
        with flush_denormals():
            pass
        assert flushing_denormals()
    finally:
        torch.set_flush_denormal(False)
    assert not flushing_denormals()


def test_pruned_units_adam_moments_become_zero_not_subnormal():
    """The slowdown this module exists for: without flushing, the decaying moments of a
    pruned unit's weights sit in the subnormal range; with it they are exactly zero."""
    steps = 40  # 1e-37 * 0.9**40 is about 1.5e-39, subnormal
    plain = _adam_moments_of_a_pruned_unit(steps)
    assert _subnormals(plain) == plain.numel()
    with flush_denormals():
        flushed = _adam_moments_of_a_pruned_unit(steps)
    assert _subnormals(flushed) == 0
    assert bool((flushed == 0).all())


def test_training_on_the_cpu_flushes_and_restores(tmp_path):
    seen = []
    config = TrainConfig(model="mlp", dataset="mnist5k", limit=100, epochs=1, batch_size=50,
                         model_options={"hidden": [8]}, progress=False, device="cpu",
                         out=str(tmp_path / "run"))
    train(config, epoch_callback=lambda epoch, metrics: seen.append(flushing_denormals()))
    assert seen == [True]
    assert not flushing_denormals()
