"""REINFORCE / score-function estimators (Williams, 1992).

``g = (f(z) - b) * (z - sigmoid(alpha))`` with ``z ~ Bernoulli(sigmoid(alpha))``;
``z - sigmoid(alpha)`` is the score ``d log q(z) / d alpha``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._validation import check_finite_number
from .base import Estimator, attach_gradient, noise_dtype, register_estimator


@register_estimator(aliases=("score_function", "sf"))
class REINFORCE(Estimator):
    """Score-function estimator with an optional moving-average baseline.

    Parameters
    ----------
    baseline : {None, "moving_average"}
        ``None``: ``g = f(z) (z - pi)``. ``"moving_average"``: subtract ``b``, an
        exponential moving average of past values of ``f`` updated after each
        :meth:`surrogate` call; ``b`` never depends on the current sample, so the estimate
        stays unbiased.
    decay : float
        Decay of the moving average, in ``[0, 1)``.
    """

    name = "reinforce"
    unbiased = True
    evaluations = 1

    def __init__(self, baseline: str | None = None, decay: float = 0.9, **kwargs) -> None:
        super().__init__(**kwargs)
        if baseline not in (None, "moving_average"):
            raise ValueError(f"baseline must be None or 'moving_average'; got {baseline!r}")
        decay = check_finite_number("decay", decay)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1); got {decay}")
        self.baseline = baseline
        self.decay = decay
        self.baseline_value: torch.Tensor | None = None

    def _options(self):
        return {"baseline": self.baseline} if self.baseline else {}

    def _current_baseline(self, like: torch.Tensor) -> torch.Tensor:
        if self.baseline is None or self.baseline_value is None:
            return like.new_zeros(())
        return self.baseline_value.to(device=like.device, dtype=like.dtype)

    def _after_surrogate(self, values: torch.Tensor) -> None:
        if self.baseline == "moving_average":
            # Updated after the estimate so that b is independent of the current sample.
            value = values.detach().mean()
            if self.baseline_value is None:
                self.baseline_value = value
            else:
                self.baseline_value = self.decay * self.baseline_value + (1 - self.decay) * value

    def _estimate(self, call_f: Callable, alphas: list[torch.Tensor]) -> torch.Tensor:
        probs = [torch.sigmoid(a.detach().to(noise_dtype(a.dtype))) for a in alphas]
        draws = [(self._uniform(tuple(a.shape), a) < p).to(p.dtype) for a, p in zip(alphas, probs)]
        # the scores before f runs: f may legitimately modify its samples in place
        scores = [zk - p for zk, p in zip(draws, probs)]
        values = call_f([zk.to(a.dtype) for zk, a in zip(draws, alphas)])
        centred = values.detach() - self._current_baseline(values)
        coef = [_bcast(centred, sk) * sk for sk in scores]
        return attach_gradient(values, coef, alphas)


@register_estimator(aliases=("loo", "reinforce_leave_one_out", "rloo"))
class REINFORCELOO(Estimator):
    """REINFORCE with the leave-one-out baseline over ``num_samples = K >= 2`` samples.

    ``g = (1/K) sum_k (f(z_k) - mean_{j != k} f(z_j)) (z_k - pi)`` (Kool et al., 2019).
    Unbiased; costs K evaluations of ``f`` per estimate.
    """

    name = "reinforce_loo"
    unbiased = True

    def __init__(self, num_samples: int = 2, **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 2:
            raise ValueError(f"leave-one-out needs an int num_samples >= 2; got {num_samples!r}")
        self.num_samples = num_samples

    @property
    def evaluations_per_estimate(self) -> int:
        return self.num_samples

    def _options(self):
        return {"num_samples": self.num_samples}

    def _estimate(self, call_f: Callable, alphas: list[torch.Tensor]) -> torch.Tensor:
        k = self.num_samples
        probs = [torch.sigmoid(a.detach().to(noise_dtype(a.dtype))) for a in alphas]
        z = [
            (self._uniform((k,) + tuple(a.shape), a) < p).to(p.dtype) for a, p in zip(alphas, probs)
        ]
        n = alphas[0].shape[0]
        scores = [zk - p for zk, p in zip(z, probs)]  # before f (see REINFORCE)
        values = call_f([zk.reshape((k * n,) + zk.shape[2:]).to(a.dtype)
                         for zk, a in zip(z, alphas)]).reshape(k, n)
        fv = values.detach()
        centred = (fv - (fv.sum(0, keepdim=True) - fv) / (k - 1)) / k  # (K, N)
        coef = [(_bcast(centred, sk, lead=2) * sk).sum(0) for sk in scores]
        return attach_gradient(values.mean(0), coef, alphas)


def _bcast(v: torch.Tensor, like: torch.Tensor, lead: int = 1) -> torch.Tensor:
    """View per-sample values ``v`` (leading dims only) so they broadcast against ``like``."""
    return v.reshape(tuple(v.shape[:lead]) + (1,) * (like.dim() - lead))
