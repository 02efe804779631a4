"""The Yin-Zhou toy problem (ARM paper, ICLR 2019, section 4.1).

Optimise ``E_{z ~ Bernoulli(sigmoid(alpha))}[ sum_i (z_i - p0)^2 ]`` over the logits ``alpha``
of ``D`` independent binary units. With ``p0`` close to 1/2 the two values of ``z_i`` are
almost equally good, so the true gradient is tiny,

    dE / d alpha_i = s sigmoid(alpha_i) (1 - sigmoid(alpha_i)) (1 - 2 p0),

(``s = +1`` when minimising the expectation, ``-1`` when maximising it), and a noisy
estimator easily walks the wrong way. The "right answer" for each unit is ``z_i = 1`` when
maximising with ``p0 < 1/2`` (or minimising with ``p0 > 1/2``) and ``z_i = 0`` otherwise.

:func:`train_toy` trains the logits with several estimators and records the probability
of the right answer and the gradient variance (exact where :func:`binopt.diagnostics.
exact_variance` supports the estimator, Monte Carlo otherwise) along each trajectory.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import binopt
from binopt.estimators.relaxed import HardConcrete

from ._common import (
    EstimatorSpec,
    MomentAccumulator,
    check_at_least,
    check_learning_rate,
    progress,
)

#: The values of ``p0`` used in the ARM and DisARM papers.
P0_VALUES: tuple[float, ...] = (0.49, 0.499, 0.501, 0.51)

#: Largest ``D`` for which :func:`train_toy` computes exact (rather than Monte Carlo) variances.
EXACT_VARIANCE_MAX_DIM = 4

#: Offset from a run's seed to the seed of its variance measurements' generator (the same
#: offset as the monitoring generator of :func:`~applications.toys.maxcut.optimize_logits`).
MEASURE_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class YinZhouToy:
    """``E[sum_i (z_i - p0)^2]`` over ``z in {0,1}^D``, to be maximised or minimised.

    Parameters
    ----------
    p0 : float
        Target in ``(0, 1)``, not 1/2 (where every answer is right).
    dim : int
        Number of binary units ``D``.
    mode : {"max", "min"}
        Maximise (as in the ARM paper) or minimise the expectation.
    """

    p0: float = 0.49
    dim: int = 1
    mode: str = "max"

    def __post_init__(self) -> None:
        if not (0.0 < float(self.p0) < 1.0) or float(self.p0) == 0.5:
            raise ValueError(f"p0 must be in (0, 1) and not 1/2; got {self.p0}")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"dim must be a positive int; got {self.dim!r}")
        if self.mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min'; got {self.mode!r}")

    @property
    def sign(self) -> float:
        """``+1`` when minimising, ``-1`` when maximising (losses are always minimised)."""
        return 1.0 if self.mode == "min" else -1.0

    @property
    def right_answer(self) -> int:
        """The optimal value of every ``z_i`` (0 or 1)."""
        return int((self.mode == "max") == (self.p0 < 0.5))

    def value(self, z: torch.Tensor) -> torch.Tensor:
        """``sum_i (z_i - p0)^2`` for samples ``z`` of shape ``(S, D)``: shape ``(S,)``."""
        return ((z - self.p0) ** 2).sum(-1)

    def loss(self, z: torch.Tensor) -> torch.Tensor:
        """The objective to *minimise*, ``sign * value(z)``, following the estimator contract."""
        return self.sign * self.value(z)

    __call__ = loss

    def expected_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """``E[loss]`` in closed form (differentiable)."""
        pi = torch.sigmoid(logits)
        per_unit = pi * (1 - self.p0) ** 2 + (1 - pi) * self.p0**2
        return self.sign * per_unit.sum(-1)

    def exact_grad(self, logits: torch.Tensor) -> torch.Tensor:
        """``d E[loss] / d logits`` in closed form, for any ``D``."""
        pi = torch.sigmoid(logits.detach())
        return self.sign * pi * (1 - pi) * (1 - 2 * self.p0)

    def prob_right(self, logits: torch.Tensor, estimator: binopt.Estimator | None = None):
        """Probability that each unit takes its right value under the estimator's distribution.

        For Bernoulli estimators (and the relaxations of a Bernoulli) it is ``sigmoid(alpha)``
        or its complement. The hard concrete gate is a different distribution: there it is
        ``P(z = 1)`` or ``P(z = 0)`` of the stretched, clipped concrete.
        """
        a = logits.detach()
        if isinstance(estimator, HardConcrete):
            b, g, zeta = estimator.beta, estimator.gamma, estimator.zeta
            if self.right_answer == 1:
                return torch.sigmoid(a - b * math.log((1 - g) / (zeta - 1)))
            return 1 - torch.sigmoid(a - b * math.log(-g / zeta))
        pi = torch.sigmoid(a)
        return pi if self.right_answer == 1 else 1 - pi


def _variance_at(
    toy: YinZhouToy,
    est: binopt.Estimator,
    logits: torch.Tensor,
    num_samples: int,
) -> tuple[float, str]:
    """Mean per-unit variance of one estimate at ``logits`` and how it was obtained.

    ``est`` must not be the training estimator: the Monte Carlo path draws from its generator.
    """
    if isinstance(est, binopt.Exact):
        return 0.0, "exact"
    if toy.dim <= EXACT_VARIANCE_MAX_DIM:
        try:
            ev = binopt.diagnostics.exact_variance(est, toy.loss, logits.detach())
            return float(ev["variance"].mean()), "exact"
        except (TypeError, ValueError):
            pass
    acc = MomentAccumulator()
    acc.update(est.grad(toy.loss, logits.detach(), num_samples=num_samples))
    return float(acc.result()["variance"].mean()), "monte_carlo"


def train_toy(
    toy: YinZhouToy,
    estimators: Sequence[EstimatorSpec],
    *,
    steps: int = 2000,
    lr: float = 0.1,
    optimizer: str = "adam",
    seeds: Sequence[int] = (0,),
    init_logit: float = 0.0,
    eval_every: int = 100,
    variance_samples: int = 1000,
    record_every: int = 1,
    show_progress: bool | None = None,
) -> dict[str, Any]:
    """Train the toy's logits with each estimator and record curves.

    Parameters
    ----------
    toy : YinZhouToy
    estimators : sequence of EstimatorSpec
    steps : int
        Optimiser steps, one gradient estimate each.
    lr : float
        Learning rate.
    optimizer : {"adam", "sgd"}
    seeds : sequence of int
        One independent run per seed (curves report the mean and standard error).
    init_logit : float
        Initial value of every logit.
    eval_every : int
        Steps between variance measurements (also made at step 0 and at the end).
    variance_samples : int
        Estimates per Monte Carlo variance measurement (used when ``D`` is too large for
        the exact variance or the estimator is not supported by it). They are drawn from a
        generator of their own (seeded ``seed + MEASURE_SEED_OFFSET``), so the training
        trajectories do not depend on ``eval_every`` or ``variance_samples``.
    record_every : int
        Steps between recorded points of the probability curve.
    show_progress : bool, optional
        Force the progress bar on or off (default: on when stderr is a terminal).

    Returns
    -------
    dict
        ``{"problem": ..., "settings": ..., "estimators": {label: curves}}`` where each curve
        dict holds ``steps``, ``prob_right_mean``/``prob_right_se`` (mean over units, then over
        seeds), ``variance_steps``, ``variance_mean``/``variance_se`` (mean per-unit variance
        of one estimate), ``exact_grad_sq`` (mean squared exact gradient, the "signal"),
        ``final_prob_right`` and ``evaluations`` per step.
    """
    check_at_least(1, steps=steps, eval_every=eval_every, record_every=record_every)
    check_at_least(2, variance_samples=variance_samples)
    check_learning_rate(lr)
    if not math.isfinite(init_logit):
        raise ValueError(f"init_logit must be finite; got {init_logit}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd'; got {optimizer!r}")
    if not estimators:
        raise ValueError("need at least one estimator")
    seeds = list(seeds)
    if not seeds:
        raise ValueError("need at least one seed")
    record_steps = sorted(set(range(0, steps + 1, record_every)) | {steps})
    var_steps = sorted(set(range(0, steps + 1, eval_every)) | {steps})
    # membership is tested at every step: sets, not the lists (quadratic in steps)
    record_set, var_set = set(record_steps), set(var_steps)
    out: dict[str, Any] = {}
    total = len(estimators) * len(seeds)
    bar = progress(range(total), desc=f"toy p0={toy.p0}", enabled=show_progress)
    for spec in estimators:
        probs, variances, signals, methods = [], [], [], set()
        for seed in seeds:
            gen = torch.Generator().manual_seed(int(seed))
            est = spec.build(generator=gen)
            # Monte Carlo variances draw from their own generator: drawing them from the
            # training one made the trajectory depend on eval_every and variance_samples
            measure_gen = torch.Generator().manual_seed(int(seed) + MEASURE_SEED_OFFSET)
            logits = torch.full((toy.dim,), float(init_logit), dtype=torch.float64)
            logits.requires_grad_(True)
            opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)([logits], lr=lr)
            p_curve, v_curve, s_curve = [], [], []
            for step in range(steps + 1):
                if step in record_set:
                    p_curve.append(float(toy.prob_right(logits, est).mean()))
                if step in var_set:
                    v, method = _variance_at(
                        toy, _with_generator(est, measure_gen), logits, variance_samples
                    )
                    methods.add(method)
                    v_curve.append(v)
                    s_curve.append(float((toy.exact_grad(logits) ** 2).mean()))
                if step == steps:
                    break
                opt.zero_grad(set_to_none=True)
                est.surrogate(toy.loss, logits).backward()
                opt.step()
            probs.append(p_curve)
            variances.append(v_curve)
            signals.append(s_curve)
            bar.update(1)
        p = np.asarray(probs)
        v = np.asarray(variances)
        out[spec.label] = {
            "estimator": spec.name,
            "options": dict(spec.options),
            "evaluations": est.evaluations_per_estimate,
            "steps": record_steps,
            "prob_right_mean": p.mean(0),
            "prob_right_se": _se(p),
            "variance_steps": var_steps,
            "variance_mean": v.mean(0),
            "variance_se": _se(v),
            "variance_method": "+".join(sorted(methods)),
            "exact_grad_sq": np.asarray(signals).mean(0),
            "final_prob_right": float(p[:, -1].mean()),
            "final_prob_right_se": float(_se(p[:, -1:])[0]),
            "final_prob_right_per_seed": p[:, -1],
        }
    bar.close()
    return {
        "problem": {
            "name": "yin_zhou",
            "p0": toy.p0,
            "dim": toy.dim,
            "mode": toy.mode,
            "right_answer": toy.right_answer,
        },
        "settings": {
            "steps": steps,
            "lr": lr,
            "optimizer": optimizer,
            "seeds": seeds,
            "init_logit": init_logit,
            "eval_every": eval_every,
            "variance_samples": variance_samples,
        },
        "estimators": out,
    }


def _with_generator(est: binopt.Estimator, generator: torch.Generator) -> binopt.Estimator:
    """A shallow copy of ``est`` drawing from ``generator``.

    A copy rather than a fresh estimator so that state the training has built up (the
    baseline of REINFORCE with a moving average, which the exact variance uses) is the
    training estimator's; ``grad``, which the measurement uses, leaves that state alone.
    """
    probe = copy.copy(est)
    probe.generator = generator
    return probe


def _se(x: np.ndarray) -> np.ndarray:
    """Standard error over the first axis (zeros for a single run)."""
    if x.shape[0] < 2:
        return np.zeros(x.shape[1:])
    return x.std(0, ddof=1) / math.sqrt(x.shape[0])
