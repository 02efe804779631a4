"""Flush subnormal floats to zero while training on the CPU.

Why: a unit that stays gated off gets an exactly zero weight gradient, step after step.
Adam then multiplies the first moment of each of its weights by ``beta1 = 0.9`` every
step, so after about 700-900 steps those moments are subnormal numbers (below about
1.2e-38 in float32) until they underflow to zero; a unit switched on once in a while starts
the decay again. x86 CPUs handle subnormal operands in microcode, tens of times slower than
normal ones, so the optimizer step of a thinned network slows down just when it should be
cheapest. On this project's CPU an L0-ARM step of the MLP with 80% of its units off took
1.37x the dense step after 1,200 steps instead of 0.87x (``docs/sparsify/performance.md``).

Flush-to-zero mode (``torch.set_flush_denormal``) treats such values as zero. It changes
results only below the smallest normal float, where the values are far beneath any
gradient, weight or moment that moves a model. CUDA kernels handle subnormals at full
speed, so nothing is switched there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["flush_denormals", "flushing_denormals"]

#: The smallest positive subnormal float32 is about 1.4e-45; this one is safely inside the
#: subnormal range, so flush-to-zero mode reads it as zero.
_SUBNORMAL = 1e-40


def flushing_denormals() -> bool:
    """Whether the CPU currently flushes subnormal floats to zero (in this thread)."""
    probe = torch.tensor([_SUBNORMAL], dtype=torch.float32)
    return bool((probe * 1.0).item() == 0.0)


@contextlib.contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[bool]:
    """Context in which the CPU flushes subnormal floats to zero; restores the previous mode.

    Parameters
    ----------
    enabled : bool
        ``False`` makes the context do nothing (for a switch in the caller).

    Yields
    ------
    bool
        Whether flushing is on inside the context (``False`` where the CPU does not
        support it, e.g. without SSE3, or when ``enabled`` is false).
    """
    if not enabled:
        yield flushing_denormals()
        return
    before = flushing_denormals()
    supported = torch.set_flush_denormal(True)
    try:
        yield supported or before
    finally:
        if supported and not before:
            torch.set_flush_denormal(False)
