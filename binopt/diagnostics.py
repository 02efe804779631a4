"""Bias and variance of gradient estimators.

- :func:`monte_carlo`: mean, per-coordinate variance and standard error of an estimator from
  many independent estimates (computed in vectorized chunks).
- :func:`exact_variance`: the exact per-coordinate mean and variance of ONE estimate for
  REINFORCE (no or constant baseline), REINFORCE leave-one-out, ARM and DisARM on small
  problems. ``z`` is enumerated; for ARM and DisARM the uniform ``u`` is integrated exactly:
  on each coordinate the samples only change at ``u = pi`` and ``u = 1 - pi``, so ``[0, 1]^D``
  splits into ``3^D`` boxes on which ``f`` is constant and the ``(u - 1/2)`` weights integrate
  in closed form.
"""

from __future__ import annotations

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
    f,
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
            chunk_mean = g.mean(0)
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


def bias(estimator: Estimator | str, f, logits: Structure, num_samples: int = 10_000):
    """Monte Carlo bias against the exact gradient, with z-scores.

    Returns
    -------
    dict with ``bias`` (flat float64 tensor), ``std_error`` and ``z`` (bias / std_error,
    ``nan`` where the standard error is 0).
    """
    stats = monte_carlo(estimator, f, logits, num_samples)
    exact = exact_gradient_flat(f, logits).to(stats.flat("mean").device)
    b = stats.flat("mean") - exact
    se = stats.flat("std_error")
    z = torch.where(se > 0, b / se.clamp_min(1e-300), torch.full_like(b, float("nan")))
    return {"bias": b, "std_error": se, "z": z, "exact": exact, "stats": stats}


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


def exact_variance(estimator: Estimator | str, f, logits: Structure) -> dict[str, Any]:
    """Exact per-coordinate mean and variance of ONE estimate of a Monte Carlo estimator.

    Supported: :class:`~binopt.REINFORCE` (no baseline, or its current moving-average value
    used as a constant), :class:`~binopt.REINFORCELOO` (``D * K <= 16``), :class:`~binopt.ARM`
    and :class:`~binopt.DisARM` (``D <= 12``). ``f`` must be deterministic.

    Returns
    -------
    dict with ``mean`` and ``variance``, each in the logits' structure (float64). The
    variance of an average of ``n`` independent estimates is ``variance / n``.
    """
    est = get_estimator(estimator)
    if isinstance(est, (ARM, DisARM)):
        values, _, alpha, leaves, rebuild = _table(est, f, logits, 12)
        mean, second = _antithetic_moments(est, values, alpha)
    elif isinstance(est, REINFORCELOO):
        k = est.num_samples
        n_units = sum(leaf.numel() for leaf in flatten(logits)[0])
        if n_units * k > 16:
            raise ValueError(f"exact_variance for leave-one-out needs D*K <= 16; got {n_units * k}")
        values, states, alpha, leaves, rebuild = _table(est, f, logits, 16)
        mean, second = _loo_moments(values, states, alpha, k)
    elif isinstance(est, REINFORCE):
        values, states, alpha, leaves, rebuild = _table(est, f, logits, 20)
        b = 0.0 if est.baseline_value is None or est.baseline is None else float(est.baseline_value)
        pi = torch.sigmoid(alpha)
        q = _probs(states, alpha)
        score = states - pi
        g = (values - b).unsqueeze(1) * score  # (2^D, D)
        mean = (q.unsqueeze(1) * g).sum(0)
        second = (q.unsqueeze(1) * g * g).sum(0)
    else:
        raise TypeError(
            f"exact_variance supports REINFORCE, REINFORCELOO, ARM and DisARM; got {est!r}"
        )
    var = (second - mean * mean).clamp_min(0)
    return {
        "mean": _rebuild_flat(mean, leaves, rebuild),
        "variance": _rebuild_flat(var, leaves, rebuild),
    }


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


def _antithetic_moments(est: Estimator, values: torch.Tensor, alpha: torch.Tensor):
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
    if isinstance(est, ARM):
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


def standard_error_bound(std_error: torch.Tensor, num_tests: int, family_alpha: float = 1e-4):
    """Two-sided z bound for ``num_tests`` simultaneous tests (Bonferroni), e.g. for tests."""
    from scipy.stats import norm

    z = float(norm.isf(family_alpha / (2 * max(num_tests, 1))))
    return z * std_error, z


__all__ = [
    "GradientStats",
    "bias",
    "exact_gradient_flat",
    "exact_variance",
    "monte_carlo",
    "standard_error_bound",
]
