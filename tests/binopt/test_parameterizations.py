"""Gate parameterizations pi = g(phi), their logits and the chain rule (DESIGN.md 1, 3)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import binopt
from binopt.parameterizations import (
    CallableParameterization,
    HardSigmoid,
    Parameterization,
    ScaledSigmoid,
    Sigmoid,
    available_parameterizations,
    get_parameterization,
    safe_logit,
)

DTYPE = torch.float64

PARAMS = {
    "sigmoid": Sigmoid(),
    "scaled_sigmoid": ScaledSigmoid(k=7.0),
    "hard_sigmoid": HardSigmoid(),
    "hard_sigmoid_k7": HardSigmoid(k=7.0),
    "probit": CallableParameterization(torch.special.ndtr),
}


def test_registry():
    assert available_parameterizations() == ["hard_sigmoid", "scaled_sigmoid", "sigmoid"]
    assert isinstance(get_parameterization("sigmoid"), Sigmoid)
    p = get_parameterization("Scaled-Sigmoid", k=7)
    assert isinstance(p, ScaledSigmoid) and p.k == 7.0 and repr(p) == "ScaledSigmoid(k=7.0)"
    assert repr(get_parameterization("hard_sigmoid")) == "HardSigmoid(k=1.0)"
    inst = HardSigmoid(k=2)
    assert get_parameterization(inst) is inst
    c = get_parameterization(torch.sigmoid)
    assert isinstance(c, CallableParameterization) and "sigmoid" in repr(c)
    assert issubclass(CallableParameterization, Parameterization)


def test_closed_forms():
    phi = torch.linspace(-5, 5, 41, dtype=DTYPE)
    torch.testing.assert_close(Sigmoid().probs(phi), torch.sigmoid(phi))
    assert Sigmoid().logits(phi) is phi
    torch.testing.assert_close(ScaledSigmoid(7).probs(phi), torch.sigmoid(7 * phi))
    torch.testing.assert_close(ScaledSigmoid(7).logits(phi), 7 * phi)
    torch.testing.assert_close(HardSigmoid(3).probs(phi), torch.nn.functional.hardsigmoid(3 * phi))
    torch.testing.assert_close(HardSigmoid().probs(phi), (phi / 6 + 0.5).clamp(0, 1))


@pytest.mark.parametrize("name", list(PARAMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logits_are_logit_of_probs(name, dtype):
    param = PARAMS[name]
    phi = torch.linspace(-4, 4, 33, dtype=dtype)
    probs, logits = param.probs(phi), param.logits(phi)
    assert probs.dtype == logits.dtype == dtype
    assert ((probs >= 0) & (probs <= 1)).all()
    assert torch.isfinite(logits).all()
    inside = (probs > 1e-4) & (probs < 1 - 1e-4)
    torch.testing.assert_close(torch.sigmoid(logits[inside]), probs[inside])


@pytest.mark.parametrize("name", list(PARAMS))
@given(phi=st.lists(st.floats(-4.0, 4.0, allow_subnormal=False), min_size=1, max_size=6))
def test_chain_rule(name, phi):
    """d alpha / d phi = g'(phi) / (pi (1 - pi)) where pi is strictly inside (0, 1), 0 where
    the gate saturates (g' = 0 there for the hard sigmoid)."""
    param = PARAMS[name]
    phi = torch.tensor(phi, dtype=DTYPE, requires_grad=True)
    probs = param.probs(phi)
    (g_prime,) = torch.autograd.grad(probs.sum(), phi)
    (d_alpha,) = torch.autograd.grad(param.logits(phi).sum(), phi)
    p = probs.detach()
    inside = (p > 0) & (p < 1)
    expect = torch.where(inside, g_prime / torch.where(inside, p * (1 - p), 1.0), 0.0)
    torch.testing.assert_close(d_alpha, expect, rtol=1e-9, atol=0.0)


def test_hard_sigmoid_saturates_exactly():
    phi = torch.tensor([-10.0, -3.0, -1.0, 0.0, 1.0, 3.0, 10.0], dtype=DTYPE, requires_grad=True)
    param = HardSigmoid()
    probs = param.probs(phi)
    assert probs[0] == probs[1] == 0 and probs[-1] == probs[-2] == 1
    logits = param.logits(phi)
    assert torch.isfinite(logits).all()
    bound = -math.log(torch.finfo(DTYPE).tiny)
    assert logits[0] == -bound and logits[-1] == bound
    # exact objective and its gradient through saturated gates: finite, 0 where saturated
    table = torch.arange(7, dtype=DTYPE)

    def f(z):
        return (z * table).sum(-1) + z[:, 2] * z[:, 4]

    binopt.exact_expectation(f, logits).backward()
    assert torch.isfinite(phi.grad).all()
    assert (phi.grad[[0, 1, 5, 6]] == 0).all() and (phi.grad[2:5] != 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_safe_logit(dtype):
    p = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0], dtype=dtype, requires_grad=True)
    out = safe_logit(p)
    bound = -math.log(torch.finfo(dtype).tiny)
    assert out[0].item() == pytest.approx(-bound) and out[-1].item() == pytest.approx(bound)
    torch.testing.assert_close(out[1:4], torch.logit(p[1:4].detach()))
    # sigmoid of the bound rounds to exactly 1: saturated gates sample deterministically
    assert torch.sigmoid(out[-1]).item() == 1.0 and torch.sigmoid(out[0]).item() > 0
    out.sum().backward()
    q = p.detach()[1:4]
    torch.testing.assert_close(
        p.grad,
        torch.cat([torch.zeros(1, dtype=dtype), 1 / (q * (1 - q)), torch.zeros(1, dtype=dtype)]),
    )


