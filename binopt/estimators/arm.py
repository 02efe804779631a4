"""ARM (Yin & Zhou, ICLR 2019) and DisARM (Dong, Mnih & Tucker, NeurIPS 2020).

Both use one uniform ``u`` per unit and the antithetic pair ``z1 = 1[u > sigmoid(-alpha)]``,
``z2 = 1[u < sigmoid(alpha)]`` (each marginally Bernoulli(sigmoid(alpha))), evaluated in one
call to ``f`` by stacking the pair along the sample dimension.

- ARM: ``g = (f(z1) - f(z2)) (u - 1/2)``.
- DisARM: with ``b = z2`` and ``b~ = z1``,
  ``g_i = 1/2 (f(b) - f(b~)) (-1)^{b~_i} 1[b_i != b~_i] sigmoid(|alpha_i|)``; it integrates
  ``u`` out given the pair, so its variance never exceeds ARM's.

The gradient for parameters inside ``f`` is the average over both samples of the pair, each
a proper Bernoulli sample, so it is unbiased.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import Estimator, attach_gradient, register_estimator
from .score_function import _bcast


class _AntitheticPair(Estimator):
    unbiased = True
    evaluations = 2

    def _pair(self, call_f: Callable, alphas: list[torch.Tensor]):
        u = [self._uniform(tuple(a.shape), a) for a in alphas]
        probs = [torch.sigmoid(a.detach()) for a in alphas]
        z1 = [(uk > 1 - p).to(a.dtype) for uk, p, a in zip(u, probs, alphas)]
        z2 = [(uk < p).to(a.dtype) for uk, p, a in zip(u, probs, alphas)]
        values = call_f([torch.cat([a, b]) for a, b in zip(z1, z2)]).reshape(2, -1)
        return u, z1, z2, values


@register_estimator
class ARM(_AntitheticPair):
    """Augment-REINFORCE-merge estimator: unbiased, 2 evaluations of ``f`` per estimate."""

    name = "arm"

    def _estimate(self, call_f: Callable, alphas: list[torch.Tensor]) -> torch.Tensor:
        u, _, _, values = self._pair(call_f, alphas)
        diff = values[0].detach() - values[1].detach()
        coef = [_bcast(diff, uk) * (uk - 0.5) for uk in u]
        return attach_gradient(values.mean(0), coef, alphas)


@register_estimator
class DisARM(_AntitheticPair):
    """DisARM: ARM with ``u`` analytically integrated out; variance <= ARM's."""

    name = "disarm"

    def _estimate(self, call_f: Callable, alphas: list[torch.Tensor]) -> torch.Tensor:
        _, z1, z2, values = self._pair(call_f, alphas)
        diff = 0.5 * (values[1].detach() - values[0].detach())  # f(b) - f(b~), b = z2
        coef = [
            _bcast(diff, b) * (1 - 2 * bt) * (b != bt).to(a.dtype) * torch.sigmoid(a.detach().abs())
            for a, b, bt in zip(alphas, z2, z1)
        ]
        return attach_gradient(values.mean(0), coef, alphas)
