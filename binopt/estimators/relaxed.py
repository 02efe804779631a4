"""Biased, reparameterized estimators that need ``f`` differentiable in ``z``.

- :class:`StraightThrough`: forward a hard Bernoulli sample, backward as if ``z = pi``.
- :class:`GumbelSigmoid`: binary concrete relaxation (Maddison et al.; Jang et al., 2017).
- :class:`HardConcrete`: the stretched and clipped concrete of Louizos, Welling & Kingma
  (ICLR 2018), the gate of L0-HC. It is a different distribution from the Bernoulli; its
  probability of a non-zero gate is ``sigmoid(log_a - beta log(-gamma/zeta))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .._validation import check_finite_number
from .base import Estimator, SampleShape, register_estimator


class _Reparameterized(Estimator):
    unbiased = False
    evaluations = 1
    requires_differentiable_f = True
    reparameterized = True

    def _relaxed(self, alpha: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _estimate(self, call_f: Callable, alphas: list[torch.Tensor]) -> torch.Tensor:
        return call_f([self._relaxed(a) for a in alphas])

    def sample(self, logits: torch.Tensor, sample_shape: SampleShape = ()) -> torch.Tensor:
        shape = self._check_sample_args(logits, sample_shape)
        return self._relaxed(logits.detach().expand(shape + tuple(logits.shape)))

    def rsample(self, logits: torch.Tensor, sample_shape: SampleShape = ()) -> torch.Tensor:
        """Samples differentiable w.r.t. ``logits``."""
        shape = self._check_sample_args(logits, sample_shape, "rsample")
        return self._relaxed(logits.expand(shape + tuple(logits.shape)))


@register_estimator(aliases=("st",))
class StraightThrough(_Reparameterized):
    """Straight-through Bernoulli estimator: ``z + pi - stop_grad(pi)``. Biased."""

    name = "straight_through"

    def _relaxed(self, alpha: torch.Tensor) -> torch.Tensor:
        pi = torch.sigmoid(alpha)
        u = self._uniform(tuple(alpha.shape), alpha)  # at least float32 (see _uniform)
        p = pi.detach() if pi.dtype == u.dtype else torch.sigmoid(alpha.detach().to(u.dtype))
        z = (u < p).to(alpha.dtype)
        # z + (pi - pi) keeps the forward value exactly 0/1; (z + pi) - pi would round
        return z + (pi - pi.detach())


def _check_positive(name: str, value: object) -> float:
    value = check_finite_number(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be a positive finite number; got {value}")
    return value


@register_estimator(aliases=("gumbel_sigmoid", "concrete", "binary_concrete", "relaxed_bernoulli"))
class GumbelSigmoid(_Reparameterized):
    """Binary concrete relaxation ``z = sigmoid((alpha + log u - log(1-u)) / tau)``.

    Parameters
    ----------
    temperature : float
        ``tau > 0``; small values approach a hard sample (and higher variance).
    hard : bool
        Forward the rounded sample ``1[z > 1/2]`` with the relaxed gradient.
    """

    name = "gumbel"

    def __init__(self, temperature: float = 2.0 / 3.0, hard: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.temperature = _check_positive("temperature", temperature)
        if hard not in (True, False):  # bool("false") is True
            raise TypeError(f"hard must be a bool; got {hard!r}")
        self.hard = bool(hard)

    def _options(self):
        return {"temperature": self.temperature, "hard": self.hard}

    def _relaxed(self, alpha: torch.Tensor) -> torch.Tensor:
        u = self._open_uniform(tuple(alpha.shape), alpha)  # at least float32 (see _uniform)
        z = torch.sigmoid((alpha.to(u.dtype) + torch.log(u) - torch.log1p(-u)) / self.temperature)
        if self.hard:
            z = (z > 0.5).to(z.dtype) + (z - z.detach())
        return z.to(alpha.dtype)


@register_estimator(aliases=("hc", "l0_hc"))
class HardConcrete(_Reparameterized):
    """Hard concrete gate (L0-HC). The logits are ``log a``.

    ``s = sigmoid((log u - log(1-u) + log a) / beta)``, ``z = clamp(s (zeta - gamma) + gamma,
    0, 1)``.

    Parameters
    ----------
    beta : float
        Temperature, default 2/3.
    gamma, zeta : float
        Stretch interval ``(gamma, zeta)`` with ``gamma < 0 < 1 < zeta``; defaults -0.1, 1.1.
    """

    name = "hard_concrete"

    def __init__(
        self, beta: float = 2.0 / 3.0, gamma: float = -0.1, zeta: float = 1.1, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        self.beta = _check_positive("beta", beta)
        gamma, zeta = check_finite_number("gamma", gamma), check_finite_number("zeta", zeta)
        if not (gamma < 0.0 and zeta > 1.0):
            raise ValueError(f"hard concrete needs gamma < 0 and zeta > 1; got {gamma}, {zeta}")
        self.gamma, self.zeta = gamma, zeta

    def _options(self):
        return {"beta": self.beta, "gamma": self.gamma, "zeta": self.zeta}

    def _relaxed(self, alpha: torch.Tensor) -> torch.Tensor:
        u = self._open_uniform(tuple(alpha.shape), alpha)  # at least float32 (see _uniform)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + alpha.to(u.dtype)) / self.beta)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0).to(alpha.dtype)

    def prob_nonzero(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits - self.beta * math.log(-self.gamma / self.zeta))

    def deterministic_gate(self, logits: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(logits) * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)
