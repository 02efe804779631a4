"""Bias and variance of estimators on a problem at given logits: the engine of ``binopt variance``.

A :class:`Setting` is a problem frozen at one point (logits, or a training step): it draws
``n`` independent gradient estimates of one estimator as an ``(n, D)`` tensor and, where
computable, knows the exact gradient and an estimator's exact variance. :func:`measure`
runs every estimator with the same budget and returns one row per estimator:

- ``mean`` and its standard error, the exact gradient, the bias and its z-score, and
  ``bias_p``, the p-value of "no bias" (Bonferroni-corrected over the units), with
  ``bias_detected = bias_p < BIAS_ALPHA``;
- ``variance`` of ONE estimate (unbiased sample variance) with its standard error (from the
  fourth moment), the exact variance and the z-score of the difference;
- ``variance_x_evaluations``: variance times evaluations of ``f`` per estimate, the variance
  at equal cost (averaging ``k`` estimates divides the variance by ``k`` and multiplies the
  cost by ``k``).

With ``D > 1`` units the table aggregates over units (``coord=None``): ``|mean|`` and
``|exact|`` are Euclidean norms, the bias is ``|mean - exact|`` with the largest per-unit
``|z|``, and variances are means over units (standard error assuming independent units).
Per-unit values are kept in the JSON for ``D <= 1000``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import binopt

from ._common import (
    EstimatorSpec,
    MomentAccumulator,
    check_stateless,
    duplicated,
    jackknife_groups,
    parse_estimator_list,
    progress,
    z_score,
)

#: Largest number of units for which the exact variance is attempted.
EXACT_VARIANCE_MAX_DIM = 10
#: Largest number of units for which per-unit values are written to the JSON.
PER_UNIT_MAX = 1000
#: Family-wise level below which a row's bias is reported as detected: an unbiased
#: estimator is flagged with probability at most this (Bonferroni over its units).
BIAS_ALPHA = 1e-4


@dataclass
class Setting:
    """A problem at a fixed point.

    Attributes
    ----------
    label : str
        Short name shown in tables (e.g. ``phi=0``).
    draw : callable
        ``draw(estimator, n)`` returns ``n`` independent gradient estimates, ``(n, D)``.
    exact_mean : torch.Tensor or None
        The exact gradient, ``(D,)``.
    exact_variance : callable or None
        ``exact_variance(estimator)`` returns the exact per-unit variance of one estimate or
        ``None`` when it cannot be computed for that estimator.
    info : dict
        Anything worth writing to the JSON (logits, step, ...).
    """

    label: str
    draw: Callable[[binopt.Estimator, int], torch.Tensor]
    exact_mean: torch.Tensor | None = None
    exact_variance: Callable[[binopt.Estimator], torch.Tensor | None] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def logit_setting(
    label: str,
    f: Callable[[torch.Tensor], torch.Tensor],
    logits: torch.Tensor,
    exact_grad: torch.Tensor | None,
    info: dict[str, Any] | None = None,
) -> Setting:
    """A setting for an objective ``f`` of one logit vector (toy, max-cut)."""
    logits = logits.detach().to(torch.float64)

    def draw(est: binopt.Estimator, n: int) -> torch.Tensor:
        return est.grad(f, logits, num_samples=n).reshape(n, -1)

    def exact_var(est: binopt.Estimator) -> torch.Tensor | None:
        if logits.numel() > EXACT_VARIANCE_MAX_DIM:
            return None
        if isinstance(est, binopt.Exact):
            return torch.zeros(logits.numel(), dtype=torch.float64)
        try:
            return binopt.diagnostics.exact_variance(est, f, logits)["variance"].reshape(-1)
        except (TypeError, ValueError):
            return None

    meta = {"logits": logits.tolist() if logits.numel() <= PER_UNIT_MAX else None}
    meta.update(info or {})
    exact = None if exact_grad is None else exact_grad.detach().to(torch.float64).reshape(-1)
    return Setting(label, draw, exact, exact_var, meta)


def measure(
    setting: Setting,
    estimators: str | Sequence[EstimatorSpec | str],
    num_samples: int = 10_000,
    chunk_size: int = 10_000,
    seed: int = 0,
    coord: int | None = None,
    show_progress: bool | None = None,
    common_random_numbers: bool = True,
) -> list[dict[str, Any]]:
    """One row of statistics per estimator (see the module docstring).

    Parameters
    ----------
    setting : Setting
    estimators : str or sequence of EstimatorSpec or str
        Specs as the command line takes them: ``"arm,disarm,reinforce_loo:num_samples=4"``,
        a list of such names, or :func:`parse_estimator_list`'s specs. Any registered
        estimator works, a user's own included (:func:`binopt.register_estimator`).
    num_samples : int
        Independent estimates per estimator (at least 2).
    chunk_size : int
        Estimates drawn per vectorized call (at least 1).
    seed : int
        Seed of the estimators' generators.
    coord : int, optional
        Report this unit only instead of aggregating over units.
    common_random_numbers : bool
        Seed every estimator's generator with ``seed`` (default), so estimators that draw
        their noise the same way see the same noise (ARM and DisARM then use the same
        uniforms, and DisARM is exactly ARM averaged over ``u`` given the pair): the
        comparison between estimators is much sharper. ``False``: estimator ``i`` uses
        ``seed * 1000 + i``. Each estimator's own statistics are valid either way.
    """
    for name, value, least in [("num_samples", num_samples, 2), ("chunk_size", chunk_size, 1)]:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int >= {least}; got {value!r}")
        if value < least:
            raise ValueError(f"{name} must be >= {least}; got {value}")
    specs = _as_specs(estimators)
    rows = []
    for i, spec in enumerate(specs):
        stream = seed if common_random_numbers else seed * 1000 + i
        est = spec.build(generator=torch.Generator().manual_seed(stream))
        check_stateless(est, spec.label)
        groups = jackknife_groups(num_samples)
        acc = MomentAccumulator(groups, num_samples if groups else None)
        chunks = range(0, num_samples, chunk_size)
        for start in progress(chunks, desc=f"{setting.label} {spec.label}", enabled=show_progress):
            acc.update(setting.draw(est, min(chunk_size, num_samples - start)))
        stats = acc.result()
        stats["mean_variance_se"] = acc.mean_variance_se() if groups else float("nan")
        exact_var = setting.exact_variance(est) if setting.exact_variance else None
        rows.append(_row(spec, est, stats, setting.exact_mean, exact_var, num_samples, coord))
    return rows


def _as_specs(estimators: str | Sequence[EstimatorSpec | str]) -> list[EstimatorSpec]:
    """``measure``'s estimators as specs (names parsed as on the command line)."""
    if isinstance(estimators, str):
        return parse_estimator_list(estimators)
    if not isinstance(estimators, Sequence):
        raise TypeError(
            "estimators must be a comma-separated string or a list of names or "
            f"EstimatorSpec; got {type(estimators).__name__}"
        )
    specs = []
    for item in estimators:
        if isinstance(item, str):
            specs.extend(parse_estimator_list(item))
        elif isinstance(item, EstimatorSpec):
            specs.append(item)
        else:
            got = (f"the class {item.__name__}" if isinstance(item, type)
                   else type(item).__name__)
            raise TypeError(
                "estimators must be names (e.g. 'arm', 'reinforce_loo:num_samples=4') or "
                f"EstimatorSpec; got {got} (for an estimator of your own, register it with "
                "binopt.register_estimator and give its name)"
            )
    if not specs:
        raise ValueError("estimators is empty; give at least one")
    dup = duplicated([s.label for s in specs])
    if dup:
        raise ValueError(f"estimator listed twice: {', '.join(dup)}")
    return specs


