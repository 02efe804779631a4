"""Property tests: every estimator declared unbiased is unbiased.

For random problems (``D`` in ``[1, 5]``, logits in ``[-4, 4]``, ``f`` a random table of
values over ``{0, 1}^D``, random structures and parameterizations) the Monte Carlo mean of
``NUM_ESTIMATES`` independent estimates must lie within ``z`` standard errors of the exact
gradient, per coordinate.

The statistical budget
----------------------
Each coordinate check is a two-sided z-test. The module runs at most ``NUM_CHECKS`` of them
(every statistical test x its parametrizations x ``max_examples`` x ``MAX_DIM``
coordinates), and ``z = norm.isf(FAMILY_ALPHA / (2 NUM_CHECKS))`` (Bonferroni), so a correct
estimator fails anywhere in the module with probability at most ``FAMILY_ALPHA``.

The standard error used is ``max(exact SE, sample SE)``:

- the exact SE, ``sqrt(exact_variance / N)``, is what the CLT needs;
- but with a table whose mass sits on one rare state (hypothesis likes tables that are zero
  almost everywhere) the mean of ``N`` estimates is a Poisson count, not a normal: when the
  rare state shows up once, the error is ``~|f|/N`` while the exact SE is
  ``~sqrt(q)|f|/sqrt(N)``, far smaller. The sample SE is then ``~|f|/N`` and covers it.
  When the rare state does not show up, the sample SE is 0 and the exact SE covers the
  ``O(q)`` error. In the normal regime both agree, so the maximum keeps the level.

torch randomness comes from a ``torch.Generator`` seeded by hypothesis (DESIGN.md, 3b).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy.stats import norm

import binopt
from binopt import diagnostics
from binopt.parameterizations import (
    CallableParameterization,
    HardSigmoid,
    ScaledSigmoid,
    Sigmoid,
)

DTYPE = torch.float64
MAX_DIM = 5
NUM_ESTIMATES = 20_000
FAMILY_ALPHA = 1e-3

# Every registered unbiased estimator, in every configuration the issue names.
CASES: dict[str, Callable[[torch.Generator | None], binopt.Estimator]] = {
    "reinforce": lambda g: binopt.REINFORCE(generator=g),
    "reinforce_moving_average": lambda g: binopt.REINFORCE(
        baseline="moving_average", decay=0.5, generator=g
    ),
    "reinforce_loo_k2": lambda g: binopt.REINFORCELOO(num_samples=2, generator=g),
    "reinforce_loo_k3": lambda g: binopt.REINFORCELOO(num_samples=3, generator=g),
    "arm": lambda g: binopt.ARM(generator=g),
    "disarm": lambda g: binopt.DisARM(generator=g),
    "exact": lambda g: binopt.Exact(generator=g),
}
MC_CASES = [name for name in CASES if name != "exact"]

PARAMETERIZATIONS = {
    "sigmoid": (Sigmoid(), (-4.0, 4.0)),
    "scaled_sigmoid_k7": (ScaledSigmoid(k=7.0), (-0.6, 0.6)),
    # k = 1: pi = phi / 6 + 1/2, saturated (exactly 0 or 1) for |phi| >= 3.
    "hard_sigmoid": (HardSigmoid(), (-4.5, 4.5)),
    # the probit gate, as a user callable
    "callable_probit": (CallableParameterization(torch.special.ndtr), (-2.0, 2.0)),
}

# statistical tests in this module: table, structure, theta (one per Monte Carlo case each)
# and parameterization (one per Monte Carlo case and parameterization)
NUM_CHECKS = len(MC_CASES) * (3 + len(PARAMETERIZATIONS)) * settings().max_examples * MAX_DIM
Z = float(norm.isf(FAMILY_ALPHA / (2 * NUM_CHECKS)))


# ------------------------------------------------------------------------------ helpers
def table_f(table: torch.Tensor, dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f(z) = table[z as a binary number, most significant bit first]``; ``z``: (S, dim)."""
    bits = 2 ** torch.arange(dim - 1, -1, -1)

    def f(z: torch.Tensor) -> torch.Tensor:
        assert z.shape[1:] == (dim,)
        return table[(z.round().long() * bits).sum(-1)]

    return f


def oracle_grad(table, alpha) -> np.ndarray:
    """DESIGN.md 1, independently of binopt: sum_z q(z) f(z) (z_i - sigmoid(alpha_i))."""
    table = np.asarray(table, dtype=np.float64)
    alpha = np.asarray(alpha, dtype=np.float64)
    pi = 1.0 / (1.0 + np.exp(-alpha))
    grad = np.zeros_like(alpha)
    for k, z in enumerate(itertools.product([0.0, 1.0], repeat=alpha.size)):
        z = np.array(z)
        q = np.prod(np.where(z == 1.0, pi, 1.0 - pi))
        grad += q * table[k] * (z - pi)
    return grad


