"""Inference time of a gated network vs its export (CPU, batch 1024).

For the MNIST MLP (784-300-100-10) and LeNet-5-Caffe pruned with L0-ARM, time the forward
pass of the gated network (eval mode: test-time gates applied to full-width layers) and of
the exported smaller dense model, in the same process, interleaved, median of repeats.

The pruned networks come from a short L0-ARM training on mnist5k (Adam, a large lambda,
stopped once at least ``--target`` of the weights are pruned), or from ``binopt sparsify``
run folders given with ``--run DIR`` (repeatable).

Usage::

    python benchmarks/export_speed.py                     # train, time, write JSON
    python benchmarks/export_speed.py --run runs/mlp --run runs/lenet

Prints a table and writes ``benchmarks/results/export_speed.json`` when every setting is
the default; a run with other settings writes ``export_speed_<settings>.json`` naming the
settings that differ (e.g. ``export_speed_max_epochs-1_models-mlp.json``;
``--save-runs`` does not count), never the committed result, unless ``--out`` names the
file. The JSON records the command line, the settings and the environment. The bar
(exported >= 3x faster than gated) is evaluated on the rows with at least 90% of the
weights pruned; when no row prunes that much it is reported as "not evaluated"
(``"bar_met": false``, exit status 1).
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
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from applications.sparsify.data import load_dataset  # noqa: E402
from applications.sparsify.export import export  # noqa: E402
from applications.sparsify.flops import count_flops, count_params  # noqa: E402
from applications.sparsify.models import build_model  # noqa: E402
from applications.sparsify.network import GatedNetwork  # noqa: E402
from applications.toys._common import environment  # noqa: E402
from benchmarks._output import settings_path  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

#: The bar: the exported model at least BAR_SPEEDUP times faster than the gated one, on
#: every row with at least BAR_PRUNED of the weights pruned.
BAR_SPEEDUP = 3.0
BAR_PRUNED = 0.9

# lambda per gated layer: large enough to prune >= 90% of the weights within ~10 epochs of
# mnist5k (4,000 examples; the reference's lambda = 0.1 is meant for 60,000 examples and
# 200 epochs). Larger on the layers whose gates guard few weights (the hidden units of the
# MLP, LeNet-5's conv1 channels and fc2 inputs), which a uniform lambda barely prunes.
DEFAULT_LAM: dict[str, dict[str, float]] = {
    "mlp": {"1": 0.1, "3": 0.5, "5": 0.1},
    "lenet5": {"0": 4.0, "3": 0.3, "7": 0.1, "9": 1.0},
}


def evaluate_bar(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The bar over the rows with at least :data:`BAR_PRUNED` of the weights pruned.

    ``status`` is ``"met"``, ``"NOT met"`` or ``"not evaluated"`` (no row qualifies: then
    ``met`` is False too, so that a run that pruned too little never reads as a pass).
    """
    qualifying = [r for r in rows if r["weights_pruned"] >= BAR_PRUNED]
    met = bool(qualifying) and all(r["speedup"] >= BAR_SPEEDUP for r in qualifying)
    return {
        "required_speedup": BAR_SPEEDUP,
        "min_weights_pruned": BAR_PRUNED,
        "rows_evaluated": len(qualifying),
        "evaluated": bool(qualifying),
        "met": met,
        "status": "not evaluated" if not qualifying else ("met" if met else "NOT met"),
    }


