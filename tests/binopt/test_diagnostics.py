"""Diagnostics: Monte Carlo statistics against exact variances, DisARM <= ARM, closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

import binopt
from binopt import diagnostics

DTYPE = torch.float64
FAMILY_ALPHA = 1e-3

ESTIMATORS = {
    "reinforce": lambda g: binopt.REINFORCE(generator=g),
    "reinforce_loo_k2": lambda g: binopt.REINFORCELOO(num_samples=2, generator=g),
    "reinforce_loo_k3": lambda g: binopt.REINFORCELOO(num_samples=3, generator=g),
    "arm": lambda g: binopt.ARM(generator=g),
    "disarm": lambda g: binopt.DisARM(generator=g),
}
PROBLEMS = [(1, 0), (3, 1), (4, 2)]  # (D, seed)
NUM_ESTIMATES = 200_000
# every coordinate of every (estimator, problem) is one two-sided test
_NUM_VARIANCE_CHECKS = len(ESTIMATORS) * sum(d for d, _ in PROBLEMS)
Z = float(norm.isf(FAMILY_ALPHA / (2 * _NUM_VARIANCE_CHECKS)))


def table_f(table: torch.Tensor, dim: int):
    bits = 2 ** torch.arange(dim - 1, -1, -1)

    def f(z):
        return table[(z.long() * bits).sum(-1)]

    return f


def random_problem(dim: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    table = torch.randn(2**dim, generator=gen, dtype=DTYPE)
    logits = 1.5 * torch.randn(dim, generator=gen, dtype=DTYPE)
    return table_f(table, dim), logits


# ------------------------------------------------------- Monte Carlo vs exact variance
@pytest.mark.parametrize("dim,seed", PROBLEMS)
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_monte_carlo_variance_matches_exact_variance(name, dim, seed):
    f, logits = random_problem(dim, seed)
    exact = diagnostics.exact_variance(ESTIMATORS[name](None), f, logits)
    torch.testing.assert_close(exact["mean"], binopt.exact_grad(f, logits), rtol=1e-9, atol=1e-12)

    stats = diagnostics.monte_carlo(
        ESTIMATORS[name](torch.Generator().manual_seed(seed + 100)),
        f,
        logits,
        num_samples=NUM_ESTIMATES,
        chunk_size=NUM_ESTIMATES,
    )
    # the same draws, by hand: monte_carlo's arithmetic
    g = ESTIMATORS[name](torch.Generator().manual_seed(seed + 100)).grad(
        f, logits, num_samples=NUM_ESTIMATES
    )
    torch.testing.assert_close(stats.mean, g.mean(0))
    torch.testing.assert_close(stats.variance, g.var(0))
    torch.testing.assert_close(stats.std_error, g.std(0) / math.sqrt(NUM_ESTIMATES))
    assert stats.num_samples == NUM_ESTIMATES
    assert stats.evaluations_per_estimate == ESTIMATORS[name](None).evaluations_per_estimate

    # Sampling error of the sample variance. For iid X with finite fourth central moment
    # mu4, sqrt(N) (s^2 - sigma^2) -> Normal(0, mu4 - sigma^4) (CLT applied to the mean of
    # (X - mu)^2, plus a negligible O(1/N) term from estimating mu). The estimates are
    # bounded (|f| and the weights are bounded), so every moment exists; we plug in the
    # sample fourth central moment m4, a consistent estimate of mu4. Each coordinate is a
    # z-test at the Bonferroni level over all coordinates of all cases in this test.
    m4 = ((g - g.mean(0)) ** 4).mean(0)
    se_var = ((m4 - stats.variance**2).clamp_min(0) / NUM_ESTIMATES).sqrt()
    err = (stats.variance - exact["variance"]).abs()
    assert (err <= Z * se_var + 1e-12).all(), (
        f"{name}: variance {stats.variance.tolist()} vs exact {exact['variance'].tolist()}, "
        f"se {se_var.tolist()}, Z = {Z:.2f}"
    )
    # and the mean, for completeness
    assert ((stats.mean - exact["mean"]).abs() <= Z * stats.std_error).all()


# ------------------------------------------------------------------- DisARM <= ARM
@settings(max_examples=max(settings().max_examples, 30))
@given(
    dim=st.integers(1, 5),
    data=st.data(),
)
def test_disarm_variance_never_exceeds_arm(dim, data):
    """DisARM is ARM with u integrated out given the antithetic pair (Rao-Blackwell), so
    its variance is at most ARM's on every coordinate, for any f and logits."""
    values = st.floats(-10.0, 10.0, allow_nan=False, allow_subnormal=False)
    table = torch.tensor(data.draw(st.lists(values, min_size=2**dim, max_size=2**dim)), dtype=DTYPE)
    logits = torch.tensor(
        data.draw(st.lists(st.floats(-4.0, 4.0), min_size=dim, max_size=dim)), dtype=DTYPE
    )
    f = table_f(table, dim)
    arm = diagnostics.exact_variance("arm", f, logits)
    disarm = diagnostics.exact_variance("disarm", f, logits)
    exact = binopt.exact_grad(f, logits)
    scale = 1.0 + float(table.abs().max())
    torch.testing.assert_close(arm["mean"], exact, rtol=1e-9, atol=1e-12 * scale)
    torch.testing.assert_close(disarm["mean"], exact, rtol=1e-9, atol=1e-12 * scale)
    assert (disarm["variance"] <= arm["variance"] + 1e-12 * scale**2).all(), (
        disarm["variance"],
        arm["variance"],
    )