def state_probs(alpha: torch.Tensor) -> torch.Tensor:
    """q(z) for every state, in the order of :func:`table_f`."""
    pi = torch.sigmoid(alpha)
    states = torch.tensor(list(itertools.product([0.0, 1.0], repeat=alpha.numel())), dtype=DTYPE)
    return torch.where(states == 1.0, pi, 1.0 - pi).prod(1)


def warm_up(est: binopt.Estimator, f, logits) -> None:
    """Give a moving-average baseline a non-trivial value (no-op for other estimators)."""
    if getattr(est, "baseline", None) == "moving_average":
        for _ in range(3):
            est.surrogate(f, logits, num_samples=4)
        assert est.baseline_value is not None


def assert_within(mean, exact, se, *, scale: float, what: str) -> None:
    """``|mean - exact| <= Z se`` per coordinate, plus round-off slack."""
    mean, exact, se = (torch.as_tensor(t, dtype=DTYPE).reshape(-1) for t in (mean, exact, se))
    atol = 1e-9 * (1.0 + scale)
    err = (mean - exact).abs()
    bad = err > Z * se + atol
    assert not bool(bad.any()), (
        f"{what}: Monte Carlo mean not within {Z:.2f} standard errors of the exact gradient\n"
        f"  mean  = {mean.tolist()}\n  exact = {exact.tolist()}\n  se    = {se.tolist()}\n"
        f"  |err|/se = {(err / se.clamp_min(1e-300)).tolist()}"
    )


def sample_and_exact_se(grads: torch.Tensor, exact_var: torch.Tensor | None) -> torch.Tensor:
    n = grads.shape[0]
    se = grads.std(0) / math.sqrt(n)
    if exact_var is not None:
        se = torch.maximum(se, (exact_var / n).sqrt())
    return se


def exact_var_flat(est, f, logits) -> torch.Tensor:
    leaves, _ = binopt._structure.flatten(diagnostics.exact_variance(est, f, logits)["variance"])
    return torch.cat([leaf.reshape(-1) for leaf in leaves])


# ----------------------------------------------------------------------------- strategies
finite = st.floats(-10.0, 10.0, allow_nan=False, allow_infinity=False, allow_subnormal=False)
logit_values = st.floats(-4.0, 4.0, allow_nan=False, allow_subnormal=False)
seeds = st.integers(0, 2**63 - 1)


@st.composite
def problems(draw, min_dim: int = 1):
    dim = draw(st.integers(min_dim, MAX_DIM))
    logits = draw(st.lists(logit_values, min_size=dim, max_size=dim))
    table = draw(st.lists(finite, min_size=2**dim, max_size=2**dim))
    return dim, logits, table


def _problem(dim, logits, table):
    return dim, torch.tensor(logits, dtype=DTYPE), torch.tensor(table, dtype=DTYPE)


# ---------------------------------------------------------------------------------- tests
def test_every_registered_unbiased_estimator_is_covered():
    unbiased = {n for n in binopt.available_estimators() if binopt.get_estimator(n).unbiased}
    covered = {make(None).name for make in CASES.values()}
    assert unbiased <= covered, f"not covered: {sorted(unbiased - covered)}"
    biased = {n for n in binopt.available_estimators() if not binopt.get_estimator(n).unbiased}
    assert biased == {"straight_through", "gumbel", "hard_concrete"}


def test_bonferroni_budget_is_about_five_standard_errors():
    assert 4.0 < Z < 7.0


@pytest.mark.parametrize("case", list(CASES))
@given(problem=problems(), seed=seeds)
@example(problem=(1, [0.0], [0.0, 1.0]), seed=0)
@example(problem=(3, [4.0, -4.0, 0.5], [0.0] * 7 + [10.0]), seed=1)  # mass on a rare state
@example(problem=(2, [1.0, -1.0], [3.0] * 4), seed=2)  # constant f: gradient exactly 0
def test_table_f_unbiased(case, problem, seed):
    dim, logits, table = _problem(*problem)
    f = table_f(table, dim)
    exact = binopt.exact_grad(f, logits)
    oracle = oracle_grad(table, logits)
    np.testing.assert_allclose(exact.numpy(), oracle, rtol=1e-9, atol=1e-12)

    est = CASES[case](torch.Generator().manual_seed(seed))
    warm_up(est, f, logits)
    if case == "exact":
        grads = est.grad(f, logits, num_samples=3)
        for g in grads:
            np.testing.assert_allclose(g.numpy(), oracle, rtol=1e-9, atol=1e-12)
        return
    exact_var = exact_var_flat(est, f, logits)
    grads = est.grad(f, logits, num_samples=NUM_ESTIMATES)
    assert grads.shape == (NUM_ESTIMATES, dim) and grads.dtype == DTYPE
    assert_within(
        grads.mean(0),
        exact,
        sample_and_exact_se(grads, exact_var),
        scale=float(table.abs().max()),
        what=f"{case} on D={dim}",
    )