def _error(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        return float((model(x).argmax(1) != y).float().mean())


def train_pruned(name: str, lam: float | dict[str, float], target: float, max_epochs: int,
                 seed: int, min_epochs: int = 10, gate_lr: float = 1e-2,
                 log: bool = True) -> tuple[GatedNetwork, dict[str, Any]]:
    """Short L0-ARM training on mnist5k: at least ``min_epochs`` (the first epochs prune
    transiently far more than where the gates settle), then until ``target`` of the
    weights are pruned (or ``max_epochs``)."""
    splits = load_dataset("mnist5k", seed=0)
    x, y = splits.train.tensors
    xt, yt = splits.test.tensors
    torch.manual_seed(seed)
    # gates start at pi = 0.9: with pi = 0.5 the test-time network starts empty (pi >= 1/2
    # keeps a unit) and the first steps of the penalty remove everything
    module = build_model(name, input_shape=splits.input_shape, num_classes=10, gated=True,
                         init_drop_rate=0.1)
    dense_params = count_params(build_model(name, input_shape=splits.input_shape,
                                            num_classes=10, gated=False))
    gen = torch.Generator().manual_seed(seed)
    net = GatedNetwork(module, "arm", lam=lam, num_train=len(x), generator=gen,
                       validate_args=False)
    # a larger step for the gate parameters lets the gates settle within a few epochs
    opt = torch.optim.Adam([{"params": list(net.weight_parameters()), "lr": 1e-3},
                            {"params": list(net.gate_parameters()), "lr": gate_lr}])
    batch = 100
    info: dict[str, Any] = {"source": "trained", "lam": lam, "seed": seed, "epochs": 0,
                            "gate_lr": gate_lr, "init_drop_rate": 0.1}
    t0 = time.perf_counter()
    for epoch in range(1, max_epochs + 1):
        net.train()
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            out = net.objective(x[idx], y[idx])
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
        net.eval()
        pruned = 1.0 - count_params(export(net, verify=False).module) / dense_params
        info.update(epochs=epoch, weights_pruned=pruned)
        if log:
            print(f"  {name} epoch {epoch}: {pruned:.1%} of the weights pruned, test error "
                  f"{_error(net, xt, yt):.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
        if pruned >= target and epoch >= min_epochs:
            break
    info["train_time_s"] = time.perf_counter() - t0
    info["test_error"] = _error(net, xt, yt)
    return net.eval(), info


def save_run(net: GatedNetwork, name: str, info: dict[str, Any], folder: Path) -> None:
    """Write ``folder/checkpoint.pt`` in the format of a ``binopt sparsify`` run, so that
    ``--run folder`` (or ``binopt export --run folder``) times the same network again."""
    from applications.sparsify.train import TrainConfig

    config = TrainConfig(model=name, dataset="mnist5k", estimator="arm", lam=info["lam"],
                         init_drop_rate=info["init_drop_rate"], seed=info["seed"])
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"config": config.to_dict(), "model": net.state_dict(),
                "input_shape": [1, 28, 28], "num_classes": 10, "benchmark_info": info},
               folder / "checkpoint.pt")


def _time(fn, x: torch.Tensor) -> float:
    t = time.perf_counter()
    fn(x)
    return time.perf_counter() - t


def time_pair(gated: torch.nn.Module, exported: torch.nn.Module, x: torch.Tensor,
              repeats: int, warmup: int = 5) -> tuple[list[float], list[float]]:
    """Interleaved timings of both models on the same input (seconds per forward)."""
    tg, te = [], []
    with torch.inference_mode():
        for _ in range(warmup):
            gated(x)
            exported(x)
        for _ in range(repeats):
            tg.append(_time(gated, x))
            te.append(_time(exported, x))
    return tg, te


#: Options that do not change the timings (left out of default output names).
_NOT_SETTINGS = frozenset({"out", "save_runs"})