# ---------------------------------------------------------------- closed forms at D = 1
def arm_variance_d1(alpha: float, p0: float) -> float:
    """Hand-derived variance of ARM for f(z) = (z - p0)^2, D = 1.

    Delta = f(1) - f(0) = 1 - 2 p0, pi = sigmoid(alpha), c = |pi - 1/2|. Take pi >= 1/2
    (pi < 1/2 is the mirror image u -> 1 - u): z1 = 1[u > 1 - pi], z2 = 1[u < pi], so
      u < 1 - pi:       z1 = 0, z2 = 1, g = -Delta (u - 1/2)
      1 - pi <= u < pi: z1 = z2 = 1,    g = 0
      u >= pi:          z1 = 1, z2 = 0, g = +Delta (u - 1/2)
    E g   = Delta [int_pi^1 (u - 1/2) du - int_0^{1-pi} (u - 1/2) du]
          = Delta [1/4 - c^2] = Delta pi (1 - pi)                         (unbiased)
    E g^2 = Delta^2 [int_pi^1 + int_0^{1-pi}] (u - 1/2)^2 du
          = Delta^2 (2/3) (1/8 - c^3) = Delta^2 (1/12 - 2 c^3 / 3)
    Var   = Delta^2 (1/12 - 2 c^3 / 3 - (1/4 - c^2)^2);  at pi = 1/2: Delta^2 / 48.
    """
    pi = 1.0 / (1.0 + math.exp(-alpha))
    delta = 1.0 - 2.0 * p0
    c = abs(pi - 0.5)
    return delta**2 * (1.0 / 12.0 - 2.0 * c**3 / 3.0 - (0.25 - c**2) ** 2)


def disarm_variance_d1(alpha: float, p0: float) -> float:
    """DisARM, same f. For pi >= 1/2 the pair differs (b != b~) when u < 1 - pi
    (b = 1, b~ = 0) or u >= pi (b = 0, b~ = 1), probability 2 (1 - pi); in both cases
    g = Delta pi / 2 (sigma(|alpha|) = pi), else 0. So E g = Delta pi (1 - pi) and
    Var = (Delta pi / 2)^2 2 (1 - pi) (1 - 2 (1 - pi)) = Delta^2 pi^2 (1 - pi) (2 pi - 1) / 2;
    by symmetry pi -> max(pi, 1 - pi) for pi < 1/2."""
    pi = 1.0 / (1.0 + math.exp(-alpha))
    pi = max(pi, 1.0 - pi)
    delta = 1.0 - 2.0 * p0
    return delta**2 * pi**2 * (1.0 - pi) * (2.0 * pi - 1.0) / 2.0


