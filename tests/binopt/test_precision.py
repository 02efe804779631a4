"""Half-precision (float16, bfloat16) and mixed-dtype logits.

Estimators draw their noise and compare it with ``sigmoid(alpha)`` in at least float32
(``binopt.estimators.base.noise_dtype``), and the enumeration oracle runs in at least
float32; samples, values and gradients still come back in the logits' dtype. Before, in
bfloat16 a gate with ``|alpha| >= 6.2`` never changed (``sigmoid`` rounds to 1 on a 2**-8
grid, and the uniform's floor ``eps / 4`` swallowed every draw below 2**-9), the "unbiased"
estimators were off by 10-100% at ``|alpha|`` around 5, and ``exact_grad`` by up to a third.

The statistical budget
----------------------
``test_half_precision_estimates_are_unbiased`` runs ``NUM_CHECKS`` two-sided z-tests (one per
estimator, dtype and unit) and ``test_half_precision_samples_are_bernoulli`` ``NUM_FREQ``
binomial ones, each at the Bonferroni level ``FAMILY_ALPHA / (2 * checks)``; seeds are fixed.
The estimates come back rounded to the logits' dtype, once each: that moves their mean by at
most ``eps / 2`` times the mean of their absolute values (round to nearest), which the
tolerance adds to the z bound. ``f`` takes values exact in both dtypes, so the oracle is
exact in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import norm

import binopt
from binopt import diagnostics

HALF = [torch.bfloat16, torch.float16]
FAMILY_ALPHA = 1e-3

# every unit of every problem exactly representable in bfloat16 and float16
TABLE = torch.tensor([0.25, -1.25, 2.0, 0.75, -0.5, 1.5, -2.25, 0.875], dtype=torch.float64)
WEIGHTS = torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)

# One moderate unit and two near the dtype's rounding of sigmoid to 1: in bfloat16
# sigmoid(7) rounded to 1 and the draws below 2**-9 were moved up to 2**-9 > sigmoid(-7), so
# both gates were frozen; in float16 the same at +-9.
LOGITS = {torch.bfloat16: [0.5, 7.0, -7.0], torch.float16: [0.5, 9.0, -9.0]}

UNBIASED = {
    "arm": lambda g: binopt.ARM(generator=g),
    "disarm": lambda g: binopt.DisARM(generator=g),
    "reinforce": lambda g: binopt.REINFORCE(generator=g),
    "reinforce_loo": lambda g: binopt.REINFORCELOO(num_samples=2, generator=g),
}
NUM_ESTIMATES = 100_000
NUM_CHECKS = len(UNBIASED) * len(HALF) * 3

BERNOULLI = ["arm", "disarm", "reinforce", "reinforce_loo", "straight_through", "sample"]
NUM_DRAWS = 100_000
NUM_FREQ = len(BERNOULLI) * len(HALF) * 2


def table_f(z):
    """A table over {0, 1}^3 with values exact in every dtype, returned in z's dtype."""
    index = (z.double() * WEIGHTS).sum(-1).long()
    return TABLE[index].to(z.dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", list(UNBIASED))
def test_half_precision_estimates_are_unbiased(name, dtype):
    logits = torch.tensor(LOGITS[dtype], dtype=dtype)
    exact = binopt.exact_grad(table_f, logits.double())  # the same logits, in float64
    g = UNBIASED[name](torch.Generator().manual_seed(0)).grad(
        table_f, logits, num_samples=NUM_ESTIMATES)
    assert g.dtype == dtype
    g = g.double()
    # max(sample SE, exact SE): see tests/binopt/test_estimators_unbiased.py (rare events)
    exact_var = diagnostics.exact_variance(UNBIASED[name](None), table_f, logits.double())
    se = torch.maximum(g.std(0), exact_var["variance"].sqrt()) / math.sqrt(NUM_ESTIMATES)
    rounding = torch.finfo(dtype).eps / 2 * g.abs().mean(0)
    z = float(norm.isf(FAMILY_ALPHA / (2 * NUM_CHECKS)))
    err = (g.mean(0) - exact).abs()
    assert (err <= z * se + rounding).all(), (err, z * se + rounding)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", BERNOULLI)
def test_half_precision_samples_are_bernoulli(name, dtype):
    """The share of open gates is sigmoid(alpha) (alpha as stored in the dtype), also where
    sigmoid(alpha) rounds to 1 in that dtype or lies below its uniform's old floor."""
    bound = LOGITS[dtype][1]
    logits = torch.tensor([-bound, bound], dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    if name == "sample":
        z = binopt.ARM(generator=gen).sample(logits, (NUM_DRAWS,))
    else:
        seen = []

        def f(samples):
            seen.append(samples.detach().clone())
            return samples.sum(-1)

        est = binopt.get_estimator(name, generator=gen)
        est.grad(f, logits, num_samples=NUM_DRAWS // est.evaluations_per_estimate)
        z = torch.cat(seen)
    assert z.dtype == dtype and set(torch.unique(z).tolist()) <= {0.0, 1.0}
    n = z.shape[0]
    p = torch.sigmoid(logits.double())
    count = z.double().sum(0)
    zcrit = float(norm.isf(FAMILY_ALPHA / (2 * NUM_FREQ)))
    tol = zcrit * (n * p * (1 - p)).sqrt()
    assert ((count - n * p).abs() <= tol).all(), (count, n * p, tol)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", binopt.available_estimators())
def test_half_precision_follows_the_logits(name, dtype):
    """Samples f sees, surrogate values, logits.grad and grad() in the logits' dtype, finite
    also at +-8 and where sigmoid saturates."""
    logits = torch.tensor([0.0, 8.0, -8.0, 100.0, -100.0], dtype=dtype, requires_grad=True)
    seen = []

    def f(z):
        seen.append(z.dtype)
        return ((z - 0.5) ** 2).sum(-1)

    est = binopt.get_estimator(name, generator=torch.Generator().manual_seed(0))
    g = est.grad(f, logits, num_samples=16)
    loss = est.surrogate(f, logits, num_samples=4)
    loss.backward()
    assert set(seen) == {dtype}
    assert g.dtype == dtype and loss.dtype == dtype and logits.grad.dtype == dtype
    assert torch.isfinite(g).all() and torch.isfinite(logits.grad).all()
    sample = est.sample(logits, (3,))
    assert sample.dtype == dtype and sample.shape == (3, 5)


@pytest.mark.parametrize("dtype", HALF)
def test_exact_in_half_precision_is_the_float64_gradient_rounded(dtype):
    """The enumeration runs in float32; the gradient is rounded to the dtype once. In
    bfloat16 its log q was rounded on every state, which put up to a third of the gradient
    wrong (a wrong sign on some units)."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(7, generator=gen).to(dtype)
    weights = torch.randint(-8, 9, (7,), generator=gen).double() / 8  # exact in both dtypes

    def f(z):
        return ((z.double() - 0.5) * weights).sum(-1).pow(2).to(z.dtype)

    expected = binopt.exact_grad(f, logits.double())
    got = binopt.exact_grad(f, logits)
    assert got.dtype == dtype
    # one rounding to the dtype, plus float32's own error on 128 states
    torch.testing.assert_close(got.double(), expected, rtol=torch.finfo(dtype).eps, atol=1e-6)


def test_exact_takes_leaves_of_different_dtypes():
    """Each leaf is enumerated in its own dtype (f sees it so) and gets its gradient in it;
    a float32 leaf next to a float64 one used to fail in the matrix product."""
    logits = [torch.tensor([0.3, -1.0]), torch.tensor([0.5], dtype=torch.float64),
              torch.tensor([2.0], dtype=torch.bfloat16)]
    seen = []

    def f(z):
        seen.append([leaf.dtype for leaf in z])
        flat = torch.cat([leaf.double() for leaf in z], dim=1)
        return ((flat - 0.25) ** 2).sum(-1) + flat[:, 0] * flat[:, 3]

    g = binopt.exact_grad(f, logits)
    assert seen[0] == [torch.float32, torch.float64, torch.bfloat16]
    assert [leaf.dtype for leaf in g] == [torch.float32, torch.float64, torch.bfloat16]
    expected = binopt.exact_grad(f, [leaf.double() for leaf in logits])
    for got, want in zip(g, expected):
        torch.testing.assert_close(got.double(), want, rtol=torch.finfo(got.dtype).eps,
                                   atol=1e-7)
    value = binopt.exact_expectation(f, logits)
    assert value.dtype == torch.float64