def _row(spec, est, stats, exact_mean, exact_var, n, coord) -> dict[str, Any]:
    mean, var = stats["mean"], stats["variance"]
    mean_se, var_se = stats["mean_se"], stats["variance_se"]
    d = mean.numel()
    if coord is not None and not 0 <= coord < d:
        raise ValueError(f"coord must be in [0, {d}); got {coord}")
    evals = est.evaluations_per_estimate
    row: dict[str, Any] = {
        "estimator": spec.label,
        "name": spec.name,
        "unbiased": bool(est.unbiased),
        "evaluations": evals,
        "num_samples": n,
        "units": d,
    }
    if coord is not None or d == 1:
        k = 0 if coord is None else coord
        row["mean"] = float(mean[k])
        row["mean_se"] = float(mean_se[k])
        row["exact"] = None if exact_mean is None else float(exact_mean[k])
        row["variance"] = float(var[k])
        row["variance_se"] = float(var_se[k])
        row["exact_variance"] = None if exact_var is None else float(exact_var[k])
        if exact_mean is not None:
            row["bias"] = row["mean"] - row["exact"]
            # an exact estimator differs from the closed form by rounding only
            row["bias_z"] = z_score(row["bias"], row["mean_se"],
                                    1e-9 * max(1.0, abs(row["exact"])))
    else:
        row["mean"] = float(mean.norm())
        row["mean_se"] = float(mean_se.pow(2).sum().sqrt())
        row["exact"] = None if exact_mean is None else float(exact_mean.norm())
        row["variance"] = float(var.mean())
        # the units' estimates are correlated (they share f): the jackknife over groups
        # of estimates, not the per-unit errors combined as if independent
        row["variance_se"] = float(stats["mean_variance_se"])
        row["exact_variance"] = None if exact_var is None else float(exact_var.mean())
        if exact_mean is not None:
            b = mean - exact_mean.to(mean)
            row["bias"] = float(b.norm())
            row["bias_z"] = max(
                abs(z_score(float(bi), float(si), 1e-9 * max(1.0, abs(float(ei)))))
                for bi, si, ei in zip(b, mean_se, exact_mean)
            )
    if "bias_z" in row:
        tests = 1 if coord is not None or d == 1 else d
        row["bias_p"] = bias_p_value(row["bias_z"], tests)
        row["bias_detected"] = row["bias_p"] < BIAS_ALPHA
    if row["exact_variance"] is not None:
        atol = 1e-12 * max(1.0, abs(row["exact_variance"]))
        row["variance_z"] = z_score(
            row["variance"] - row["exact_variance"], row["variance_se"], atol
        )
    row["variance_x_evaluations"] = row["variance"] * evals if evals > 0 else None
    if d <= PER_UNIT_MAX:
        row["per_unit"] = {
            "mean": mean,
            "mean_se": mean_se,
            "variance": var,
            "variance_se": var_se,
            "exact": exact_mean,
            "exact_variance": exact_var,
        }
    return row


