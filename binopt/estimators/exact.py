"""Exact gradients by enumerating all ``2^D`` binary states (small ``D`` only).

``E = sum_z q(z) f(z)`` with ``q(z) = prod_i pi_i^{z_i} (1 - pi_i)^{1 - z_i}``; autograd through
``q`` gives ``d E / d alpha_i = sum_z q(z) f(z) (z_i - sigmoid(alpha_i))`` exactly, and through
``f`` the exact gradient for parameters inside ``f``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .._structure import Structure, flatten
from .._validation import check_num_samples
from .base import Estimator, ObjectiveFn, no_autocast, noise_dtype, register_estimator

#: Largest total number of binary units enumerated by default (2^20 states).
MAX_EXACT_DIM = 20


def all_states(dim: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """All ``2^dim`` binary vectors as a ``(2^dim, dim)`` tensor (row ``k`` is ``k`` in binary,
    most significant bit first)."""
    codes = torch.arange(2**dim, device=device)
    bits = 2 ** torch.arange(dim - 1, -1, -1, device=device)
    return (codes.unsqueeze(1) // bits % 2).to(dtype)


@register_estimator(aliases=("enumeration", "exact_enumeration"))
class Exact(Estimator):
    """Exact gradient by enumeration; deterministic and unbiased, ``2^D`` evaluations.

    Parameters
    ----------
    max_dim : int
        Refuse problems with more than ``max_dim`` binary units in total (default 20).
    """

    name = "exact"
    unbiased = True
    supports_rows = False

    def __init__(self, max_dim: int = MAX_EXACT_DIM, **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(max_dim, bool) or not isinstance(max_dim, int):
            raise TypeError(f"max_dim must be an int (units in total); got {max_dim!r}")
        if max_dim < 0:
            raise ValueError(f"max_dim must be >= 0; got {max_dim}")
        self.max_dim = max_dim
        self._dim: int | None = None

    @property
    def evaluations_per_estimate(self) -> int:
        """``2^D`` for the last problem seen (``-1`` before any)."""
        return -1 if self._dim is None else 2**self._dim

    # The estimate is deterministic: all ``num_samples`` estimates are the same number, so
    # enumerate once (O(2^D) time and memory) instead of once per estimate (O(N 2^D)).
    def surrogate(self, f: ObjectiveFn, logits: Structure, num_samples: int = 1) -> torch.Tensor:
        check_num_samples(num_samples)
        return super().surrogate(f, logits, 1)

    def grad(self, f: ObjectiveFn, logits: Structure, num_samples: int = 1) -> Structure:
        n = check_num_samples(num_samples)
        leaves, rebuild = flatten(super().grad(f, logits, 1))
        return rebuild([g.expand((n,) + tuple(g.shape[1:])).clone() for g in leaves])

    def _estimate(self, call_f: Callable, alphas: list[torch.Tensor]) -> torch.Tensor:
        sizes = [a[0].numel() for a in alphas]
        dim = sum(sizes)
        if dim > self.max_dim:
            raise ValueError(
                f"exact enumeration is limited to {self.max_dim} binary units (2^{self.max_dim} "
                f"states); got {dim}. Use a Monte Carlo estimator for larger problems."
            )
        self._dim = dim
        ref = alphas[0]
        # The enumeration runs in the leaves' common dtype, but at least float32: in bfloat16
        # the oracle's gradient was off by a third of its size (a rounded log q on every
        # state), and leaves of different dtypes could not share one matrix product. The
        # gradient reaches each leaf in its own dtype, rounded once.
        common = functools.reduce(torch.promote_types, [a.dtype for a in alphas])
        work = noise_dtype(common)
        states = all_states(dim, device=ref.device, dtype=work)  # (2^D, D)
        # f gets a copy, each leaf in its own dtype: f may modify its samples in place, and
        # autograd keeps ``states``
        parts = states.split(sizes, dim=1)
        samples = [p.reshape((p.shape[0],) + tuple(a.shape[1:])).to(a.dtype, copy=True)
                   for p, a in zip(parts, alphas)]
        values = call_f(samples)  # (2^D,)
        n = ref.shape[0]
        flat_alpha = torch.cat([a.reshape(n, -1).to(work) for a in alphas], dim=1)  # (N, D)
        # in that precision even under autocast: a bf16 matmul gave the oracle a 17% error
        with no_autocast(ref.device.type):
            log_q = (states @ F.logsigmoid(flat_alpha).T
                     + (1 - states) @ F.logsigmoid(-flat_alpha).T)
            out = (log_q.exp() * values.unsqueeze(1)).sum(0)  # (N,)
        return out.to(torch.promote_types(values.dtype, common))


def exact_expectation(f: ObjectiveFn, logits: Structure, max_dim: int = MAX_EXACT_DIM):
    """``E_{z ~ q}[f(z)]`` by enumeration, differentiable w.r.t. the logits and ``f``'s
    parameters."""
    return Exact(max_dim=max_dim).surrogate(f, logits)


def exact_grad(f: ObjectiveFn, logits: Structure, max_dim: int = MAX_EXACT_DIM) -> Structure:
    """The exact gradient ``d E[f] / d logits`` by enumeration (the test oracle).

    Parameters
    ----------
    f : callable
        Objective following the estimator contract (samples with a leading dimension in,
        one value per sample out).
    logits : tensor, list or dict of tensors
        Bernoulli logits; at most ``max_dim`` units in total.

    Returns
    -------
    Same structure as ``logits``, detached.
    """
    _, rebuild = flatten(logits)
    out = Exact(max_dim=max_dim).grad(f, logits, num_samples=1)
    out_leaves, _ = flatten(out)
    return rebuild([g[0] for g in out_leaves])