@pytest.mark.parametrize("name", list(PARAMS))
def test_exact_gradient_matches_finite_differences(name):
    """The gradient of E(phi) through logits(phi) equals central differences of E(phi)."""
    param = PARAMS[name]
    phi = torch.tensor([-0.4, 0.1, 0.35], dtype=DTYPE, requires_grad=True)
    table = torch.tensor([0.3, -1.0, 2.0, 0.5, -0.7, 1.1, 0.0, 1.9], dtype=DTYPE)
    bits = torch.tensor([4, 2, 1])

    def f(z):
        return table[(z.long() * bits).sum(-1)]

    binopt.exact_expectation(f, param.logits(phi)).backward()
    h = 1e-6
    fd = torch.empty(3, dtype=DTYPE)
    for i in range(3):
        e = torch.zeros(3, dtype=DTYPE)
        e[i] = h
        with torch.no_grad():
            up = binopt.exact_expectation(f, param.logits(phi + e))
            down = binopt.exact_expectation(f, param.logits(phi - e))
        fd[i] = (up - down) / (2 * h)
    torch.testing.assert_close(phi.grad, fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["sigmoid", "scaled_sigmoid", "hard_sigmoid", "hard_sigmoid_k7"])
def test_inverse_round_trip(name):
    param = PARAMS[name]
    probs = torch.tensor([0.01, 0.2, 0.5, 0.8, 0.99], dtype=torch.get_default_dtype())
    torch.testing.assert_close(param.probs(param.inverse(probs)), probs)
    assert param.inverse(0.5).item() == pytest.approx(0.0, abs=1e-7)


def test_callable_inverse():
    param = CallableParameterization(torch.special.ndtr, inverse=torch.special.ndtri)
    phi = param.inverse([0.1, 0.5, 0.9])
    torch.testing.assert_close(param.probs(phi), torch.tensor([0.1, 0.5, 0.9]))


@pytest.mark.parametrize("name", ["sigmoid", "scaled_sigmoid", "hard_sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_keeps_a_floating_dtype(name, dtype):
    param = PARAMS[name]
    probs = torch.tensor([0.2, 0.5, 0.8], dtype=dtype)
    phi = param.inverse(probs)
    assert phi.dtype == dtype
    torch.testing.assert_close(param.probs(phi), probs)
    # numbers take the default dtype
    assert param.inverse(0.3).dtype == torch.get_default_dtype()
