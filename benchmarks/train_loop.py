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

for L0-ARM, and the default loop for L0-HC and the dense network. Every variant runs
``--epochs`` epochs; the first is warm-up and the median of the others is reported, as
images per second and as a ratio to the first variant's time measured in the same run.

Usage::

    python benchmarks/train_loop.py --out benchmarks/results/train_loop_gpu.json  # CUDA
    python benchmarks/train_loop.py --smoke                                        # CPU check
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

from applications.sparsify import train as train_mod  # noqa: E402
from applications.sparsify.data import random_cifar_like  # noqa: E402
from applications.sparsify.step_log import host_read_interval  # noqa: E402
from applications.sparsify.train import TrainConfig, train, train_dense  # noqa: E402

VARIANTS: list[dict[str, Any]] = [
    {"name": "L0-ARM per-step reads, NCHW", "estimator": "arm", "every": 1,
     "channels_last": False},
    {"name": "L0-ARM per-step reads", "estimator": "arm", "every": 1, "channels_last": None},
    {"name": "L0-ARM batched reads", "estimator": "arm", "every": None, "channels_last": None},
    {"name": "L0-HC batched reads", "estimator": "hard_concrete", "every": None,
     "channels_last": None},
    {"name": "dense batched reads", "estimator": None, "every": None, "channels_last": None},
]


def run_variant(variant: dict[str, Any], args: argparse.Namespace, data, out: Path) -> list[float]:
    """Train one variant; returns the per-epoch training times in seconds."""
    original_every, original_cl = train_mod.host_read_interval, train_mod._channels_last
    if variant["every"] is not None:
        train_mod.host_read_interval = lambda device: variant["every"]
    if variant["channels_last"] is False:
        train_mod._channels_last = lambda net, device: False
    try:
        config = TrainConfig(
            model="wrn", dataset="random_cifar_like", estimator=variant["estimator"] or "arm",
            lam=1e-4, epochs=args.epochs, batch_size=args.batch, lr=0.1, optimizer="sgd",
            device=args.device, amp=args.amp, progress=False, seed=0, out=str(out),
            model_options={"depth": args.depth, "width": args.width},
        )
        if variant["estimator"] is None:
            train_dense(config, data=data)
        else:
            train(config, data=data)
    finally:
        train_mod.host_read_interval, train_mod._channels_last = original_every, original_cl
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [float(r["epoch_time_s"]) for r in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=28)
    p.add_argument("--width", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=40, help="training steps per epoch")
    p.add_argument("--epochs", type=int, default=4, help="epochs per variant (first: warm-up)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-amp", dest="amp", action="store_false",
                   help="float32 instead of bf16 autocast (autocast is CUDA only)")
    p.add_argument("--smoke", action="store_true", help="tiny WRN on the CPU, 2 epochs")
    p.add_argument("--out", default=None, help="JSON output path")
    args = p.parse_args(argv)
    if args.smoke:
        args.depth, args.width, args.batch, args.steps, args.epochs = 10, 1, 16, 3, 2
        args.device = "cpu"
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    args.device = str(device)
    args.amp = bool(args.amp and device.type == "cuda")
    x, y = random_cifar_like(args.batch * args.steps, seed=0)
    xt, yt = random_cifar_like(args.batch, seed=1)
    data = (TensorDataset(x, y), TensorDataset(xt, yt))

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, variant in enumerate(VARIANTS):
            times = run_variant(variant, args, data, Path(tmp) / f"v{i}")
            timed = times[1:] if len(times) > 1 else times
            median = statistics.median(timed)
            rows.append({"variant": variant["name"], "epoch_times_s": times,
                         "s_per_epoch": median,
                         "images_per_s": args.batch * args.steps / median})
    base = rows[0]["s_per_epoch"]
    for row in rows:
        row["speedup_vs_first"] = base / row["s_per_epoch"]
    arm = {r["variant"]: r for r in rows}
    dense = arm["dense batched reads"]["s_per_epoch"]
    for row in rows:
        row["time_ratio_to_dense"] = row["s_per_epoch"] / dense

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(f"train() loop, WRN-{args.depth}-{args.width}, batch {args.batch}, "
          f"{args.steps} steps/epoch, {'bf16' if args.amp else 'fp32'}, {name or device}")
    print(f"host reads every {host_read_interval(device)} steps by default on {device.type}")
    print(f"{'variant':<30} {'s/epoch':>9} {'img/s':>9} {'speed-up':>9} {'/dense':>8}")
    for r in rows:
        print(f"{r['variant']:<30} {r['s_per_epoch']:>9.3f} {r['images_per_s']:>9.0f} "
              f"{r['speedup_vs_first']:>8.2f}x {r['time_ratio_to_dense']:>7.2f}x")
    result = {
        "benchmark": "train_loop", "device": name or str(device), "device_type": device.type,
        "settings": vars(args), "torch": torch.__version__,
        "default_read_interval": host_read_interval(device), "rows": rows,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
