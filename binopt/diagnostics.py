"""Bias and variance of gradient estimators.

- :func:`monte_carlo`: mean, per-coordinate variance and standard error of an estimator from
  many independent estimates (computed in vectorized chunks).
- :func:`bias`: the Monte Carlo mean against the exact gradient, with z-scores and a verdict
  (a Bonferroni-corrected p-value over the coordinates), for any estimator, a user's own
  included.
- :func:`exact_variance`: the exact per-coordinate mean and variance of ONE estimate for
  REINFORCE (no or constant baseline), REINFORCE leave-one-out, ARM and DisARM on small
  problems. ``z`` is enumerated; for ARM and DisARM the uniform ``u`` is integrated exactly:
  on each coordinate the samples only change at ``u = pi`` and ``u = 1 - pi``, so ``[0, 1]^D``
  splits into ``3^D`` boxes on which ``f`` is constant and the ``(u - 1/2)`` weights integrate
  in closed form.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ._structure import Structure, flatten, leaf_names
from ._validation import check_f_output, check_logits, check_num_samples
from .estimators import ARM, REINFORCE, REINFORCELOO, DisARM, Estimator, Exact, get_estimator
from .estimators.exact import all_states


@dataclass
class GradientStats:
    """Summary of ``num_samples`` independent gradient estimates.

    Attributes hold the logits' structure (detached float64 tensors).
    """

    mean: Structure
    variance: Structure
    std_error: Structure
    num_samples: int
    evaluations_per_estimate: int

    def flat(self, field: str) -> torch.Tensor:
        """A field flattened into one 1-D tensor (structure order)."""
        leaves, _ = flatten(getattr(self, field))
        return torch.cat([leaf.reshape(-1) for leaf in leaves])


def monte_carlo(
    estimator: Estimator | str,
    f: Callable[[Structure], torch.Tensor],
    logits: Structure,
    num_samples: int = 10_000,
    chunk_size: int = 10_000,
) -> GradientStats:
    """Mean, variance and standard error of ``num_samples`` independent estimates.

    Parameters
    ----------
    estimator : Estimator or str
    f : callable
        Objective following the estimator contract.
    logits : tensor, list or dict of tensors
    num_samples : int
        Independent estimates.
    chunk_size : int
        Estimates computed per vectorized call (bounds memory).

    Returns
    -------
    GradientStats
        Mean, per-coordinate sample variance and standard error of the mean; multiply the
        variance by ``evaluations_per_estimate`` to compare estimators at equal cost.
    """
    check_num_samples(num_samples)
    check_num_samples(chunk_size, "chunk_size")
    est = get_estimator(estimator)
    leaves, rebuild = flatten(logits)
    # per-chunk means and centred sums of squares, merged as in Chan, Golub & LeVeque
    # (1979): sum(g^2) - n m^2 would cancel catastrophically when |mean| >> spread
    mean = [torch.zeros(leaf.shape, dtype=torch.float64, device=leaf.device) for leaf in leaves]
    m2 = [m.clone() for m in mean]
    done = 0
    while done < num_samples:
        n = min(chunk_size, num_samples - done)
        g_leaves, _ = flatten(est.grad(f, logits, num_samples=n))
        for k, g in enumerate(g_leaves):
            g = g.double()
            # around the first estimate: identical estimates then have exactly their value
            # as mean and a variance of exactly 0 (g.mean of three 0.1 is 0.1 + 1 ulp)
            chunk_mean = g[0] + (g - g[0]).mean(0)
            chunk_m2 = ((g - chunk_mean) ** 2).sum(0)
            delta = chunk_mean - mean[k]
            total = done + n
            mean[k] = mean[k] + delta * (n / total)
            m2[k] = m2[k] + chunk_m2 + delta * delta * (done * n / total)
        done += n
    # the unbiased sample variance; one estimate says nothing about the spread: NaN (as
    # torch.var), not 0, which would read as an exact estimator (and made bias's z NaN)
    var = [m / (num_samples - 1) if num_samples > 1 else torch.full_like(m, float("nan"))
           for m in m2]
    se = [(v / num_samples).sqrt() for v in var]
    return GradientStats(
        mean=rebuild(mean),
        variance=rebuild(var),
        std_error=rebuild(se),
        num_samples=num_samples,
        evaluations_per_estimate=est.evaluations_per_estimate,
    )


def exact_gradient_flat(f, logits: Structure) -> torch.Tensor:
    """The exact gradient flattened to one float64 vector (structure order)."""
    g = Exact().grad(f, logits, num_samples=1)
    leaves, _ = flatten(g)
    return torch.cat([leaf[0].reshape(-1) for leaf in leaves]).double()


def bias(
    estimator: Estimator | str,
    f: Callable[[Structure], torch.Tensor],
    logits: Structure,
    num_samples: int = 10_000,
    chunk_size: int = 10_000,
    family_alpha: float = 1e-4,
) -> dict[str, Any]:
    """Monte Carlo bias against the exact gradient, with z-scores and a verdict.

    Every coordinate is one two-sided z-test of "the mean estimate equals the exact
    gradient"; the verdict corrects for testing all ``D`` of them (Bonferroni), so an
    unbiased estimator is flagged with probability at most ``family_alpha``.

    Parameters
    ----------
    estimator : Estimator or str
    f : callable
        Objective following the estimator contract (deterministic: the exact gradient is
        computed by enumeration, so ``D <= 20``).
    logits : tensor, list or dict of tensors
    num_samples : int
        Independent estimates (at least 2: a standard error needs a spread). A bias is
        detectable when it exceeds a few ``std_error``, which shrink as
        ``1 / sqrt(num_samples)``.
    chunk_size : int
        Estimates computed per vectorized call (bounds memory).
    family_alpha : float
        Probability, in ``(0, 1)``, of flagging an unbiased estimator on some coordinate.

    Returns
    -------
    dict
        - ``bias``: mean estimate minus the exact gradient (flat float64 tensor, structure
          order);
        - ``std_error``: its standard error; ``z``: ``bias / std_error`` (``nan`` where
          the standard error is 0, e.g. for ``exact``);
        - ``bound``: ``z_crit * std_error``, the Bonferroni bound (see
          :func:`standard_error_bound`): a bias within it is not detectable at this
          ``num_samples``;
        - ``p_value``: the Bonferroni-corrected p-value of the largest ``|z|``,
          ``min(1, 2 D P(Z > max |z|))``; coordinates with no spread (standard error 0)
          count as ``z = 0`` when ``|bias| <= sqrt(eps) * max(1, |exact|)`` (rounding, in
          the least precise dtype of the logits) and as ``|z| = inf`` otherwise;
        - ``biased``: ``p_value < family_alpha``;
        - ``exact`` (flat) and ``stats`` (the :class:`GradientStats`).

    Raises
    ------
    ValueError
        ``num_samples < 2``, ``family_alpha`` outside ``(0, 1)``, or more units than
        :func:`binopt.exact_grad` enumerates.
    """
    n = check_num_samples(num_samples)
    if n < 2:
        raise ValueError(f"bias needs num_samples >= 2 for a standard error; got {n}")
    _check_family_alpha(family_alpha)
    stats = monte_carlo(estimator, f, logits, n, chunk_size)
    exact = exact_gradient_flat(f, logits).to(stats.flat("mean").device)
    b = stats.flat("mean") - exact
    se = stats.flat("std_error")
    z = torch.where(se > 0, b / se.clamp_min(1e-300), torch.full_like(b, float("nan")))
    bound, _ = standard_error_bound(se, max(b.numel(), 1), family_alpha)
    # coordinates without spread: exact to rounding (z = 0) or certainly biased (z = inf)
    eps = max(torch.finfo(leaf.dtype).eps for leaf in flatten(logits)[0])
    rounding = eps**0.5 * exact.abs().clamp_min(1.0)
    z_test = torch.where(se > 0, z, torch.where(b.abs() <= rounding, 0.0, float("inf")))
    p_value = _family_p_value(z_test)
    return {
        "bias": b,
        "std_error": se,
        "z": z,
        "bound": bound,
        "p_value": p_value,
        "biased": p_value < family_alpha,
        "exact": exact,
        "stats": stats,
    }


def _family_p_value(z: torch.Tensor) -> float:
    """Bonferroni-corrected two-sided p-value of the largest ``|z|`` among ``z.numel()``."""
    if z.numel() == 0:
        return 1.0
    largest = float(z.abs().max())
    return min(1.0, z.numel() * math.erfc(largest / math.sqrt(2.0)))


def _check_family_alpha(family_alpha: object) -> None:
    if isinstance(family_alpha, bool) or not isinstance(family_alpha, (int, float)):
        raise TypeError(f"family_alpha must be a number in (0, 1); got {family_alpha!r}")
    if not 0.0 < family_alpha < 1.0:
        raise ValueError(f"family_alpha must be in (0, 1); got {family_alpha}")


# ----------------------------------------------------------------------------- exact variance
def _table(est: Estimator, f, logits: Structure, max_dim: int):
    """``f`` on all states (float64) plus flattened probabilities and the rebuild helper.

    The logits and ``f``'s values get the checks the estimators give them (``est``'s
    ``validate_args`` decides the finiteness checks): a NaN logit or value would otherwise
    turn every moment into NaN without a word.
    """
    if not callable(f):
        raise TypeError(f"f must be callable; got {type(f).__name__}")
    leaves, rebuild = flatten(logits)
    names = None if isinstance(logits, torch.Tensor) else leaf_names(logits)
    check_logits(leaves, est.validate_args, names=names)
    sizes = [leaf.numel() for leaf in leaves]
    dim = sum(sizes)
    if dim > max_dim:
        raise ValueError(f"exact_variance enumerates at most {max_dim} units here; got {dim}")
    ref = leaves[0]
    states = all_states(dim, device=ref.device, dtype=torch.float64)
    parts = states.split(sizes, dim=1)
    # copies, each leaf in its own dtype: f may modify its samples in place, and ``states``
    # is used after it
    samples = [p.reshape((p.shape[0],) + tuple(leaf.shape)).to(leaf.dtype, copy=True)
               for p, leaf in zip(parts, leaves)]
    with torch.no_grad():
        values = check_f_output(f(rebuild(samples)), 2**dim, ref.device, est.validate_args)
    alpha = torch.cat([leaf.detach().reshape(-1).double() for leaf in leaves])
    return values.detach().double(), states, alpha, leaves, rebuild


def _rebuild_flat(flat: torch.Tensor, leaves, rebuild):
    out, start = [], 0
    for leaf in leaves:
        out.append(flat[start : start + leaf.numel()].reshape(leaf.shape))
        start += leaf.numel()
    return rebuild(out)


def _state_index(z: torch.Tensor) -> torch.Tensor:
    dim = z.shape[-1]
    bits = 2 ** torch.arange(dim - 1, -1, -1, device=z.device)
    return (z.long() * bits).sum(-1)


def exact_variance(
    estimator: Estimator | str, f: Callable[[Structure], torch.Tensor], logits: Structure
) -> dict[str, Any]:
    """Exact per-coordinate mean and variance of ONE estimate of a Monte Carlo estimator.

    Supported: :class:`~binopt.REINFORCE` (no baseline, or its current moving-average value
    used as a constant), :class:`~binopt.REINFORCELOO` (``D * K <= 16``), :class:`~binopt.ARM`
    and :class:`~binopt.DisARM` (``D <= 12``), and subclasses of them that do not change
    how an estimate is computed. ``f`` must be deterministic.

    Parameters
    ----------
    estimator : Estimator or str
    f : callable
        Deterministic objective following the estimator contract.
    logits : tensor, list or dict of tensors

    Returns
    -------
    dict
        ``mean`` and ``variance``, each in the logits' structure (float64). The variance
        of an average of ``n`` independent estimates is ``variance / n``.

    Raises
    ------
    TypeError
        Another estimator (a user's own, or a subclass overriding how the estimate is
        computed): measure it with :func:`monte_carlo`.
    ValueError
        More units than the limits above, or logits and values of ``f`` failing the
        estimators' checks.
    """
    est = get_estimator(estimator)
    family = _exact_family(est)
    if family in (ARM, DisARM):
        values, _, alpha, leaves, rebuild = _table(est, f, logits, 12)
        mean, second = _antithetic_moments(family, values, alpha)
    elif family is REINFORCELOO:
        k = est.num_samples
        n_units = sum(leaf.numel() for leaf in flatten(logits)[0])
        if n_units * k > 16:
            raise ValueError(f"exact_variance for leave-one-out needs D*K <= 16; got {n_units * k}")
        values, states, alpha, leaves, rebuild = _table(est, f, logits, 16)
        mean, second = _loo_moments(values, states, alpha, k)
    else:  # REINFORCE
        values, states, alpha, leaves, rebuild = _table(est, f, logits, 20)
        b = 0.0 if est.baseline_value is None or est.baseline is None else float(est.baseline_value)
        pi = torch.sigmoid(alpha)
        q = _probs(states, alpha)
        score = states - pi
        g = (values - b).unsqueeze(1) * score  # (2^D, D)
        mean = (q.unsqueeze(1) * g).sum(0)
        second = (q.unsqueeze(1) * g * g).sum(0)
    var = (second - mean * mean).clamp_min(0)
    return {
        "mean": _rebuild_flat(mean, leaves, rebuild),
        "variance": _rebuild_flat(var, leaves, rebuild),
    }


#: Methods that make an estimate what it is: a subclass overriding one of them computes
#: another estimator, whose moments :func:`exact_variance` does not know.
_ESTIMATE_METHODS = (
    "_estimate", "_coefficients", "_current_baseline", "_uniform", "_open_uniform", "_run",
    "grad",
)


def _exact_family(est: Estimator) -> type[Estimator]:
    """The built-in estimator whose moments ``exact_variance`` computes for ``est``.

    A subclass counts as its base only when it leaves the estimate alone (it may add a
    name, options or a ``repr``); a subclass that changes it (ARM with another coefficient)
    used to get the moments of its base, silently wrong.
    """
    for family in (ARM, DisARM, REINFORCELOO, REINFORCE):
        if not isinstance(est, family):
            continue
        changed = [m for m in _ESTIMATE_METHODS
                   if hasattr(family, m) and getattr(type(est), m) is not getattr(family, m)]
        if changed:
            raise TypeError(
                f"exact_variance knows the moments of binopt's {family.__name__}; "
                f"{type(est).__name__} subclasses it but overrides {', '.join(changed)}, so "
                "its estimates may differ: measure it with monte_carlo instead"
            )
        return family
    raise TypeError(
        "exact_variance supports REINFORCE, REINFORCELOO, ARM and DisARM; got "
        f"{est!r} (measure other estimators with monte_carlo)"
    )


def _probs(states: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    logsigmoid = torch.nn.functional.logsigmoid
    log_q = states @ logsigmoid(alpha) + (1 - states) @ logsigmoid(-alpha)
    return log_q.exp()


def _loo_moments(values, states, alpha, k: int):
    pi = torch.sigmoid(alpha)
    q = _probs(states, alpha)
    n_states = states.shape[0]
    # All (2^D)^K ordered K-tuples of states at once (D * K <= 16: at most 65536 rows).
    idx = torch.cartesian_prod(*[torch.arange(n_states)] * k).reshape(-1, k)  # (M, K)
    fv = values[idx]  # (M, K)
    weight = q[idx].prod(1)  # (M,)
    centred = fv - (fv.sum(1, keepdim=True) - fv) / (k - 1)
    g = (centred.unsqueeze(2) * (states[idx] - pi)).sum(1) / k  # (M, D)
    mean = (weight.unsqueeze(1) * g).sum(0)
    second = (weight.unsqueeze(1) * g * g).sum(0)
    return mean, second


def _antithetic_moments(family: type[Estimator], values: torch.Tensor, alpha: torch.Tensor):
    """Moments of ARM/DisARM by exact integration over the ``3^D`` boxes of ``u``."""
    dim = alpha.numel()
    if dim == 0:  # no unit, no gradient (and cartesian_prod of nothing is an error)
        return alpha.clone(), alpha.clone()
    pi = torch.sigmoid(alpha)
    lo, hi = torch.minimum(pi, 1 - pi), torch.maximum(pi, 1 - pi)
    # Interval edges per coordinate: [0, lo), [lo, hi), [hi, 1].
    edges = torch.stack([torch.zeros_like(lo), lo, hi, torch.ones_like(lo)], dim=1)  # (D, 4)
    a, b = edges[:, :3], edges[:, 1:]  # (D, 3)
    length = b - a
    mid = (a + b) / 2
    # Integrals of (u - 1/2) and (u - 1/2)^2 over each interval.
    m1 = ((b - 0.5) ** 2 - (a - 0.5) ** 2) / 2
    m2 = ((b - 0.5) ** 3 - (a - 0.5) ** 3) / 3
    cells = torch.cartesian_prod(*[torch.arange(3)] * dim).reshape(-1, dim)  # (3^D, D)
    cols = torch.arange(dim)
    u_mid = mid[cols, cells]  # representative u inside each box
    z1 = (u_mid > 1 - pi).double()
    z2 = (u_mid < pi).double()
    f1 = values[_state_index(z1)]
    f2 = values[_state_index(z2)]
    lens = length[cols, cells]  # (C, D)
    prob = lens.prod(1)
    if family is ARM:
        diff = f1 - f2
        # prod over j != i of lengths = prob / len_i, computed without dividing by zero
        others = torch.stack([_prod_except(lens, i) for i in range(dim)], dim=1)
        mean = (diff.unsqueeze(1) * m1[cols, cells] * others).sum(0)
        second = (diff.unsqueeze(1) ** 2 * m2[cols, cells] * others).sum(0)
    else:
        diff = 0.5 * (f2 - f1)
        sign = 1 - 2 * z1
        g = diff.unsqueeze(1) * sign * (z1 != z2).double() * torch.sigmoid(alpha.abs())
        mean = (prob.unsqueeze(1) * g).sum(0)
        second = (prob.unsqueeze(1) * g * g).sum(0)
    return mean, second


def _prod_except(lens: torch.Tensor, i: int) -> torch.Tensor:
    if lens.shape[1] == 1:
        return torch.ones(lens.shape[0], dtype=lens.dtype, device=lens.device)
    keep = [j for j in range(lens.shape[1]) if j != i]
    return lens[:, keep].prod(1)


def standard_error_bound(
    std_error: torch.Tensor, num_tests: int, family_alpha: float = 1e-4
) -> tuple[torch.Tensor, float]:
    """Two-sided Bonferroni bound for ``num_tests`` simultaneous z-tests.

    Parameters
    ----------
    std_error : torch.Tensor
        Standard errors of the tested quantities.
    num_tests : int
        Number of simultaneous tests (at least 1), e.g. the number of coordinates.
    family_alpha : float
        Probability, in ``(0, 1)``, that any of the tests fails when all hypotheses hold.

    Returns
    -------
    (torch.Tensor, float)
        ``(z * std_error, z)`` with ``z = Phi^-1(1 - family_alpha / (2 num_tests))``.
    """
    if isinstance(num_tests, bool) or not isinstance(num_tests, int):
        raise TypeError(f"num_tests must be an int >= 1; got {num_tests!r}")
    if num_tests < 1:
        raise ValueError(f"num_tests must be >= 1; got {num_tests}")
    _check_family_alpha(family_alpha)
    from scipy.stats import norm

    z = float(norm.isf(family_alpha / (2 * num_tests)))
    return z * std_error, z


__all__ = [
    "GradientStats",
    "bias",
    "exact_gradient_flat",
    "exact_variance",
    "monte_carlo",
    "standard_error_bound",
]
