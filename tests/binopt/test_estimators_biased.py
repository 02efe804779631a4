"""The estimators declared biased (straight-through, Gumbel-sigmoid, hard concrete) are biased.

Each one is run on ``f(z) = sum_i z_i^2`` where the bias for the *Bernoulli* objective is
known to be non-zero: on ``{0, 1}`` ``z^2 = z`` so ``dE/d alpha_i = pi_i (1 - pi_i)``, while

- straight-through returns ``2 z_i pi_i (1 - pi_i)``, whose mean is ``2 pi_i`` times the
  exact gradient: bias ``(2 pi_i - 1) pi_i (1 - pi_i)``, non-zero unless ``pi_i = 1/2``
  (it is unbiased for multilinear ``f``, whence ``z^2`` and not a product of units);
- the relaxations return the gradient of their own relaxed objective,
  ``E_u[f'(z(u)) dz/d alpha]``, computed here by quadrature over ``u``.

Margins are statistical: a bias is "shown" when ``|mean - exact| > Z standard errors`` and
the mean agrees with the predicted (biased) value within ``Z`` standard errors, with
``Z`` the Bonferroni critical value for every check in the module at family-wise error
rate ``FAMILY_ALPHA``. Hypothesis property tests then check, for random differentiable
``f``, that each biased estimator's mean is exactly the value its relaxation predicts, and
that straight-through is unbiased on multilinear ``f``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import quad
from scipy.special import expit
from scipy.stats import norm

import binopt
from binopt import diagnostics

DTYPE = torch.float64
FAMILY_ALPHA = 1e-3
NUM_ESTIMATES = 100_000
LOGITS = [-1.5, 0.0, 2.0]
MAX_DIM = 4

BIASED = {
    "straight_through": lambda g: binopt.StraightThrough(generator=g),
    "gumbel": lambda g: binopt.GumbelSigmoid(generator=g),
    "gumbel_hard": lambda g: binopt.GumbelSigmoid(hard=True, generator=g),
    "hard_concrete": lambda g: binopt.HardConcrete(generator=g),
}

_FIXED = len(BIASED) * len(LOGITS) * 2
_PROPERTY = (len(BIASED) + MAX_DIM) * settings().max_examples
Z = float(norm.isf(FAMILY_ALPHA / (2 * (_FIXED + _PROPERTY))))


def sum_of_squares(z: torch.Tensor) -> torch.Tensor:
    return (z**2).sum(-1)


# --------------------------------------------------------- predicted means by quadrature
def _logit(u):
    return np.log(u) - np.log1p(-u)


def predicted_mean(name: str, alpha: float, fprime, est) -> float:
    """Expected estimate for ``D = 1`` and ``f`` with derivative ``fprime`` (separable ``f``
    works coordinate-wise)."""
    pi = float(expit(alpha))
    if name == "straight_through":
        # forward z ~ Bernoulli(pi), backward dz/d alpha = pi (1 - pi)
        return (pi * fprime(1.0) + (1 - pi) * fprime(0.0)) * pi * (1 - pi)
    if name in ("gumbel", "gumbel_hard"):
        tau = est.temperature

        def integrand(u):
            z = expit((alpha + _logit(u)) / tau)
            at = float(z > 0.5) if name == "gumbel_hard" else z
            return fprime(at) * z * (1 - z) / tau

        # the hard forward value jumps where z = 1/2, i.e. at u = 1 - pi
        return quad(integrand, 0.0, 1.0, points=[1 - pi], limit=400)[0]
    if name == "hard_concrete":
        beta, gamma, zeta = est.beta, est.gamma, est.zeta

        def integrand(u):
            s = expit((_logit(u) + alpha) / beta)
            z = s * (zeta - gamma) + gamma
            if z <= 0.0 or z >= 1.0:  # clamped: no gradient
                return 0.0
            return fprime(z) * (zeta - gamma) * s * (1 - s) / beta

        # the clamp edges z = 0, z = 1 as points of u
        edges = []
        for target in (0.0, 1.0):
            s = (target - gamma) / (zeta - gamma)
            edges.append(float(expit(beta * math.log(s / (1 - s)) - alpha)))
        return quad(integrand, 0.0, 1.0, points=sorted(edges), limit=400)[0]
    raise KeyError(name)


# ------------------------------------------------------------------------ fixed function
@pytest.mark.parametrize("name", list(BIASED))
def test_biased_on_sum_of_squares(name):
    logits = torch.tensor(LOGITS, dtype=DTYPE)
    est = BIASED[name](torch.Generator().manual_seed(1234))
    assert not est.unbiased

    res = diagnostics.bias(est, sum_of_squares, logits, num_samples=NUM_ESTIMATES)
    pi = torch.sigmoid(logits)
    torch.testing.assert_close(res["exact"], pi * (1 - pi))
    mean, se = res["stats"].flat("mean"), res["stats"].flat("std_error")
    predicted = torch.tensor([predicted_mean(name, a, lambda z: 2 * z, est) for a in LOGITS])
    predicted_bias = predicted - res["exact"]

    # the mean is what the relaxation predicts ...
    assert ((mean - predicted).abs() <= Z * se).all(), (mean, predicted, se)
    # ... which differs from the Bernoulli gradient wherever the predicted bias is non-zero
    known = predicted_bias.abs() > 1e-6
    if name == "straight_through":
        assert known.tolist() == [True, False, True]  # pi = 1/2 at alpha = 0: no bias there
    else:
        assert known.all()
    # the z-scores are bias / standard error, with the bias's (predicted) sign
    torch.testing.assert_close(res["bias"], mean - res["exact"], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(res["std_error"], se, rtol=0.0, atol=0.0)
    torch.testing.assert_close(res["z"], res["bias"] / se, rtol=1e-12, atol=0.0)
    assert (res["z"][known].abs() > Z).all(), f"{name}: z-scores {res['z'].tolist()}, Z={Z:.2f}"
    assert torch.sign(res["bias"][known]).equal(torch.sign(predicted_bias[known]))
    assert torch.sign(res["z"][known]).equal(torch.sign(predicted_bias[known]))


def test_biased_estimators_are_the_declared_ones():
    for name in binopt.available_estimators():
        est = binopt.get_estimator(name)
        assert est.unbiased == (name not in ("straight_through", "gumbel", "hard_concrete"))
        assert est.requires_differentiable_f == est.reparameterized == (not est.unbiased)


# --------------------------------------------------------------- property tests (random f)
coefs = st.lists(
    st.floats(-3.0, 3.0, allow_nan=False, allow_subnormal=False), min_size=4, max_size=4
)
alphas = st.floats(-3.0, 3.0, allow_nan=False, allow_subnormal=False)
seeds = st.integers(0, 2**63 - 1)


@pytest.mark.parametrize("name", list(BIASED))
@given(c=coefs, alpha=alphas, seed=seeds)
def test_mean_is_the_relaxation_gradient(name, c, alpha, seed):
    """For a random cubic ``f`` (``D = 1``) the mean estimate is ``E_u[f'(z) dz/d alpha]``;
    its difference from the Bernoulli gradient ``(f(1) - f(0)) pi (1 - pi)`` is the bias."""

    def f(z):
        z = z[..., 0]
        return c[0] + c[1] * z + c[2] * z**2 + c[3] * z**3

    def fprime(z):
        return c[1] + 2 * c[2] * z + 3 * c[3] * z**2

    est = BIASED[name](torch.Generator().manual_seed(seed))
    logits = torch.tensor([alpha], dtype=DTYPE)
    g = est.grad(f, logits, num_samples=20_000)[:, 0]
    mean, se = g.mean(), g.std() / math.sqrt(g.numel())
    predicted = predicted_mean(name, alpha, fprime, est)
    tol = Z * se + 1e-7 * (1 + sum(abs(x) for x in c))  # + quadrature round-off
    assert abs(float(mean) - predicted) <= tol, (float(mean), predicted, float(se))
    exact = float(binopt.exact_grad(f, logits)[0])
    pi = expit(alpha)
    assert exact == pytest.approx((c[1] + c[2] + c[3]) * pi * (1 - pi), rel=1e-9, abs=1e-12)


def multilinear(table: torch.Tensor, dim: int):
    """The multilinear extension of a table over ``{0,1}^dim``: differentiable in ``z``."""
    states = torch.tensor(list(itertools.product([0.0, 1.0], repeat=dim)), dtype=DTYPE)

    def f(z):  # (S, dim) -> (S,)
        z = z.unsqueeze(1)
        weights = torch.where(states == 1.0, z, 1 - z).prod(-1)  # (S, 2^dim)
        return weights @ table

    return f, states


@given(
    dim=st.integers(1, MAX_DIM),
    data=st.data(),
    seed=seeds,
)
def test_straight_through_unbiased_for_multilinear_f(dim, data, seed):
    """Positive control: for multilinear ``f``, ``df/dz_i`` does not depend on ``z_i``, so
    straight-through's mean is ``E[df/dz_i] pi_i (1 - pi_i) = dE/d alpha_i``: no bias."""
    values = st.floats(-10.0, 10.0, allow_nan=False, allow_subnormal=False)
    table = torch.tensor(data.draw(st.lists(values, min_size=2**dim, max_size=2**dim)), dtype=DTYPE)
    logits = torch.tensor(data.draw(st.lists(alphas, min_size=dim, max_size=dim)), dtype=DTYPE)
    f, states = multilinear(table, dim)
    est = binopt.StraightThrough(generator=torch.Generator().manual_seed(seed))
    n = 20_000
    g = est.grad(f, logits, num_samples=n)
    exact = binopt.exact_grad(f, logits)

    # exact variance of one estimate by enumeration: the estimate at state z is
    # (f(z, z_i=1) - f(z, z_i=0)) pi_i (1 - pi_i)
    pi = torch.sigmoid(logits)
    q = torch.where(states == 1.0, pi, 1 - pi).prod(1)
    ones, zeros = states.clone(), states.clone()
    per_state = torch.empty_like(states)
    for i in range(dim):
        ones[:, i], zeros[:, i] = 1.0, 0.0
        per_state[:, i] = (f(ones) - f(zeros)) * pi[i] * (1 - pi[i])
        ones[:, i], zeros[:, i] = states[:, i], states[:, i]
    ev_mean = (q.unsqueeze(1) * per_state).sum(0)
    torch.testing.assert_close(ev_mean, exact, rtol=1e-9, atol=1e-12)
    ev_var = (q.unsqueeze(1) * (per_state - ev_mean) ** 2).sum(0)
    # max(exact, sample) SE: see test_estimators_unbiased's module docstring
    se = torch.maximum(g.std(0), ev_var.sqrt()) / math.sqrt(n)
    err = (g.mean(0) - exact).abs()
    assert (err <= Z * se + 1e-9 * (1 + table.abs().max())).all(), (err, se)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["straight_through", "gumbel_hard"])
def test_hard_forward_values_are_exactly_binary(name, dtype):
    """The forward value is the hard sample itself, exactly 0 or 1 (``hard + (soft - soft)``,
    not ``(hard + soft) - soft``, which rounds to 0.9999999999999999)."""
    gen = torch.Generator().manual_seed(0)
    est = BIASED[name](gen)
    seen = []

    def f(z):
        seen.append(z.detach())
        return z.sum(-1)

    logits = 3 * torch.randn(2000, generator=gen, dtype=dtype)
    est.grad(f, logits, num_samples=5)
    assert set(torch.unique(seen[0]).tolist()) == {0.0, 1.0}