def bias_p_value(z: float, tests: int = 1) -> float:
    """Bonferroni-corrected two-sided p-value of the largest ``|z|`` of ``tests`` z-tests.

    Parameters
    ----------
    z : float
        The largest ``|z|`` (or a signed ``z`` when ``tests == 1``); ``inf`` gives 0.
    tests : int
        Number of z-tests it is the largest of (at least 1).

    Returns
    -------
    float
        ``min(1, tests * P(|Z| > |z|))`` for a standard normal ``Z``.
    """
    if isinstance(tests, bool) or not isinstance(tests, int) or tests < 1:
        raise ValueError(f"tests must be an int >= 1; got {tests!r}")
    if math.isnan(z):
        raise ValueError("z must be a number; got nan")
    return min(1.0, tests * math.erfc(abs(z) / math.sqrt(2.0)))


def bias_verdict(rows: Sequence[dict[str, Any]], alpha: float = BIAS_ALPHA) -> str:
    """One line saying which rows show a bias (``bias_p < alpha``) and which do not.

    Rows without an exact gradient (no ``bias_p``) are left out; ``""`` when none has one.
    """
    from ._common import fmt

    tested = [r for r in rows if r.get("bias_p") is not None]
    if not tested:
        return ""
    found = [f"{r['estimator']} (p={fmt(r['bias_p'], 2)})" for r in tested if r["bias_p"] < alpha]
    clean = [r["estimator"] for r in tested if r["bias_p"] >= alpha]
    parts = [f"bias detected (p < {alpha:g}): {', '.join(found) or 'none'}"]
    if clean:
        parts.append(f"none detected: {', '.join(clean)}")
    return "; ".join(parts)


def ordering(rows: Sequence[dict[str, Any]], key: str = "variance") -> str:
    """``a (v) <= b (v) <= ...`` sorted by ``key``."""
    from ._common import fmt

    ok = sorted((r for r in rows if r.get(key) is not None), key=lambda r: r[key])
    return " <= ".join(f"{r['estimator']} ({fmt(r[key], 3)})" for r in ok)


__all__ = [
    "BIAS_ALPHA",
    "Setting",
    "bias_p_value",
    "bias_verdict",
    "logit_setting",
    "measure",
    "ordering",
]
