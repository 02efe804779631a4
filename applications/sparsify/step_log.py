"""Per-step training statistics, read to the host in batches.

Turning a CUDA scalar into a Python number (``float(loss)``) waits until the GPU has
finished every kernel queued so far. Doing that several times per step (loss, data loss,
penalty, error count) drains the launch queue each step, and the GPU idles while Python
prepares the next step. :class:`StepLog` keeps each step's numbers on the device and copies
them to the host in one transfer every ``every`` steps and at the end of the epoch. A
non-finite loss is still attributed to the exact step where it first appeared; the price is
that up to ``every - 1`` further steps run before training stops, which changes nothing
that is kept (the checkpoint of the last finished epoch is what survives).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

#: Steps between host reads on a CUDA (or other asynchronous) device. On the CPU a read is
#: free, so every step is read at once (see :func:`host_read_interval`).
ASYNC_READ_INTERVAL = 16


def host_read_interval(device: torch.device) -> int:
    """Steps between host reads of the training statistics on ``device``.

    1 on the CPU (reading a CPU scalar costs nothing and a divergence stops at once),
    :data:`ASYNC_READ_INTERVAL` on accelerators, whose kernels run asynchronously.
    """
    return 1 if torch.device(device).type == "cpu" else ASYNC_READ_INTERVAL


@dataclass
class NonFiniteLoss:
    """The first step of a flushed window whose loss is NaN or infinite."""

    step: int
    value: float


@dataclass
class StepLog:
    """Accumulates ``loss``, ``data_loss``, ``penalty`` and the error count per step.

    Parameters
    ----------
    every : int
        Steps between host reads (>= 1).

    Attributes
    ----------
    sums : dict[str, float]
        Sample-weighted sums over the steps read so far: ``loss`` (data loss + penalty),
        ``data_loss`` and ``penalty``.
    wrong, seen : int
        Misclassified and seen training examples over the steps read so far.
    """

    every: int
    sums: dict[str, float] = field(
        default_factory=lambda: {"loss": 0.0, "data_loss": 0.0, "penalty": 0.0})
    wrong: int = 0
    seen: int = 0
    _values: list[torch.Tensor] = field(default_factory=list, repr=False)
    _meta: list[tuple[int, int, float]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every must be an integer >= 1; got {self.every!r}")

    @property
    def pending(self) -> int:
        """Steps recorded but not yet read to the host."""
        return len(self._values)

    def add(self, step: int, loss: torch.Tensor, data_loss: torch.Tensor,
            penalty: torch.Tensor, wrong: torch.Tensor, n: int,
            scale: float = 1.0) -> NonFiniteLoss | None:
        """Record one step; reads the pending steps to the host every ``every`` steps.

        ``data_loss / scale`` is this step's data loss (``scale`` undoes the per-rank
        scaling of distributed training). Returns the first non-finite loss among the steps
        read now, if any (the steps before it are counted, it and later ones are not).
        """
        row = torch.stack([loss.detach().float().reshape(()),
                           data_loss.detach().float().reshape(()),
                           penalty.detach().float().reshape(()),
                           wrong.detach().float().reshape(())])
        self._values.append(row)
        self._meta.append((step, n, scale))
        if len(self._values) >= self.every:
            return self.flush()
        return None

    def flush(self) -> NonFiniteLoss | None:
        """Read all pending steps to the host (one transfer); see :meth:`add`."""
        if not self._values:
            return None
        rows = torch.stack(self._values).cpu().double().tolist()
        meta = self._meta
        self._values, self._meta = [], []
        for (step, n, scale), (loss, data, penalty, wrong) in zip(meta, rows):
            if not math.isfinite(loss):
                return NonFiniteLoss(step, loss)
            data = data / scale
            self.sums["loss"] += (data + penalty) * n
            self.sums["data_loss"] += data * n
            self.sums["penalty"] += penalty * n
            self.wrong += int(wrong)
            self.seen += n
        return None
