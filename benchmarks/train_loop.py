"""Throughput of the whole training loop (``train()``), not just one step, on WRN-28-10.

``benchmarks/gpu_wrn.py`` times bare training steps. This script times what a user runs:
:func:`applications.sparsify.train.train` on random CIFAR-shaped data, epoch by epoch
(``epoch_time_s`` of ``metrics.jsonl``: the training steps, data slicing, metric reads and
progress, without evaluation), and compares the loop's settings:

``per-step reads, NCHW``   the loss, penalty and error count read to the host after every
                           step (a host-device synchronisation each step) and convolutions in
                           the default memory layout: the loop before version 0.1's speed work.
``per-step reads``         the same with channels-last convolutions.
``batched reads``          the defaults: statistics kept on the device and read every
                           :data:`~applications.sparsify.step_log.ASYNC_READ_INTERVAL` steps,
                           channels-last convolutions.

for L0-ARM, and the default loop for L0-HC and the dense network.

Timing: one global warm-up (``--warmup-epochs`` per variant, discarded), then ``--rounds``
interleaved rounds; in each round every variant trains ``--round-epochs`` more epochs
(resuming its own run from the checkpoint of the previous round), in an order rotated by
one place each round, so that drift of the machine (clocks, temperature, other load) hits
every variant alike. A variant's time in a round is its mean s/epoch over the round's block;
the table gives the median over rounds, as images per second, and ratios to the first
variant and to dense: of the medians, and ``paired`` (the median over rounds of the ratio
within the round).

Usage::

    python benchmarks/train_loop.py            # CUDA: writes benchmarks/results/train_loop_gpu.json
    python benchmarks/train_loop.py --smoke    # CPU check: writes .../train_loop_smoke.json

Without ``--out``, a run with other settings than the defaults writes
``train_loop_<device>_<settings>.json`` next to them, never the committed result.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from applications.sparsify import results as results_mod  # noqa: E402
from applications.sparsify import train as train_mod  # noqa: E402
from applications.sparsify.data import random_cifar_like  # noqa: E402
from applications.sparsify.step_log import host_read_interval  # noqa: E402
from applications.sparsify.train import TrainConfig, train, train_dense  # noqa: E402
from applications.toys._common import environment  # noqa: E402
from benchmarks._output import settings_path  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

VARIANTS: list[dict[str, Any]] = [
    {"name": "L0-ARM per-step reads, NCHW", "estimator": "arm", "every": 1,
     "channels_last": False},
    {"name": "L0-ARM per-step reads", "estimator": "arm", "every": 1, "channels_last": None},
    {"name": "L0-ARM batched reads", "estimator": "arm", "every": None, "channels_last": None},
    {"name": "L0-HC batched reads", "estimator": "hard_concrete", "every": None,
     "channels_last": None},
    {"name": "dense batched reads", "estimator": None, "every": None, "channels_last": None},
]


def run_variant(variant: dict[str, Any], args: argparse.Namespace, data, out: Path,
                epochs: int) -> list[float]:
    """Train one variant up to ``epochs`` epochs, resuming from its checkpoint in ``out``
    when an earlier call left one; returns the training times (s) of the epochs run now."""
    done = 0
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        done = len(metrics.read_text().splitlines())
    original_every, original_cl = train_mod.host_read_interval, train_mod._channels_last
    original_plot = results_mod.plot_run
    # the run plot (summary.png, in a temporary folder) is not timed but costs wall time
    results_mod.plot_run = lambda *a, **k: None
    if variant["every"] is not None:
        train_mod.host_read_interval = lambda device: variant["every"]
    if variant["channels_last"] is False:
        train_mod._channels_last = lambda net, device: False
    try:
        config = TrainConfig(
            model="wrn", dataset="random_cifar_like", estimator=variant["estimator"] or "arm",
            lam=1e-4, epochs=epochs, batch_size=args.batch, lr=0.1, optimizer="sgd",
            device=args.device, amp=args.amp, progress=False, seed=0, out=str(out),
            model_options={"depth": args.depth, "width": args.width}, resume=done > 0,
        )
        if variant["estimator"] is None:
            train_dense(config, data=data)
        else:
            train(config, data=data)
    finally:
        train_mod.host_read_interval, train_mod._channels_last = original_every, original_cl
        results_mod.plot_run = original_plot
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [float(r["epoch_time_s"]) for r in rows[done:]]


def time_variants(variants: list[dict[str, Any]], args: argparse.Namespace, data,
                  folder: Path, log: bool = False) -> tuple[list, list]:
    """One global warm-up (``args.warmup_epochs`` per variant, discarded), then
    ``args.rounds`` rounds in which every variant trains ``args.round_epochs`` more epochs,
    in an order rotated by one place each round.

    Returns the warm-up epoch times per variant and, per variant and round, the epoch
    times of that round's block.
    """
    n = len(variants)
    done = [0] * n
    warmup: list[list[float]] = [[] for _ in variants]
    rounds: list[list[list[float]]] = [[[] for _ in range(args.rounds)] for _ in variants]
    if args.warmup_epochs > 0:
        for i, variant in enumerate(variants):
            done[i] += args.warmup_epochs
            warmup[i] = run_variant(variant, args, data, folder / f"v{i}", done[i])
    for r in range(args.rounds):
        for j in range(n):
            i = (j + r) % n  # rotate the order between rounds: drift hits every variant alike
            done[i] += args.round_epochs
            rounds[i][r] = run_variant(variants[i], args, data, folder / f"v{i}", done[i])
        if log:
            print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    return warmup, rounds


def summarize(variants: list[dict[str, Any]], warmup, rounds, args) -> list[dict[str, Any]]:
    """Rows: medians over rounds of the per-round seconds per epoch, ratios of the medians
    and paired ratios (median over rounds of the ratio within the round)."""
    per_round = [[statistics.fmean(block) for block in blocks] for blocks in rounds]
    names = [v["name"] for v in variants]
    base_i = 0
    dense_i = names.index("dense batched reads") if "dense batched reads" in names else 0
    medians = [statistics.median(ts) for ts in per_round]
    rows = []
    for i, variant in enumerate(variants):
        ts, med = per_round[i], medians[i]
        rows.append({
            "variant": variant["name"],
            "warmup_epoch_times_s": warmup[i],
            "round_epoch_times_s": rounds[i],
            "epoch_times_s": warmup[i] + [t for block in rounds[i] for t in block],
            "round_s_per_epoch": ts,
            "s_per_epoch": med,
            "images_per_s": args.batch * args.steps / med,
            "speedup_vs_first": medians[base_i] / med,
            "speedup_vs_first_paired": statistics.median(
                b / t for b, t in zip(per_round[base_i], ts)),
            "time_ratio_to_dense": med / medians[dense_i],
            "time_ratio_to_dense_paired": statistics.median(
                t / d for t, d in zip(ts, per_round[dense_i])),
        })
    return rows


def default_out(args: argparse.Namespace, parser: argparse.ArgumentParser,
                device: torch.device) -> Path:
    """``RESULTS/train_loop_smoke.json`` for ``--smoke``; ``train_loop_gpu.json`` (CUDA) or
    ``train_loop_cpu.json`` with the default settings; otherwise a name that spells out
    the settings that differ from the defaults (:func:`benchmarks._output.settings_path`:
    a committed result is never overwritten by a run with other settings unless ``--out``
    names it). ``--no-amp`` counts on CUDA only: elsewhere there is no autocast to turn
    off."""
    if args.smoke:
        return RESULTS / "train_loop_smoke.json"
    stem = "train_loop_" + ("gpu" if device.type == "cuda" else device.type)
    ignore = _NOT_SETTINGS | ({"amp"} if device.type != "cuda" else set())
    return settings_path(stem, args, parser, ignore=ignore, results=RESULTS)


#: Options that do not change what is measured (left out of default output names).
_NOT_SETTINGS = frozenset({"out", "device"})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=28)
    p.add_argument("--width", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=40, help="training steps per epoch")
    p.add_argument("--rounds", type=int, default=5,
                   help="timed rounds (each: every variant, rotating order)")
    p.add_argument("--round-epochs", type=int, default=1,
                   help="epochs every variant trains in each round")
    p.add_argument("--warmup-epochs", type=int, default=1,
                   help="epochs per variant before the rounds (one global warm-up, discarded)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-amp", dest="amp", action="store_false",
                   help="float32 instead of bf16 autocast (autocast is CUDA only)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny WRN on the CPU, 2 rounds of 1 epoch after 1 warm-up epoch")
    p.add_argument("--out", default=None,
                   help="JSON output path (default: benchmarks/results/train_loop_gpu.json "
                   "on CUDA, train_loop_smoke.json with --smoke; see default_out)")
    args = p.parse_args(argv)
    if args.smoke:
        args.depth, args.width, args.batch, args.steps = 10, 1, 16, 3
        args.rounds, args.round_epochs, args.warmup_epochs = 2, 1, 1
        args.device = "cpu"
    if args.rounds < 1 or args.round_epochs < 1 or args.warmup_epochs < 0:
        p.error("--rounds and --round-epochs must be >= 1, --warmup-epochs >= 0")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    args.device = str(device)
    args.amp = bool(args.amp and device.type == "cuda")
    out = Path(args.out) if args.out else default_out(args, p, device)
    x, y = random_cifar_like(args.batch * args.steps, seed=0)
    xt, yt = random_cifar_like(args.batch, seed=1)
    data = (TensorDataset(x, y), TensorDataset(xt, yt))

    with tempfile.TemporaryDirectory() as tmp:
        warmup, rounds = time_variants(VARIANTS, args, data, Path(tmp), log=not args.smoke)
    rows = summarize(VARIANTS, warmup, rounds, args)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"train() loop, WRN-{args.depth}-{args.width}, batch {args.batch}, "
          f"{args.steps} steps/epoch, {'bf16' if args.amp else 'fp32'}, {name or device}")
    print(f"host reads every {host_read_interval(device)} steps by default on {device.type}; "
          f"{args.rounds} interleaved rounds of {args.round_epochs} epoch(s) per variant "
          f"after {args.warmup_epochs} warm-up epoch(s)")
    print(f"{'variant':<30} {'s/epoch':>9} {'img/s':>9} {'speed-up':>9} {'paired':>7} "
          f"{'/dense':>8} {'paired':>7}")
    for r in rows:
        print(f"{r['variant']:<30} {r['s_per_epoch']:>9.3f} {r['images_per_s']:>9.0f} "
              f"{r['speedup_vs_first']:>8.2f}x {r['speedup_vs_first_paired']:>6.2f}x "
              f"{r['time_ratio_to_dense']:>7.2f}x {r['time_ratio_to_dense_paired']:>6.2f}x")
    result = {
        "benchmark": "train_loop", "device": name or str(device), "device_type": device.type,
        "argv": list(sys.argv) if argv is None else [f"benchmarks/{Path(__file__).name}", *argv],
        "settings": {**vars(args), "out": str(out)},
        "torch": torch.__version__, "environment": environment(),
        "timing": "per variant and round: mean s/epoch of the round's block; s_per_epoch: "
                  "median over rounds; *_paired: median over rounds of the within-round ratio",
        "default_read_interval": host_read_interval(device), "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