def reinforce_variance_d1(alpha: float, p0: float, b: float = 0.0) -> float:
    """REINFORCE: g = (f(z) - b)(z - pi): (f(1) - b)(1 - pi) w.p. pi, -(f(0) - b) pi else."""
    pi = 1.0 / (1.0 + math.exp(-alpha))
    f1, f0 = (1 - p0) ** 2 - b, p0**2 - b
    mean = pi * (1 - pi) * (f1 - f0)
    second = pi * f1**2 * (1 - pi) ** 2 + (1 - pi) * f0**2 * pi**2
    return second - mean**2


@pytest.mark.parametrize("alpha", [-2.5, -0.3, 0.0, 0.7, 3.0])
@pytest.mark.parametrize("p0", [0.49, 0.2, 0.9])
def test_exact_variance_closed_forms_d1(alpha, p0):
    def f(z):
        return ((z - p0) ** 2).sum(-1)

    logits = torch.tensor([alpha], dtype=DTYPE)
    pi = 1.0 / (1.0 + math.exp(-alpha))
    mean = (1 - 2 * p0) * pi * (1 - pi)
    cases = {
        "arm": arm_variance_d1(alpha, p0),
        "disarm": disarm_variance_d1(alpha, p0),
        "reinforce": reinforce_variance_d1(alpha, p0),
    }
    for name, var in cases.items():
        out = diagnostics.exact_variance(name, f, logits)
        assert out["mean"].item() == pytest.approx(mean, rel=1e-10, abs=1e-15), name
        assert out["variance"].item() == pytest.approx(var, rel=1e-9, abs=1e-15), name
    if alpha == 0.0:
        assert cases["arm"] == pytest.approx((1 - 2 * p0) ** 2 / 48)
        assert cases["disarm"] == 0.0


def test_exact_variance_uses_the_moving_average_baseline_as_a_constant():
    def f(z):
        return ((z - 0.3) ** 2).sum(-1)

    logits = torch.tensor([0.4], dtype=DTYPE)
    est = binopt.REINFORCE(baseline="moving_average", generator=torch.Generator().manual_seed(0))
    est.surrogate(f, logits, num_samples=10)
    b = float(est.baseline_value)
    out = diagnostics.exact_variance(est, f, logits)
    assert out["variance"].item() == pytest.approx(reinforce_variance_d1(0.4, 0.3, b), rel=1e-9)


