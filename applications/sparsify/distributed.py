"""Data-parallel training with ``torch.distributed`` (``torchrun``).

What makes L0-ARM data parallel exactly:

- **Same gates on every rank.** Every rank seeds the estimator's generator with the same seed
  and draws the same number of uniforms per step, so all ranks evaluate the same two ARM gate
  samples (the same two networks).
- **The right average.** ``--batch-size`` is the GLOBAL batch. :class:`ShardedBatchSampler`
  cuts each global batch (the same permutation on every rank) into ``world_size`` contiguous
  shards. Each rank scales its data loss by ``n_local * world_size / n_global``, so the
  mean that DistributedDataParallel takes over ranks equals the loss over the global batch
  even when the last batch does not split evenly. Since the ARM estimate is linear in the two
  loss values, the averaged ``phi``-gradient equals the single-process estimate on the global
  batch; weights likewise. The L0 penalty is added unscaled on every rank, so its average is
  itself.
- **One writer.** Only rank 0 writes metrics, checkpoints and the export; the others wait at
  a barrier, then all ranks read the same checkpoint on ``--resume``.

BatchNorm layers keep per-rank batch statistics (no SyncBatchNorm), which is what a
single process would compute for a batch of the local size.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def env_requests_distributed() -> bool:
    """Whether the process was started by ``torchrun`` (or another launcher) with P > 1."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_type: str) -> DistributedContext:
    """Join the process group described by the launcher's environment variables.

    Uses NCCL on CUDA and gloo on CPU; ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR`` and ``MASTER_PORT`` come from ``torchrun``.
    """
    missing = [
        k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
    ]
    if missing:
        raise RuntimeError(
            "distributed training needs the launcher's environment variables "
            f"({', '.join(missing)} missing): start it with "
            "`torchrun --nproc_per_node P -m binopt sparsify ...`"
        )
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistributedContext(rank=rank, world_size=world, local_rank=local_rank, backend=backend)


def shutdown(ctx: DistributedContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


class ShardedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Global minibatches from a seeded per-epoch permutation, cut into per-rank shards.

    Every rank draws the same permutation (``seed + epoch``), forms the same global batches
    of ``batch_size`` indices, and keeps shard ``rank`` of ``world_size`` contiguous shards of
    each. With ``world_size = 1`` this is an ordinary seeded shuffle, so single-process and
    multi-process runs see exactly the same global batches.

    Call :meth:`set_epoch` before each epoch. Iterating yields each step's indices as a
    list (for a ``DataLoader`` over CPU data); :meth:`local_indices` gives the same indices,
    in the same order, as one tensor, for data that live on the device.
    """

    def __init__(
        self, num_examples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size < world_size:
            raise ValueError(
                f"the global batch size ({batch_size}) must be at least the number of "
                f"processes ({world_size})"
            )
        self.num_examples = int(num_examples)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_batches(self) -> list[torch.Tensor]:
        # (mod 2**64: a generator takes 64-bit seeds; --seed goes up to 2**63 - 1)
        g = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch) % 2**64)
        perm = torch.randperm(self.num_examples, generator=g)
        return list(perm.split(self.batch_size))

    def local_indices(self) -> tuple[torch.Tensor, list[int]]:
        """This rank's shards of the epoch's global batches, concatenated (one CPU tensor),
        and the size of each shard: step ``k`` takes ``indices[sum(sizes[:k]):][:sizes[k]]``,
        exactly the indices that iterating the sampler yields at step ``k``.

        Copied to the device once per epoch, the steps' indices are then slices of a device
        tensor: indexing device data with them needs no host-device synchronisation, while
        indexing with a list builds the index on the host and copies it every step.
        """
        shards = [shard(b, self.rank, self.world_size) for b in self.global_batches()]
        return torch.cat(shards), [int(s.shape[0]) for s in shards]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            yield shard(batch, self.rank, self.world_size).tolist()

    def __len__(self) -> int:
        return (self.num_examples + self.batch_size - 1) // self.batch_size


def shard(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Contiguous shard ``rank`` of ``world_size`` nearly equal shards of ``batch``."""
    n = batch.shape[0]
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return batch[start : start + base + (1 if rank < extra else 0)]


def global_batch_size(local_size: int, ctx: DistributedContext, device: torch.device) -> int:
    """Size of the global batch this local shard belongs to (one all-reduce; syncs)."""
    if not ctx.enabled:
        return local_size
    t = torch.tensor([local_size], device=device)
    dist.all_reduce(t)
    return int(t.item())


class ObjectiveStep(nn.Module):
    """``forward(x, y, scale)`` = the GatedNetwork objective, so DDP can wrap a training step.

    DistributedDataParallel synchronises the gradients of the module whose ``forward`` it
    runs; wrapping the objective (not the plain prediction) lets the estimator's surrogate,
    both stacked gate samples and the L0 penalty all run inside DDP's forward.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0):
        if scale == 1.0:
            out = self.net.objective(x, y)
        else:

            def scaled_loss(outputs, targets, reduction="none"):
                return (
                    torch.nn.functional.cross_entropy(outputs, targets, reduction=reduction) * scale
                )

            out = self.net.objective(x, y, loss_fn=scaled_loss)
        return out


def wrap_ddp(net: nn.Module, ctx: DistributedContext, device: torch.device) -> nn.Module:
    """An :class:`ObjectiveStep` of ``net``, wrapped in DDP when the run is distributed."""
    step = ObjectiveStep(net)
    if not ctx.enabled:
        return step
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(step, device_ids=ids)
