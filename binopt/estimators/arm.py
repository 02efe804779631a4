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


class _AntitheticPair(Estimator):
    unbiased = True
    evaluations = 2

    def _estimate(self, call_f: Callable, alphas: list[torch.Tensor]) -> torch.Tensor:
        u = [self._uniform(tuple(a.shape), a) for a in alphas]  # at least float32
        alpha = [a.detach().to(uk.dtype) for uk, a in zip(u, alphas)]
        samples = []
        for uk, ak, a in zip(u, alpha, alphas):
            p = torch.sigmoid(ak)
            samples.append(torch.cat([uk > 1 - p, uk < p]).to(a.dtype))  # z1, z2
        pair = call_f(samples).reshape(2, -1)
        diff = (pair[0] - pair[1]).detach()  # f(z1) - f(z2), one per estimate
        # (the coefficients in u's precision; autograd rounds them once to the logits' dtype)
        coef = [self._coefficients(diff.reshape((-1,) + (1,) * (a.dim() - 1)), uk, ak)
                for uk, ak, a in zip(u, alpha, alphas)]
        return attach_gradient(pair.mean(0), coef, alphas)

    @staticmethod
    def _coefficients(diff: torch.Tensor, u: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """Gradient w.r.t. ``alpha`` (shape ``(N, *shape)``) given ``diff = f(z1) - f(z2)``
        (broadcast against it) and the uniforms ``u``."""
        raise NotImplementedError


@register_estimator
class ARM(_AntitheticPair):
    """Augment-REINFORCE-merge estimator: unbiased, 2 evaluations of ``f`` per estimate."""

    name = "arm"

    @staticmethod
    def _coefficients(diff, u, alpha):
        return diff * (u - 0.5)


@register_estimator
class DisARM(_AntitheticPair):
    """DisARM: ARM with ``u`` analytically integrated out; variance <= ARM's."""

    name = "disarm"

    @staticmethod
    def _coefficients(diff, u, alpha):
        # with b = z2, b~ = z1: 1/2 (f(b) - f(b~)) (-1)^{b~} 1[b != b~] sigmoid(|alpha|)
        p = torch.sigmoid(alpha)
        b, bt = u < p, u > 1 - p
        sign = torch.where(bt, -0.5, 0.5).to(alpha.dtype) * (b != bt)
        return -diff * sign * torch.sigmoid(alpha.abs())