@st.composite
def structured_problems(draw):
    """Two or three tensors of different shapes, 2 to 5 units in all, as a dict/list/tuple."""
    sizes = draw(st.lists(st.integers(1, 2), min_size=2, max_size=3).filter(lambda s: sum(s) <= 5))
    shapes = [((s,), (1, s), (s, 1))[k] for k, s in enumerate(sizes)]
    kind = draw(st.sampled_from(["dict", "list", "tuple"]))
    dim = sum(sizes)
    logits = draw(st.lists(logit_values, min_size=dim, max_size=dim))
    table = draw(st.lists(finite, min_size=2**dim, max_size=2**dim))
    return shapes, kind, logits, table


def _structure(kind, leaves):
    if kind == "dict":
        return {name: leaf for name, leaf in zip(["w", "b", "c"], leaves)}
    return list(leaves) if kind == "list" else tuple(leaves)


def _leaves(structure):
    return list(structure.values()) if isinstance(structure, dict) else list(structure)


@pytest.mark.parametrize("case", list(CASES))
@given(problem=structured_problems(), seed=seeds)
def test_structured_logits_sampled_jointly(case, problem, seed):
    shapes, kind, logits_list, table_list = problem
    dim = sum(math.prod(s) for s in shapes)
    flat_logits = torch.tensor(logits_list, dtype=DTYPE)
    table = torch.tensor(table_list, dtype=DTYPE)
    pieces = flat_logits.split([math.prod(s) for s in shapes])
    logits = _structure(kind, [p.reshape(s) for p, s in zip(pieces, shapes)])
    flat_f = table_f(table, dim)

    def f(z):
        assert type(z) is type(logits)
        leaves = _leaves(z)
        for leaf, shape in zip(leaves, shapes):
            assert leaf.shape[1:] == shape
        s = leaves[0].shape[0]
        return flat_f(torch.cat([leaf.reshape(s, -1) for leaf in leaves], dim=1))

    oracle = torch.as_tensor(oracle_grad(table, flat_logits))
    exact = binopt.exact_grad(f, logits)
    assert type(exact) is type(logits)
    exact_flat = torch.cat([g.reshape(-1) for g in _leaves(exact)])
    torch.testing.assert_close(exact_flat, oracle, rtol=1e-9, atol=1e-12)

    est = CASES[case](torch.Generator().manual_seed(seed))
    warm_up(est, f, logits)
    n = 2 if case == "exact" else NUM_ESTIMATES
    grads = est.grad(f, logits, num_samples=n)
    assert type(grads) is type(logits)
    if isinstance(logits, dict):
        assert list(grads) == list(logits)
    for g, shape in zip(_leaves(grads), shapes):
        assert g.shape == (n, *shape)
    flat = torch.cat([g.reshape(n, -1) for g in _leaves(grads)], dim=1)
    if case == "exact":
        torch.testing.assert_close(flat[0], oracle, rtol=1e-9, atol=1e-12)
        return
    assert_within(
        flat.mean(0),
        oracle,
        sample_and_exact_se(flat, exact_var_flat(est, f, logits)),
        scale=float(table.abs().max()),
        what=f"{case} on {kind} of shapes {shapes}",
    )


@st.composite
def phis(draw, name: str, dim: int):
    lo, hi = PARAMETERIZATIONS[name][1]
    values = st.floats(lo, hi, allow_nan=False, allow_subnormal=False)
    if name == "hard_sigmoid":
        # exactly saturated gates (pi = 0 or 1), at the kink and deep inside the flat parts
        values = st.one_of(values, st.sampled_from([-3.0, 3.0, -4.0, 4.0]))
    return draw(st.lists(values, min_size=dim, max_size=dim))


