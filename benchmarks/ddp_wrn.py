"""Single-GPU DistributedDataParallel overhead for L0-ARM training of a Wide-ResNet.

Times the same L0-ARM training step (WRN, batch 128, random CIFAR-shaped data) without DDP
and wrapped in DDP with one process (NCCL on CUDA, gloo on CPU), interleaved in one run, and
reports the ratio. The bar: DDP within 10% of the plain step.

Timing: a warm-up of both, then ``--rounds`` rounds of ``--steps`` steps of each, the order
of plain and DDP alternating between rounds; ``ddp_over_plain`` is the ratio of the medians
over rounds, ``ddp_over_plain_paired`` the median over rounds of the ratio within the round.

    python benchmarks/ddp_wrn.py              # GPU: writes benchmarks/results/ddp_wrn_gpu.json
    python benchmarks/ddp_wrn.py --bf16       # the same (the command in docs/distributed.md)
    python benchmarks/ddp_wrn.py --smoke      # CPU check: writes .../ddp_wrn_smoke.json

bfloat16 autocast is the default on CUDA (``--no-bf16``: float32), as in
``benchmarks/gpu_wrn.py`` and ``benchmarks/train_loop.py``: the GPU result is meant to be
recorded with it (``--bf16`` in docs/distributed.md), so that command is a run with the
default settings and keeps the committed name ``ddp_wrn_gpu.json``, and a float32 run can
never overwrite it. On the CPU there is no autocast and the flag changes nothing, so it is
not part of the CPU names.

Without ``--out`` the JSON goes to ``benchmarks/results/`` of this repository (whatever the
working directory): ``ddp_wrn_gpu.json`` on CUDA, ``ddp_wrn_cpu.json`` on the CPU with the
default settings, ``ddp_wrn_smoke.json`` with ``--smoke``; a run with other settings writes
``ddp_wrn_<gpu|cpu>_<settings>.json`` naming the settings that differ from the defaults
(e.g. ``ddp_wrn_cpu_steps-3.json``, ``ddp_wrn_gpu_bf16-False.json``), never the committed
result.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from applications.sparsify.distributed import DistributedContext, wrap_ddp  # noqa: E402
from applications.sparsify.models import WideResNet  # noqa: E402
from applications.sparsify.network import GatedNetwork  # noqa: E402
from applications.toys._common import environment  # noqa: E402
from benchmarks._output import settings_path  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_out(args: argparse.Namespace, parser: argparse.ArgumentParser,
                device: torch.device) -> Path:
    """Where the JSON goes without ``--out`` (relative to the repository, not the cwd):
    ``RESULTS/ddp_wrn_smoke.json`` for ``--smoke``; ``ddp_wrn_gpu.json`` (CUDA) or
    ``ddp_wrn_cpu.json`` with the default settings; otherwise a name that spells out the
    settings that differ (:func:`benchmarks._output.settings_path`). ``--bf16`` counts on
    CUDA only (see the module docstring)."""
    if args.smoke:
        return RESULTS / "ddp_wrn_smoke.json"
    cuda = device.type == "cuda"
    return settings_path("ddp_wrn_gpu" if cuda else "ddp_wrn_cpu", args, parser,
                         ignore=() if cuda else ("bf16",), results=RESULTS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=28)
    p.add_argument("--width", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--estimator", default="arm")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="bfloat16 autocast on CUDA (the default; --no-bf16: float32; "
                   "no effect on the CPU)")
    p.add_argument("--smoke", action="store_true", help="tiny CPU configuration")
    p.add_argument("--out", default=None,
                   help="JSON output (default: benchmarks/results/ddp_wrn_gpu.json on CUDA, "
                   "ddp_wrn_cpu.json on the CPU with the default settings, else a name "
                   "spelling out the settings that differ; ddp_wrn_smoke.json with --smoke)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.smoke:
        args.depth, args.width, args.batch_size = 10, 1, 8
        args.steps, args.rounds, args.warmup = 2, 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_path = Path(args.out) if args.out else default_out(args, p, device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        ctx = DistributedContext(rank=0, world_size=1, local_rank=0, backend=backend)
        torch.manual_seed(0)
        torch.backends.cudnn.benchmark = True

        def make():
            module = WideResNet(args.depth, args.width, num_classes=10).to(device)
            if device.type == "cuda":
                module = module.to(memory_format=torch.channels_last)
            return GatedNetwork(module, args.estimator, lam=1e-3, num_train=50_000,
                                validate_args=False)

        plain_net, ddp_net = make(), make()
        steps = {
            "plain": (wrap_ddp(plain_net, DistributedContext(), device), plain_net),
            "ddp": (wrap_ddp(ddp_net, ctx, device), ddp_net),
        }
        opts = {k: torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
                for k, (_, net) in steps.items()}
        x = torch.randn(args.batch_size, 3, 32, 32, device=device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (args.batch_size,), device=device)
        amp = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if (args.bf16 and device.type == "cuda")
            else None
        )

        def run(name: str, n: int) -> float:
            step, _ = steps[name]
            opt = opts[name]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                opt.zero_grad(set_to_none=True)
                if amp is not None:
                    with amp:
                        out = step(x, y)
                else:
                    out = step(x, y)
                out.loss.backward()
                opt.step()
            _sync(device)
            return (time.perf_counter() - t0) / n

        names = list(steps)
        for name in names:
            run(name, args.warmup)
        times: dict[str, list[float]] = {k: [] for k in steps}
        orders = []
        for r in range(args.rounds):
            # interleaved rounds, the order rotated each round: drift and the cost of
            # following the other variant hit both alike
            order = names[r % len(names):] + names[:r % len(names)]
            orders.append(order)
            for name in order:
                times[name].append(run(name, args.steps))
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = med["ddp"] / med["plain"]
        paired = statistics.median(d / q for d, q in zip(times["ddp"], times["plain"]))
        result = {
            "benchmark": "ddp_wrn",
            "command": " ".join([sys.executable, *sys.argv]),
            "argv": (list(sys.argv) if argv is None
                     else [f"benchmarks/{Path(__file__).name}", *argv]),
            "settings": {**vars(args), "out": str(out_path)},
            "device": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor(),
            "torch": torch.__version__,
            "environment": environment(),
            "backend": backend,
            "model": f"WRN-{args.depth}-{args.width}",
            "batch_size": args.batch_size,
            "estimator": args.estimator,
            "bf16": bool(args.bf16 and device.type == "cuda"),
            "step_s_median": med,
            "images_per_s": {k: args.batch_size / v for k, v in med.items()},
            "ddp_over_plain": ratio,
            "ddp_over_plain_paired": paired,
            "bar": "ddp_over_plain <= 1.10",
            "bar_met": ratio <= 1.10,
            "rounds": times,
            "round_orders": orders,
        }
        print(f"{'mode':<8}{'step ms':>10}{'img/s':>10}")
        for k in steps:
            print(f"{k:<8}{med[k] * 1e3:>10.2f}{args.batch_size / med[k]:>10.1f}")
        print(f"DDP / plain = {ratio:.3f}, paired {paired:.3f} "
              f"(bar <= 1.10: {'met' if ratio <= 1.10 else 'NOT met'})")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out_path}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