def test_exact_variance_structures_and_limits():
    logits = {"a": torch.zeros(2, dtype=DTYPE), "b": torch.ones(1, 2, dtype=DTYPE)}

    def f(z):
        return z["a"].sum(-1) * z["b"].sum((-1, -2))

    out = diagnostics.exact_variance("disarm", f, logits)
    assert set(out["variance"]) == {"a", "b"} and out["variance"]["b"].shape == (1, 2)
    exact = binopt.exact_grad(f, logits)
    for key in logits:
        torch.testing.assert_close(out["mean"][key], exact[key])

    with pytest.raises(TypeError, match=r"supports REINFORCE.*got GumbelSigmoid"):
        diagnostics.exact_variance("gumbel", f, logits)
    with pytest.raises(ValueError, match=r"at most 12 units.*got 13"):
        diagnostics.exact_variance("arm", lambda z: z.sum(-1), torch.zeros(13, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"D\*K <= 16; got 18"):
        diagnostics.exact_variance(
            binopt.REINFORCELOO(num_samples=3), lambda z: z.sum(-1), torch.zeros(6)
        )


def test_bias_reports_z_scores():
    def f(z):
        return (z**2).sum(-1)

    logits = torch.tensor([1.0, -1.0], dtype=DTYPE)
    exact = binopt.exact_grad(f, logits)
    res = diagnostics.bias(binopt.Exact(), f, logits, num_samples=10)
    torch.testing.assert_close(res["exact"], exact, rtol=1e-12, atol=0.0)
    assert res["bias"].abs().max() < 1e-12
    assert torch.equal(res["std_error"], torch.zeros(2, dtype=DTYPE))
    assert torch.isnan(res["z"]).all()  # zero standard error: no z-score

    n = 20_000
    res = diagnostics.bias(
        binopt.ARM(generator=torch.Generator().manual_seed(0)), f, logits, num_samples=n
    )
    # the same draws, by hand: bias = mean - exact gradient, z = bias / standard error
    g = binopt.ARM(generator=torch.Generator().manual_seed(0)).grad(f, logits, num_samples=n)
    se = g.std(0) / math.sqrt(n)
    torch.testing.assert_close(res["exact"], exact, rtol=1e-12, atol=0.0)
    torch.testing.assert_close(res["bias"], g.mean(0) - exact, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(res["std_error"], se, rtol=1e-9, atol=0.0)
    assert (res["std_error"] > 0).all()
    torch.testing.assert_close(res["z"], res["bias"] / res["std_error"], rtol=1e-12, atol=0.0)
    torch.testing.assert_close(res["stats"].flat("mean"), g.mean(0))
    # ARM is unbiased: each z is standard normal; two-sided Bonferroni over the 2 units
    z_crit = float(norm.isf(FAMILY_ALPHA / (2 * 2)))
    assert (res["z"].abs() <= z_crit).all(), (res["z"].tolist(), z_crit)


def test_standard_error_bound():
    bound, z = diagnostics.standard_error_bound(torch.tensor([1.0, 2.0]), 1, family_alpha=0.05)
    assert z == pytest.approx(1.959964, rel=1e-6)
    torch.testing.assert_close(bound, torch.tensor([z, 2 * z]))
    _, z100 = diagnostics.standard_error_bound(torch.tensor(1.0), 100, family_alpha=0.05)
    assert z100 == pytest.approx(norm.isf(0.05 / 200))


def test_monte_carlo_chunks_and_structures():
    logits = [torch.zeros(2, dtype=DTYPE), torch.zeros(3, 1, dtype=DTYPE)]

    def f(z):
        return z[0].sum(-1) - z[1].sum((-1, -2))

    stats = diagnostics.monte_carlo(
        binopt.DisARM(generator=torch.Generator().manual_seed(0)),
        f,
        logits,
        num_samples=2500,
        chunk_size=1000,
    )
    assert isinstance(stats.mean, list) and stats.mean[1].shape == (3, 1)
    assert stats.num_samples == 2500 and stats.evaluations_per_estimate == 2
    assert stats.flat("variance").shape == (5,)
    # f is linear: the exact gradient is (+1/4, +1/4, -1/4, -1/4, -1/4)
    expect = torch.tensor([0.25, 0.25, -0.25, -0.25, -0.25], dtype=DTYPE)
    assert ((stats.flat("mean") - expect).abs() <= 6 * stats.flat("std_error") + 1e-12).all()


@pytest.mark.parametrize("bad", [0, -3])
def test_monte_carlo_rejects_no_samples(bad):
    f = lambda z: z.sum(-1)  # noqa: E731
    with pytest.raises(ValueError, match=f"num_samples must be >= 1; got {bad}"):
        diagnostics.monte_carlo("arm", f, torch.zeros(2), num_samples=bad)
    with pytest.raises(ValueError, match=f"chunk_size must be >= 1; got {bad}"):
        diagnostics.monte_carlo("arm", f, torch.zeros(2), num_samples=4, chunk_size=bad)


def test_monte_carlo_variance_is_exact_for_identical_estimates():
    """Exact enumeration returns the same estimate every time: its variance is 0, even in
    float32 with a mean far from 0 (sum(g^2) - n m^2 gave 7.9e-12 on the first unit)."""
    target = torch.tensor([0.1, 0.7, 0.2])
    f = lambda z: 1e3 * ((z - target) ** 2).sum(-1) + 7  # noqa: E731
    stats = diagnostics.monte_carlo("exact", f, torch.tensor([0.3, -1.1, 2.0]),
                                    num_samples=30000)
    assert torch.equal(stats.variance, torch.zeros(3, dtype=torch.float64))


def test_monte_carlo_chunks_merge_exactly():
    """Chunked statistics equal the one-chunk ones (same estimates, merged means and sums of
    squares)."""
    f = lambda z: ((z - 0.3) ** 2).sum(-1) + z[:, 0] * z[:, 1]  # noqa: E731
    logits = torch.tensor([0.4, -1.2], dtype=DTYPE)
    g = torch.Generator()
    one = diagnostics.monte_carlo(binopt.ARM(generator=g.manual_seed(1)), f, logits, 999, 999)
    many = diagnostics.monte_carlo(binopt.ARM(generator=g.manual_seed(1)), f, logits, 999, 100)
    torch.testing.assert_close(many.mean, one.mean, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(many.variance, one.variance, rtol=1e-10, atol=1e-15)


def test_prod_except_single_unit_follows_the_device():
    lens = torch.ones(4, 1, device="meta", dtype=DTYPE)
    out = diagnostics._prod_except(lens, 0)
    assert out.device.type == "meta" and out.dtype == DTYPE and out.shape == (4,)


# ------------------------------------------------------------------- edge inputs
EXACT_VARIANCE = ["reinforce", "reinforce_loo", "arm", "disarm"]


@pytest.mark.parametrize("name", EXACT_VARIANCE)
def test_exact_variance_checks_logits_and_f_like_the_estimators(name):
    """exact_variance used to take integer logits, turn NaN/inf logits or values into NaN
    moments without a word, accept integer values, and fail on f's wrong shape without
    saying what came back (or with a bare device error)."""
    f = lambda z: ((z - 0.3) ** 2).sum(-1)  # noqa: E731
    with pytest.raises(TypeError, match=r"logits must have a floating-point dtype; got "
                                        r"torch.int64"):
        diagnostics.exact_variance(name, f, torch.tensor([0, 1]))
    for bad in [float("nan"), float("inf")]:
        with pytest.raises(ValueError, match=r"logits must be finite; got 1 NaN/inf"):
            diagnostics.exact_variance(name, f, torch.tensor([0.0, bad], dtype=DTYPE))
    with pytest.raises(ValueError, match=r"logits\['b'\] must be finite"):
        diagnostics.exact_variance(
            name, lambda z: z["a"].sum(-1), {"a": torch.zeros(1), "b": torch.tensor([-math.inf])})
    with pytest.raises(ValueError, match=r"f must return finite values; got 4 NaN/inf"):
        diagnostics.exact_variance(name, lambda z: f(z) * math.nan, torch.zeros(2))
    with pytest.raises(ValueError, match=r"expected shape \(4,\).*; got shape \(4, 2\)"):
        diagnostics.exact_variance(name, lambda z: z, torch.zeros(2))
    with pytest.raises(TypeError, match=r"floating-point tensor.*; got dtype torch.int64"):
        diagnostics.exact_variance(name, lambda z: z.sum(-1).long(), torch.zeros(2))
    with pytest.raises(TypeError, match=r"torch.Tensor of shape \(4,\).*; got float"):
        diagnostics.exact_variance(name, lambda z: 1.0, torch.zeros(2))
    with pytest.raises(ValueError, match=r"f returned a tensor on meta; expected cpu"):
        diagnostics.exact_variance(
            name, lambda z: torch.zeros(z.shape[0], device="meta"), torch.zeros(2))
    with pytest.raises(TypeError, match=r"f must be callable; got int"):
        diagnostics.exact_variance(name, 3, torch.zeros(2))
    # value checks follow the estimator's validate_args
    est = binopt.get_estimator(name, validate_args=False)
    out = diagnostics.exact_variance(est, f, torch.tensor([0.0, math.nan], dtype=DTYPE))
    assert torch.isnan(out["mean"]).all()


@pytest.mark.parametrize("name", EXACT_VARIANCE)
def test_exact_variance_of_no_units_and_of_leaves_of_several_dtypes(name):
    """No unit: empty moments (ARM and DisARM failed inside cartesian_prod). Leaves of
    different dtypes: f sees each in its own dtype, as from the estimators (all were cast to
    the first leaf's)."""
    out = diagnostics.exact_variance(name, lambda z: z.sum(-1) + 1.0, torch.zeros(0))
    assert out["mean"].shape == (0,) and out["variance"].shape == (0,)

    logits = [torch.tensor([0.4]), torch.tensor([-0.7], dtype=DTYPE)]
    seen = []

    def f(z):
        seen.append([leaf.dtype for leaf in z])
        return (z[0][:, 0].double() - 0.3) ** 2 + z[0][:, 0] * z[1][:, 0]

    out = diagnostics.exact_variance(name, f, logits)
    assert seen == [[torch.float32, DTYPE]]
    exact = binopt.exact_grad(f, [leaf.double() for leaf in logits])
    for got, want in zip(out["mean"], exact):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_monte_carlo_of_one_estimate_has_no_variance():
    """One estimate says nothing about the spread: NaN (as torch.var), not the 0 it used to
    report, which reads as an exact estimator."""
    f = lambda z: ((z - 0.3) ** 2).sum(-1)  # noqa: E731
    stats = diagnostics.monte_carlo("arm", f, torch.zeros(2, dtype=DTYPE), num_samples=1)
    assert torch.isnan(stats.variance).all() and torch.isnan(stats.std_error).all()
    assert torch.isfinite(stats.mean).all()
    two = diagnostics.monte_carlo("arm", f, torch.zeros(2, dtype=DTYPE), num_samples=2)
    assert torch.isfinite(two.variance).all()


# ------------------------------------------------- a user's own estimator: bias verdict
class ScaledARM(binopt.ARM):
    """ARM times 1.1: a deliberately biased estimator (10 % too large on average)."""

    name = "scaled_arm_for_tests"
    unbiased = False

    @staticmethod
    def _coefficients(diff, u, alpha):
        return 1.1 * diff * (u - 0.5)


class ConstantBaseline(binopt.Estimator):
    """REINFORCE with a constant baseline (docs/api.md's example): unbiased for any b."""

    name = "constant_baseline_for_tests"
    unbiased = True

    def __init__(self, b: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.b = b

    def _estimate(self, call_f, alphas):
        from binopt.estimators.base import attach_gradient

        probs = [torch.sigmoid(a.detach()) for a in alphas]
        z = [(self._uniform(tuple(a.shape), a) < p).to(a.dtype) for a, p in zip(alphas, probs)]
        values = call_f(z)
        centred = values.detach() - self.b
        coef = [centred.reshape((-1,) + (1,) * (zk.dim() - 1)) * (zk - p)
                for zk, p in zip(z, probs)]
        return attach_gradient(values, coef, alphas)


class ConstantGradient(binopt.Estimator):
    """Returns 0.1 on every coordinate, whatever f: zero variance, and biased."""

    name = "constant_gradient_for_tests"

    def _estimate(self, call_f, alphas):
        from binopt.estimators.base import attach_gradient

        values = call_f([torch.zeros_like(a.detach()) for a in alphas])
        return attach_gradient(values, [torch.full_like(a, 0.1) for a in alphas], alphas)


TOY_LOGITS = torch.tensor([0.0, 1.0, -1.0, 0.5], dtype=DTYPE)


def toy_f(z):
    return ((z - 0.49) ** 2).sum(-1)


def test_bias_verdict_flags_a_biased_estimator_and_passes_unbiased_ones():
    """``bias`` decides by itself (Bonferroni over the units): ARM x 1.1 is flagged, ARM,
    DisARM and REINFORCE with a constant baseline are not. At 40,000 estimates the 10 % bias
    is about 10 standard errors on the largest unit, against a critical |z| of 4.2."""
    n, dim = 40_000, TOY_LOGITS.numel()
    estimators = {
        "scaled": ScaledARM, "arm": binopt.ARM, "disarm": binopt.DisARM,
        "baseline": lambda generator: ConstantBaseline(b=0.7, generator=generator),
    }
    res = {k: diagnostics.bias(make(generator=torch.Generator().manual_seed(3)), toy_f,
                               TOY_LOGITS, num_samples=n)
           for k, make in estimators.items()}
    for key, r in res.items():
        bound, z_crit = diagnostics.standard_error_bound(r["std_error"], dim)
        torch.testing.assert_close(r["bound"], bound, rtol=0.0, atol=0.0)
        largest = float(r["z"].abs().max())
        assert r["p_value"] == pytest.approx(min(1.0, 2 * dim * norm.sf(largest)), rel=1e-9)
        assert r["biased"] == (largest > z_crit) == (r["p_value"] < 1e-4), key
    assert res["scaled"]["biased"] and res["scaled"]["p_value"] < 1e-12
    for key in ("arm", "disarm", "baseline"):
        assert not res[key]["biased"], (key, res[key]["z"])


def test_bias_verdict_for_estimators_without_spread():
    """A zero-variance estimator has no z-score (NaN); the verdict still tells exact
    enumeration (unbiased) from a constant that is wrong (biased)."""
    res = diagnostics.bias("exact", toy_f, TOY_LOGITS, num_samples=3)
    assert torch.isnan(res["z"]).all()
    assert res["p_value"] == 1.0 and not res["biased"]
    res = diagnostics.bias(ConstantGradient(), toy_f, TOY_LOGITS, num_samples=3)
    assert torch.equal(res["std_error"], torch.zeros(4, dtype=DTYPE))
    assert res["p_value"] == 0.0 and res["biased"]


def test_bias_and_standard_error_bound_check_their_arguments():
    with pytest.raises(ValueError, match=r"bias needs num_samples >= 2.*got 1"):
        diagnostics.bias("arm", toy_f, TOY_LOGITS, num_samples=1)
    for bad in [0.0, 1.0, -0.1]:
        with pytest.raises(ValueError, match=rf"family_alpha must be in \(0, 1\); got {bad}"):
            diagnostics.bias("arm", toy_f, TOY_LOGITS, num_samples=4, family_alpha=bad)
        with pytest.raises(ValueError, match=r"family_alpha must be in \(0, 1\)"):
            diagnostics.standard_error_bound(torch.ones(2), 2, family_alpha=bad)
    with pytest.raises(TypeError, match=r"family_alpha must be a number in \(0, 1\); got '1e-3'"):
        diagnostics.standard_error_bound(torch.ones(2), 2, family_alpha="1e-3")
    with pytest.raises(ValueError, match=r"num_tests must be >= 1; got 0"):
        diagnostics.standard_error_bound(torch.ones(2), 0)
    with pytest.raises(TypeError, match=r"num_tests must be an int >= 1; got 2.0"):
        diagnostics.standard_error_bound(torch.ones(2), 2.0)


def test_exact_variance_refuses_subclasses_that_change_the_estimate():
    """ARM x 1.1 subclasses ARM: exact_variance returned ARM's moments for it (its mean is
    1.1 times, its variance 1.21 times those), silently wrong; now it refuses."""
    with pytest.raises(TypeError, match=r"ScaledARM subclasses it but overrides _coefficients"
                                        r".*monte_carlo"):
        diagnostics.exact_variance(ScaledARM(), toy_f, TOY_LOGITS)

    class Noisy(binopt.REINFORCE):
        def _estimate(self, call_f, alphas):
            return super()._estimate(call_f, alphas)

    with pytest.raises(TypeError, match=r"REINFORCE; Noisy subclasses it but overrides _estimate"):
        diagnostics.exact_variance(Noisy(), toy_f, TOY_LOGITS)
    with pytest.raises(TypeError, match=r"supports REINFORCE.*ConstantBaseline.*monte_carlo"):
        diagnostics.exact_variance(ConstantBaseline(), toy_f, TOY_LOGITS)

    class Renamed(binopt.DisARM):  # the same estimator under another name: still known
        name = "renamed_disarm_for_tests"

    got = diagnostics.exact_variance(Renamed(), toy_f, TOY_LOGITS)
    want = diagnostics.exact_variance("disarm", toy_f, TOY_LOGITS)
    torch.testing.assert_close(got["variance"], want["variance"], rtol=0.0, atol=0.0)