def default_out(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    """``RESULTS/export_speed.json`` when every setting is the default; otherwise
    ``export_speed_<settings>.json`` naming the settings that differ
    (:func:`benchmarks._output.settings_path`), so that a run with other settings never
    overwrites the committed result unless ``--out`` names it."""
    return settings_path("export_speed", args, parser, ignore=_NOT_SETTINGS, results=RESULTS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", default=[], metavar="DIR",
                   help="use a `binopt sparsify` run folder instead of training (repeatable)")
    p.add_argument("--models", default="mlp,lenet5", help="models to train when no --run")
    p.add_argument("--target", type=float, default=0.9, help="fraction of weights to prune")
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", default="1",
                   help="comma-separated torch thread counts (on a shared machine, more "
                   "threads than idle cores time the contention, not the model)")
    p.add_argument("--save-runs", default=None, metavar="DIR",
                   help="also save the trained networks as run folders DIR/<model>")
    p.add_argument("--out", default=None,
                   help="JSON output (default: benchmarks/results/export_speed.json with the "
                   "default settings, else a name spelling out the settings that differ; "
                   "see default_out)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else default_out(args, p)

    nets: list[tuple[str, GatedNetwork, tuple[int, ...], dict[str, Any]]] = []
    if args.run:
        from applications.sparsify.export_cli import load_run

        for run_dir in args.run:
            net, shape, config = load_run(run_dir)
            from torch.torch_version import TorchVersion

            with torch.serialization.safe_globals([TorchVersion]):
                ckpt = torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu",
                                  weights_only=True)
            info = dict(ckpt.get("benchmark_info") or {"lam": config.get("lam")})
            info.update(source=str(run_dir), estimator=config.get("estimator"))
            nets.append((str(config.get("model")), net, shape, info))
    else:
        for name in [m.strip() for m in args.models.split(",") if m.strip()]:
            print(f"training {name} on mnist5k (L0-ARM, lambda {DEFAULT_LAM[name]})")
            net, info = train_pruned(name, DEFAULT_LAM[name], args.target, args.max_epochs,
                                     args.seed)
            nets.append((name, net, (1, 28, 28), info))
            if args.save_runs:
                save_run(net, name, info, Path(args.save_runs) / name)

    rows = []
    for name, net, shape, info in nets:
        exported = export(net, input_shape=shape)
        dense = build_model(name, input_shape=shape, num_classes=10, gated=False)
        params_dense, params_kept = count_params(dense), count_params(exported.module)
        flops_dense = count_flops(dense, shape)
        flops_kept = count_flops(exported.module, shape)
        x = torch.rand((args.batch, *shape), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode():
            diff = float((net(x) - exported.module(x)).abs().max())
        for threads in [int(t) for t in args.threads.split(",")]:
            torch.set_num_threads(threads)
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            tg, te = time_pair(net, exported.module, x, args.repeats)
            row = {
                "model": name,
                "threads": threads,
                "batch": args.batch,
                "weights_pruned": 1.0 - params_kept / params_dense,
                "params_dense": params_dense,
                "params_exported": params_kept,
                "macs_dense": flops_dense,
                "macs_exported": flops_kept,
                "widths": [{"layer": w["layer"], "in": w["in"], "out": w["out"]}
                           for w in exported.spec["widths"]],
                "gated_ms": 1e3 * statistics.median(tg),
                "exported_ms": 1e3 * statistics.median(te),
                "speedup": statistics.median(tg) / statistics.median(te),
                "max_abs_diff": diff,
                "load_average_1min": load,
                **{k: v for k, v in info.items() if k != "source"},
                "source": info.get("source"),
            }
            rows.append(row)

    header = (f"{'model':<8}{'thr':>4}{'pruned':>9}{'params':>16}{'MACs/ex':>20}"
              f"{'gated ms':>10}{'export ms':>11}{'speedup':>9}{'max diff':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<8}{r['threads']:>4}{r['weights_pruned']:>9.1%}"
              f"{r['params_exported']:>8,}/{r['params_dense']:<7,}"
              f"{r['macs_exported']:>10,}/{r['macs_dense']:<9,}"
              f"{r['gated_ms']:>10.2f}{r['exported_ms']:>11.2f}{r['speedup']:>8.1f}x"
              f"{r['max_abs_diff']:>10.1e}")
    bar = evaluate_bar(rows)
    print(f"bar (>= {BAR_SPEEDUP:g}x faster when >= {BAR_PRUNED:.0%} of the weights are "
          f"pruned): {bar['status']}"
          + ("" if bar["evaluated"] else " (no row has that many weights pruned)"))
    result = {
        "benchmark": "export_speed",
        "description": "CPU inference time, gated (eval) vs exported model, batch "
        f"{args.batch}, median of {args.repeats} interleaved repeats",
        "argv": list(sys.argv) if argv is None else [f"benchmarks/{Path(__file__).name}", *argv],
        "settings": {**vars(args), "out": str(out)},
        "bar": bar,
        # True only when the bar was evaluated on at least one row and every such row met it
        "bar_met": bar["met"],
        "rows": rows,
        "environment": {
            **environment(),
            "machine": platform.machine(),
            "processor": platform.processor(),
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if bar["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
