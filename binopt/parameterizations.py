"""Gate parameterizations ``pi = g(phi)`` and the chain rule to the Bernoulli logits.

Every estimator works in logit space ``alpha = logit(pi)``. A parameterization maps its
parameters ``phi`` to logits through :meth:`Parameterization.logits`; autograd then applies
``d alpha / d phi = g'(phi) / (pi (1 - pi))``, so an estimator unbiased in ``alpha`` stays
unbiased in ``phi`` for ANY differentiable ``g`` (the point of L0-ARM), smooth or not.

Saturated gates (``pi`` exactly 0 or 1, as the hard sigmoid produces) have an infinite
logit. :func:`safe_logit` clamps the forward value to a finite range and defines the
backward through a saturated gate as 0: there ``d E / d alpha = pi (1 - pi) (...) = 0`` and the
hard sigmoid's own derivative is 0 on its flat parts, so the exact gradient is 0 as well.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch


class _SafeLogit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, probs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(probs)
        bound = _logit_bound(probs.dtype)
        return (torch.log(probs) - torch.log1p(-probs)).clamp(-bound, bound)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
        (probs,) = ctx.saved_tensors
        denom = probs * (1 - probs)
        safe = torch.where(denom > 0, denom, torch.ones_like(denom))
        return torch.where(denom > 0, grad_out / safe, torch.zeros_like(grad_out))


def _logit_bound(dtype: torch.dtype) -> float:
    # logit of the smallest positive normal number: keeps sigmoid(alpha) away from 0/1
    # rounding. Half-precision logits take float32's (87.3): the estimators compare their
    # noise with sigmoid(alpha) in at least float32 (Estimator._uniform), where float16's
    # own bound (9.7) would leave a closed gate open with probability 6e-5.
    tiny = torch.finfo(torch.promote_types(dtype, torch.float32)).tiny
    return float(-torch.log(torch.tensor(tiny, dtype=torch.float64)))


def safe_logit(probs: torch.Tensor) -> torch.Tensor:
    """``log(p) - log(1 - p)`` with finite values at ``p in {0, 1}`` and zero gradient there."""
    return _SafeLogit.apply(probs)


class Parameterization(abc.ABC):
    """Maps gate parameters ``phi`` to probabilities ``pi = g(phi)`` and logits.

    Subclasses implement :meth:`probs`; :meth:`logits` defaults to ``safe_logit(probs)``
    (exact chain rule) and is overridden where a closed form exists.
    """

    name: str = "parameterization"

    @abc.abstractmethod
    def probs(self, phi: torch.Tensor) -> torch.Tensor:
        """Gate probabilities ``pi = g(phi)`` in ``[0, 1]``."""

    def logits(self, phi: torch.Tensor) -> torch.Tensor:
        """Bernoulli logits ``logit(g(phi))``, differentiable w.r.t. ``phi``."""
        return safe_logit(self.probs(phi))

    def inverse(self, probs: torch.Tensor | float) -> torch.Tensor:
        """Parameters ``phi`` with ``g(phi) = probs`` (for initialization)."""
        raise NotImplementedError(f"{type(self).__name__} has no inverse; initialize phi directly")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _as_probs(probs) -> torch.Tensor:
    # a floating tensor keeps its dtype (float64 in, float64 out); numbers and integer
    # tensors take the default dtype
    if isinstance(probs, torch.Tensor) and probs.is_floating_point():
        p = probs
    else:
        p = torch.as_tensor(probs, dtype=torch.get_default_dtype())
    if not bool(((p > 0) & (p < 1)).all()):
        raise ValueError(f"inverse needs probabilities strictly inside (0, 1); got {probs}")
    return p


class Sigmoid(Parameterization):
    """``pi = sigmoid(phi)``: ``phi`` are the logits themselves."""

    name = "sigmoid"

    def probs(self, phi):
        return torch.sigmoid(phi)

    def logits(self, phi):
        return phi

    def inverse(self, probs):
        return torch.logit(_as_probs(probs))


class ScaledSigmoid(Parameterization):
    """``pi = sigmoid(k phi)``; L0-ARM uses ``k = 7``.

    Parameters
    ----------
    k : float
        Positive slope.
    """

    name = "scaled_sigmoid"

    def __init__(self, k: float = 7.0) -> None:
        k = float(k)
        if not k > 0:
            raise ValueError(f"k must be positive; got {k}")
        self.k = k

    def probs(self, phi):
        return torch.sigmoid(self.k * phi)

    def logits(self, phi):
        return self.k * phi

    def inverse(self, probs):
        return torch.logit(_as_probs(probs)) / self.k

    def __repr__(self):
        return f"ScaledSigmoid(k={self.k})"


class HardSigmoid(Parameterization):
    """``pi = clamp(k phi / 6 + 1/2, 0, 1)`` (PyTorch's ``hardsigmoid`` of ``k phi``).

    Saturates at exactly 0 and 1; gradients through saturated gates are 0 (see the module
    docstring), never NaN.
    """

    name = "hard_sigmoid"

    def __init__(self, k: float = 1.0) -> None:
        k = float(k)
        if not k > 0:
            raise ValueError(f"k must be positive; got {k}")
        self.k = k

    def probs(self, phi):
        return (self.k * phi / 6.0 + 0.5).clamp(0.0, 1.0)

    def inverse(self, probs):
        return (_as_probs(probs) - 0.5) * 6.0 / self.k

    def __repr__(self):
        return f"HardSigmoid(k={self.k})"


class CallableParameterization(Parameterization):
    """Any user function ``phi -> pi`` with values in ``[0, 1]``.

    Parameters
    ----------
    fn : callable
        Differentiable map from parameters to probabilities.
    inverse : callable, optional
        Its inverse, used for initialization.
    """

    name = "callable"

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], inverse=None) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable; got {type(fn).__name__}")
        self.fn = fn
        self._inverse = inverse

    def probs(self, phi):
        p = self.fn(phi)
        if not isinstance(p, torch.Tensor) or p.shape != phi.shape:
            got = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(
                f"the parameterization must return a tensor of shape {tuple(phi.shape)}; got {got}"
            )
        return p

    def inverse(self, probs):
        if self._inverse is None:
            return super().inverse(probs)
        return self._inverse(_as_probs(probs))

    def __repr__(self):
        return f"CallableParameterization({getattr(self.fn, '__name__', repr(self.fn))})"


_NAMED = {"sigmoid": Sigmoid, "scaled_sigmoid": ScaledSigmoid, "hard_sigmoid": HardSigmoid}


def available_parameterizations() -> list[str]:
    """Names accepted by :func:`get_parameterization`."""
    return sorted(_NAMED)


def get_parameterization(spec: str | Parameterization | Callable, **options) -> Parameterization:
    """Build a parameterization from a name, an instance or a callable ``phi -> pi``."""
    if isinstance(spec, Parameterization):
        return spec
    if isinstance(spec, str):
        key = spec.strip().lower().replace("-", "_")
        if key not in _NAMED:
            raise ValueError(
                f"unknown parameterization {spec!r}; expected one of "
                f"{', '.join(available_parameterizations())} or a callable"
            )
        return _NAMED[key](**options)
    if callable(spec):
        return CallableParameterization(spec, **options)
    raise TypeError(
        f"parameterization must be a name, a Parameterization or a callable; got {spec!r}"
    )
