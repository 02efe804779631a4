"""Data-parallel training equals single-process training on the same global batch.

Two CPU processes (gloo, launched with ``torchrun --standalone`` exactly as the docs say)
train the same L0-ARM MLP as one process with the same seed and global batch size (7, so
the two shards are uneven: 4 and 3 examples); the
final weights, gate parameters and test error must agree up to float rounding.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from applications.sparsify.distributed import ShardedBatchSampler, shard

ROOT = Path(__file__).resolve().parents[3]
RTOL, ATOL = 1e-4, 1e-5  # one process vs two: float rounding in the gradient all-reduce

COMMON = [
    "sparsify",
    "--model",
    "mlp",
    "--dataset",
    "mnist5k",
    "--limit",
    "300",
    "--estimator",
    "arm",
    "--lam",
    "0.5",
    "--epochs",
    "2",
    "--batch-size",
    "7",
    "--lr",
    "0.01",
    "--seed",
    "3",
    "--device",
    "cpu",
    "--no-progress",
    "--model-options",
    '{"hidden": [16]}',
    "--init-drop-rate",
    "0.3",
]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        args, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    return proc


def _initial_state(out: Path) -> dict[str, torch.Tensor]:
    """The state of the gated network the run with ``COMMON`` starts from (same seed)."""
    from applications.cli import build_parser
    from applications.sparsify import train as train_mod
    from applications.sparsify.cli import config_from_args
    from applications.sparsify.network import GatedNetwork

    config = config_from_args(build_parser("sparsify").parse_args([*COMMON, "--out", str(out)]))
    module = train_mod._build_module(config, (1, 28, 28), 10, gated=True)
    return GatedNetwork(module, config.estimator).state_dict()


def _final_state(out: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)
    return ckpt["model"]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "ddp"
    _run([sys.executable, "-m", "binopt", *COMMON, "--out", str(single)])
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "binopt",
            *COMMON,
            "--out",
            str(multi),
        ]
    )

    s1 = json.loads((single / "summary.json").read_text())
    s2 = json.loads((multi / "summary.json").read_text())
    assert s2["world_size"] == 2 and s1["world_size"] == 1
    a, b = _final_state(single), _final_state(multi)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=RTOL, atol=ATOL, msg=key)
    # training moved the parameters (the comparison is not between two initial states):
    # every gate parameter and weight is, somewhere, 100 comparison tolerances from the
    # network the same seed builds before training
    init = _initial_state(single)
    assert init.keys() == a.keys()
    phi_keys = [k for k in a if k.endswith("phi")]
    weight_keys = [k for k in a if k.endswith("weight")]
    assert len(phi_keys) == 2 and len(weight_keys) == 2
    for key in phi_keys + weight_keys:
        moved = float((a[key] - init[key]).abs().max())
        tol = ATOL + RTOL * float(a[key].abs().max())
        assert moved > 100 * tol, f"{key}: moved {moved:.3g}, tolerance {tol:.3g}"
    rows = (single / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in rows] == [1, 2]
    assert s1["test_error"] == pytest.approx(s2["test_error"], abs=1e-9)
    assert s1["kept_units"] == s2["kept_units"]
    # only rank 0 wrote: one metrics line per epoch, no duplicate lines
    lines = (multi / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_sharded_sampler_partitions_each_global_batch():
    n, batch, world = 23, 7, 3
    samplers = [
        ShardedBatchSampler(n, batch, seed=5, rank=r, world_size=world) for r in range(world)
    ]
    for s in samplers:
        s.set_epoch(2)
    single = ShardedBatchSampler(n, batch, seed=5)
    single.set_epoch(2)
    per_rank = [list(s) for s in samplers]
    for k, global_batch in enumerate(single):
        union = [i for r in range(world) for i in per_rank[r][k]]
        assert union == global_batch  # contiguous shards in rank order
        sizes = [len(per_rank[r][k]) for r in range(world)]
        assert max(sizes) - min(sizes) <= 1
    assert sorted(i for b in single for i in b) == list(range(n))
    # a new epoch reshuffles; the same epoch repeats
    single.set_epoch(3)
    other = list(single)
    single.set_epoch(2)
    assert list(single) != other


def test_shard_sizes_and_order():
    batch = torch.arange(10)
    parts = [shard(batch, r, 4) for r in range(4)]
    assert [p.tolist() for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7], [8, 9]]


def test_sampler_rejects_batch_smaller_than_world():
    with pytest.raises(ValueError, match="global batch size"):
        ShardedBatchSampler(10, 1, seed=0, rank=0, world_size=2)


@pytest.mark.parametrize("n,batch,world", [(23, 7, 3), (20, 5, 1), (9, 4, 2), (5, 8, 4)])
def test_local_indices_are_the_iterated_batches_in_order(n, batch, world):
    # (23, 7, 3): the last global batch has 2 examples, so rank 2's last shard is empty
    for rank in range(world):
        sampler = ShardedBatchSampler(n, batch, seed=11, rank=rank, world_size=world)
        for epoch in (1, 2, 3):
            sampler.set_epoch(epoch)
            indices, sizes = sampler.local_indices()
            assert indices.dtype == torch.long and len(sizes) == len(sampler)
            assert sum(sizes) == indices.numel()
            assert [p.tolist() for p in indices.split(sizes)] == list(sampler)


def test_sampler_takes_the_largest_seed():
    sampler = ShardedBatchSampler(10, 3, seed=2**63 - 1)  # the largest --seed
    sampler.set_epoch(5)
    assert sorted(i for b in sampler for i in b) == list(range(10))
    # small seeds keep their permutation (the reduction mod 2**64 changes nothing there)
    small = ShardedBatchSampler(10, 10, seed=4)
    small.set_epoch(2)
    g = torch.Generator().manual_seed(4 * 100_003 + 2)
    assert list(small) == [torch.randperm(10, generator=g).tolist()]