@pytest.mark.parametrize("param_name", list(PARAMETERIZATIONS))
@pytest.mark.parametrize("case", list(CASES))
@given(data=st.data())
def test_parameterization_gradient_unbiased(case, param_name, data):
    """``surrogate(f, g.logits(phi)).backward()`` estimates ``d E / d phi`` without bias."""
    param = PARAMETERIZATIONS[param_name][0]
    dim = data.draw(st.integers(1, MAX_DIM), label="dim")
    phi_list = data.draw(phis(param_name, dim), label="phi")
    if param_name == "hard_sigmoid":
        # at least one saturated gate in most examples
        sat = data.draw(st.sampled_from([None, -3.5, 3.0]), label="saturate phi[0]")
        if sat is not None:
            phi_list[0] = sat
    table = torch.tensor(
        data.draw(st.lists(finite, min_size=2**dim, max_size=2**dim), label="table"), dtype=DTYPE
    )
    seed = data.draw(seeds, label="seed")
    f = table_f(table, dim)
    phi = torch.tensor(phi_list, dtype=DTYPE, requires_grad=True)

    # exact d E / d phi through the parameterization, and the chain-rule factor d alpha / d phi
    binopt.exact_expectation(f, param.logits(phi)).backward()
    exact = phi.grad.clone()
    phi.grad = None
    alpha = param.logits(phi)
    jac = torch.autograd.grad(alpha.sum(), phi)[0]  # elementwise map: the diagonal
    alpha = alpha.detach()
    assert torch.isfinite(alpha).all() and torch.isfinite(jac).all()
    oracle = jac * torch.as_tensor(oracle_grad(table, alpha))
    torch.testing.assert_close(exact, oracle, rtol=1e-8, atol=1e-12)

    probs = param.probs(phi.detach())
    saturated = (probs == 0) | (probs == 1)
    assert (jac[saturated] == 0).all()

    est = CASES[case](torch.Generator().manual_seed(seed))
    warm_up(est, f, alpha)
    n = 2 if case == "exact" else NUM_ESTIMATES
    se = None
    if case != "exact":
        # before the surrogate call, which moves a moving-average baseline
        exact_var = exact_var_flat(est, f, alpha)
        se = jac.abs() * sample_and_exact_se(est.grad(f, alpha, num_samples=n), exact_var)
    est.surrogate(f, param.logits(phi), num_samples=n).backward()
    mc = phi.grad.detach()
    assert torch.isfinite(mc).all(), f"non-finite gradient {mc} at phi={phi_list}"
    # saturated gates: d E / d phi is exactly 0 and so is every estimate
    assert (mc[saturated] == 0).all() and (exact[saturated] == 0).all()
    if case == "exact":
        torch.testing.assert_close(mc, exact, rtol=1e-9, atol=1e-12)
        return
    assert_within(
        mc,
        exact,
        se,
        scale=float(table.abs().max() * jac.abs().max()),
        what=f"{case} with {param_name} at phi={phi_list}",
    )


@pytest.mark.parametrize("case", list(CASES))
@given(problem=problems(), theta=st.lists(st.floats(-2.0, 2.0), min_size=3, max_size=3), seed=seeds)
def test_parameters_inside_f_get_unbiased_gradients(case, problem, theta, seed):
    """``theta`` inside ``f`` gets ``E[grad_theta f]`` from ``surrogate(...).backward()``."""
    dim, logits, table = _problem(*problem)
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(2**dim, 3, generator=gen, dtype=DTYPE)
    bits = 2 ** torch.arange(dim - 1, -1, -1)
    theta_t = torch.tensor(theta, dtype=DTYPE, requires_grad=True)

    def f(z):
        idx = (z.round().long() * bits).sum(-1)
        linear = (h[idx, 1:] * theta_t[1:]).sum(-1)
        return (table[idx] + h[idx, 0]) * torch.tanh(theta_t[0]) + linear

    # per-state theta gradient, in closed form, and its exact variance under q
    per_state = torch.cat(
        [((table + h[:, 0]) * (1 - torch.tanh(theta_t[0].detach()) ** 2)).unsqueeze(1), h[:, 1:]],
        dim=1,
    )
    q = state_probs(logits)
    mean_state = (q.unsqueeze(1) * per_state).sum(0)
    var_state = (q.unsqueeze(1) * (per_state - mean_state) ** 2).sum(0)

    binopt.exact_expectation(f, logits).backward()
    exact = theta_t.grad.clone()
    torch.testing.assert_close(exact, mean_state, rtol=1e-9, atol=1e-12)
    theta_t.grad = None

    est = CASES[case](gen)
    warm_up(est, f, logits)
    n = 2 if case == "exact" else NUM_ESTIMATES
    lg = logits.clone().requires_grad_()
    est.surrogate(f, lg, num_samples=n).backward()
    assert lg.grad is not None and torch.isfinite(lg.grad).all()
    mc = theta_t.grad.detach()
    if case == "exact":
        torch.testing.assert_close(mc, exact, rtol=1e-9, atol=1e-12)
        return
    # Each estimate's theta-gradient averages m >= 1 draws that are each marginally q
    # (m = 1 REINFORCE, 2 ARM/DisARM pair, K leave-one-out); by Cauchy-Schwarz the average of
    # identically distributed terms has variance <= var_state, so this SE is conservative.
    se = (var_state / n).sqrt()
    assert_within(mc, exact, se, scale=float(per_state.abs().max()), what=f"theta grad, {case}")
