"""Training-step time of L0-gated networks vs their dense twins (CPU).

A *step* is forward + backward + optimizer step of one minibatch (batch 128, random
MNIST-shaped data): ``opt.zero_grad(); net.objective(x, y).loss.backward(); opt.step()``
through :class:`~applications.sparsify.network.GatedNetwork` for every variant, the dense
one being the same architecture built with ``gated=False`` and the same optimizer.

Gate states
-----------
``open``
    "At initialisation, all gates open": every gate has ``pi = 0.999``.
``sparse``
    80% of the units of every gated layer gated off (``pi = 0.001``, a random fixed
    subset), the others ``pi = 0.999``: the network after it has thinned.
``init``
    The models' own initial drop rates (MLP 0.2/0.5/0.5, LeNet-5 0.5), for information:
    here ARM's two samples disagree on 20-50% of the units.

Variants: dense; L0-ARM (the defaults: one-pass ARM with the weight gradient from the
``z = 1[u < pi]`` sample, conditional computation on); ablations of L0-ARM without
conditional computation, with the weight gradient averaged over both samples, and with
both (the stacked, masked pass from before issue #5); for the MLP, the generic sliced pass
instead of the fused one of :mod:`applications.sparsify.linear_chain`, and the fused one
without its compiled kernel (:mod:`applications.sparsify.cpu_extension`; the other MLP
L0-ARM rows use it where it could be built, see ``settings.cpu_kernel`` in the JSON);
L0-HC (hard concrete, one sample) for reference; for the MLP, :class:`MinimalMLPARM`, a hand-written
ARM step without the library's generality (two plain sliced passes), for comparison; and
the dense network stepped without :class:`GatedNetwork` (plain module and loss) for
information.

Timing: every round runs one step of every variant (interleaved, in a rotating order) so
that all of them see the same machine load; the table reports medians over the rounds of
wall-clock time and of the CPU time of the stepping thread, and ratios to dense within the
same run. With one intra-op thread (the default, ``--threads``) and an idle machine the
two agree; on a machine shared with other jobs the thread CPU time is the steadier one.

Usage::

    python benchmarks/train_step.py                      # both models
    python benchmarks/train_step.py --models mlp --rounds 50 --threads 2

Prints a table and writes ``benchmarks/results/train_step_cpu.json`` when every setting is
the default; a run with other settings writes ``train_step_cpu_<settings>.json`` (e.g.
``train_step_cpu_models-mlp_threads-2.json``) unless ``--out`` names the file. The JSON
records the command line, the settings and the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from applications.sparsify import cpu_extension  # noqa: E402
from applications.sparsify.denormals import flush_denormals  # noqa: E402
from applications.sparsify.models import lenet5_caffe, mlp  # noqa: E402
from applications.sparsify.network import GatedNetwork  # noqa: E402
from applications.toys._common import environment  # noqa: E402
from benchmarks._output import settings_path  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

#: Bars of issue #5: L0-ARM step / dense step, per model and gate state.
BARS = {("mlp", "open"): 1.5, ("mlp", "sparse"): 0.8, ("lenet5", "open"): 1.6,
        ("lenet5", "sparse"): 0.9}

BUILDERS: dict[str, Callable[..., torch.nn.Module]] = {"mlp": mlp, "lenet5": lenet5_caffe}
DEFAULT_ROUNDS = {"mlp": 200, "lenet5": 40}


def set_gate_state(net: GatedNetwork, state: str, off_fraction: float = 0.8,
                   seed: int = 0) -> None:
    """Set every gate's ``phi`` for the gate state ``open``, ``sparse`` or ``init``."""
    if state == "init":
        return
    gen = torch.Generator().manual_seed(seed)
    for layer in net.gated_layers().values():
        gate = layer.gate
        probs = torch.full((gate.num_units,), 0.999)
        if state == "sparse":
            off = torch.randperm(gate.num_units, generator=gen)[
                : int(round(off_fraction * gate.num_units))
            ]
            probs[off] = 0.001
        elif state != "open":
            raise ValueError(f"unknown gate state {state!r}")
        with torch.no_grad():
            gate.phi.copy_(gate.parameterization.inverse(probs).to(gate.phi))


def make_optimizer(params, fused: bool) -> torch.optim.Optimizer:
    """Adam, lr 1e-3 (the MNIST setting); ``fused`` uses the single-kernel implementation."""
    if fused:
        try:
            return torch.optim.Adam(params, lr=1e-3, fused=True)
        except (RuntimeError, TypeError):  # torch without a fused CPU Adam
            pass
    return torch.optim.Adam(params, lr=1e-3)


def variants(model: str) -> list[dict[str, Any]]:
    """The configurations timed for one model."""
    out: list[dict[str, Any]] = [{"name": "dense", "gated": False, "state": None}]
    for state in ("open", "sparse", "init"):
        out.append({"name": f"L0-ARM {state}", "gated": True, "state": state,
                    "estimator": "arm", "options": {}})
    for state in ("open", "sparse"):
        out.append({"name": f"L0-ARM {state}, not conditional", "gated": True, "state": state,
                    "estimator": "arm", "options": {"conditional": False}})
        out.append({"name": f"L0-ARM {state}, weight grad mean", "gated": True,
                    "state": state, "estimator": "arm", "options": {"weight_grad": "mean"}})
        out.append({"name": f"L0-ARM {state}, stacked+masked (old)", "gated": True,
                    "state": state, "estimator": "arm",
                    "options": {"conditional": False, "weight_grad": "mean"}})
        out.append({"name": f"L0-HC {state}", "gated": True, "state": state,
                    "estimator": "hard_concrete", "options": {}})
        if model == "mlp":
            out.append({"name": f"L0-ARM {state}, generic sliced pass", "gated": True,
                        "state": state, "estimator": "arm", "options": {},
                        "generic_chain": True})
            out.append({"name": f"L0-ARM {state}, fused pass in Python", "gated": True,
                        "state": state, "estimator": "arm", "options": {},
                        "python_chain": True})
        if model == "mlp" and state == "sparse":
            out.append({"name": f"L0-ARM {state}, hand-written floor", "gated": True,
                        "state": state, "estimator": "arm", "options": {}, "minimal": True})
    out.append({"name": "dense, plain module", "gated": False, "state": None, "plain": True})
    return out


class MinimalMLPARM:
    """A hand-written L0-ARM step for the MLP, as a floor for what the step can cost.

    The same computation as :meth:`GatedNetwork.objective` with ARM (weight gradient from
    the ``z = 1[u < pi]`` sample, the other sample without autograd, the L0 penalty),
    specialised to a chain of input-gated linear layers: each layer multiplies only the
    input columns its gates keep and only the output rows the next layer's gates keep.
    None of the generality (estimator interface, any architecture, shared computation
    between the samples) and its bookkeeping.
    """

    def __init__(self, net: GatedNetwork) -> None:
        self.net = net
        self.layers = list(net.gated_layers().values())
        self.ends = np.cumsum([layer.gate.num_units for layer in self.layers])[:-1]

    def objective(self, x: torch.Tensor, y: torch.Tensor):
        flat = torch.cat([layer.gate.logits() for layer in self.layers])
        with torch.no_grad():
            u = torch.rand_like(flat)
            p = torch.sigmoid(flat)
            z = np.split(np.stack([(u > 1 - p).numpy(), (u < p).numpy()]), self.ends, axis=1)
        losses = []
        for s in (1, 0):  # z2 = 1[u < pi] with autograd, z1 = 1[u > 1 - pi] without
            with torch.enable_grad() if s == 1 else torch.no_grad():
                cols = np.flatnonzero(z[0][s])
                h = x.flatten(1).index_select(1, torch.from_numpy(cols))
                for i, layer in enumerate(self.layers):
                    w, b = layer.weight, layer.bias
                    if i + 1 < len(self.layers):
                        rows = np.flatnonzero(z[i + 1][s])
                        idx = (rows[:, None] * w.shape[1] + cols[None, :]).reshape(-1)
                        w = w.reshape(-1).index_select(0, torch.from_numpy(idx))
                        w = w.view(len(rows), len(cols))
                        b = b.index_select(0, torch.from_numpy(rows))
                        h = torch.relu(F.linear(h, w, b))
                        cols = rows
                    else:
                        h = F.linear(h, w.index_select(1, torch.from_numpy(cols)), b)
                losses.append(F.cross_entropy(h, y))
        f2, f1 = losses
        surrogate = f2 + ((f1 - f2).detach() * (u - 0.5) * flat).sum()
        return surrogate + self.net._flat_penalty(flat, self.net._gated)


def build(model: str, spec: dict[str, Any], fused: bool, seed: int):
    """``(objective, optimizer)``: ``objective(x, y)`` returns the loss to differentiate."""
    torch.manual_seed(seed)
    module = BUILDERS[model](gated=spec["gated"])
    if spec["gated"]:
        net = GatedNetwork(module, spec["estimator"], lam=0.1, num_train=60000,
                           **spec["options"])
        set_gate_state(net, spec["state"], seed=seed)
        if spec.get("generic_chain"):  # without the fused linear-chain pass
            net._linear_chain = None
    else:
        net = GatedNetwork(module, "arm", lam=0.1, num_train=60000)
    opt = make_optimizer(net.parameters(), fused)
    if spec.get("plain"):  # no GatedNetwork: the module and the loss alone
        return (lambda x, y: F.cross_entropy(module(x), y)), opt
    if spec.get("minimal"):
        return MinimalMLPARM(net).objective, opt
    if spec.get("python_chain"):  # the fused pass without the compiled kernel
        def objective(x, y):
            with cpu_extension.disabled():
                return net.objective(x, y).loss

        return objective, opt
    return (lambda x, y: net.objective(x, y).loss), opt


def step(objective, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    objective(x, y).backward()
    opt.step()


def timed_step(objective, opt: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor) -> tuple[float, list[float]]:
    """One step; its wall time and the thread CPU time of (zero_grad + forward, backward,
    optimizer step)."""
    t0, c0 = time.perf_counter(), time.thread_time()
    opt.zero_grad(set_to_none=True)
    loss = objective(x, y)
    c1 = time.thread_time()
    loss.backward()
    c2 = time.thread_time()
    opt.step()
    c3, t1 = time.thread_time(), time.perf_counter()
    return t1 - t0, [c1 - c0, c2 - c1, c3 - c2]


def run_model(model: str, rounds: int, warmup: int, batch: int, fused: bool, seed: int,
              log: bool = True) -> list[dict[str, Any]]:
    """Interleaved timing of every variant of ``model``; rows with medians and ratios."""
    specs = variants(model)
    built = [build(model, spec, fused, seed) for spec in specs]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    wall: list[list[float]] = [[] for _ in specs]
    cpu: list[list[float]] = [[] for _ in specs]
    phases: list[list[list[float]]] = [[] for _ in specs]
    n = len(specs)
    for r in range(warmup + rounds):
        for j in range(n):
            i = (j + r) % n  # rotate the order between rounds
            objective, opt = built[i]
            seconds, parts = timed_step(objective, opt, x, y)
            if r >= warmup:
                wall[i].append(seconds)
                cpu[i].append(sum(parts))
                phases[i].append(parts)
        if log and (r + 1) % 50 == 0:
            print(f"  {model}: round {r + 1}/{warmup + rounds}", file=sys.stderr)
    dense_wall, dense_cpu = statistics.median(wall[0]), statistics.median(cpu[0])
    rows = []
    for spec, w, c, ph in zip(specs, wall, cpu, phases):
        mw, mc = statistics.median(w), statistics.median(c)
        fwd, bwd, upd = (1e3 * statistics.median(p) for p in zip(*ph))
        headline = spec["name"] == f"L0-ARM {spec['state']}"
        bar = BARS.get((model, spec["state"])) if headline else None
        row = {
            "model": model,
            "variant": spec["name"],
            "state": spec["state"],
            "wall_ms": 1e3 * mw,
            "cpu_ms": 1e3 * mc,
            "ratio_wall": mw / dense_wall,
            "ratio_cpu": mc / dense_cpu,
            "wall_ms_iqr": _iqr_ms(w),
            "cpu_ms_forward": fwd,
            "cpu_ms_backward": bwd,
            "cpu_ms_optimizer": upd,
            "bar": bar,
        }
        if bar is not None:
            row["meets_bar_wall"] = row["ratio_wall"] <= bar
            row["meets_bar_cpu"] = row["ratio_cpu"] <= bar
        rows.append(row)
    return rows


def steady_state(steps: int, batch: int, fused: bool, seed: int, block: int = 50,
                 log: bool = True) -> list[dict[str, Any]]:
    """Dense and L0-ARM (MLP, 80% of units off) after ``steps`` consecutive steps, with the
    CPU flushing subnormal floats to zero and without.

    The interleaved rounds of :func:`run_model` take about 200 steps per variant, too few
    for the Adam moments of pruned weights to decay into the subnormal range (about 700
    steps), where training spends most of its time. Here each pair of networks steps in
    alternating blocks of ``block`` steps; the per-step median over the last quarter of
    the steps is reported.
    """
    specs = {spec["name"]: spec for spec in variants("mlp")}
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    rows = []
    for flush in (False, True):
        with flush_denormals(flush):
            built = {name: build("mlp", specs[name], fused, seed)
                     for name in ("dense", "L0-ARM sparse")}
            times: dict[str, list[float]] = {name: [] for name in built}
            for start in range(0, steps, block):
                for name, (objective, opt) in built.items():
                    for i in range(start, min(start + block, steps)):
                        t0 = time.thread_time()
                        step(objective, opt, x, y)
                        if i >= steps - steps // 4:
                            times[name].append(time.thread_time() - t0)
        dense = statistics.median(times["dense"])
        for name, ts in times.items():
            rows.append({"variant": name, "flush_denormals": flush, "steps": steps,
                         "cpu_ms": 1e3 * statistics.median(ts),
                         "ratio_cpu": statistics.median(ts) / dense})
        if log:
            print(f"  steady state, flush={flush}: done", file=sys.stderr)
    return rows


def _iqr_ms(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4)
    return 1e3 * (q[2] - q[0])


def print_table(rows: list[dict[str, Any]]) -> None:
    head = (f"{'model':7s} {'variant':38s} {'wall ms':>8s} {'cpu ms':>8s} {'fwd':>7s} "
            f"{'bwd':>7s} {'opt':>6s} {'x dense':>8s} {'(cpu)':>7s} {'bar':>5s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        bar = ""
        if r["bar"] is not None:
            ok = "ok" if r["meets_bar_wall"] and r["meets_bar_cpu"] else "MISS"
            bar = f"{r['bar']:.1f} {ok}"
        print(f"{r['model']:7s} {r['variant']:38s} {r['wall_ms']:8.3f} {r['cpu_ms']:8.3f} "
              f"{r['cpu_ms_forward']:7.3f} {r['cpu_ms_backward']:7.3f} "
              f"{r['cpu_ms_optimizer']:6.3f} {r['ratio_wall']:8.3f} {r['ratio_cpu']:7.3f} {bar}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "lenet5"], choices=list(BUILDERS))
    parser.add_argument("--rounds", type=int, default=None,
                        help="timed rounds per model (default: mlp 200, lenet5 40)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (recorded in the JSON)")
    parser.add_argument("--no-fused", action="store_true",
                        help="use the default (per-tensor) Adam instead of fused=True")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steady-steps", type=int, default=1200,
                        help="consecutive steps of the subnormal check (0: skip it)")
    parser.add_argument("--out", default=None,
                        help="JSON output (default: benchmarks/results/train_step_cpu.json "
                        "with the default settings, else a name spelling out the settings "
                        "that differ; see default_out)")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else default_out(args, parser)
    torch.set_num_threads(args.threads)
    cpu_extension.load()  # (a build, if needed, before the timing starts)
    print(f"compiled CPU kernel of the linear chain: {cpu_extension.status()}")
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    started = time.time()
    rows: list[dict[str, Any]] = []
    with flush_denormals():  # as in training (applications/sparsify/denormals.py)
        for model in args.models:
            rounds = args.rounds or DEFAULT_ROUNDS[model]
            rows += run_model(model, rounds, args.warmup, args.batch, not args.no_fused,
                              args.seed)
    steady = []
    if args.steady_steps > 0 and "mlp" in args.models:
        steady = steady_state(args.steady_steps, args.batch, not args.no_fused, args.seed)
    print_table(rows)
    for r in steady:
        print(f"steady state after {r['steps']} steps, flush subnormals={r['flush_denormals']!s:5s}"
              f" {r['variant']:14s} {r['cpu_ms']:7.3f} ms  x dense {r['ratio_cpu']:.3f}")
    result = {
        "benchmark": "train_step_cpu",
        "rows": rows,
        "steady_state": steady,
        "bars": {f"{m}/{s}": b for (m, s), b in BARS.items()},
        "settings": {
            "batch": args.batch,
            "rounds": {m: args.rounds or DEFAULT_ROUNDS[m] for m in args.models},
            "warmup": args.warmup,
            "torch_threads": torch.get_num_threads(),
            "optimizer": "Adam(lr=1e-3" + (")" if args.no_fused else ", fused=True)"),
            "seed": args.seed,
            "flush_denormals": True,
            # the MLP's L0-ARM rows use the compiled kernel unless this says otherwise
            "cpu_kernel": cpu_extension.status(),
        },
        "argv": list(sys.argv) if argv is None else [f"benchmarks/{Path(__file__).name}", *argv],
        "args": {**vars(args), "out": str(out)},
        "environment": environment(),
        "machine": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "seconds": time.time() - started,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


def default_out(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    """``RESULTS/train_step_cpu.json`` when every setting is the default; otherwise
    ``train_step_cpu_<settings>.json`` naming the settings that differ (e.g.
    ``train_step_cpu_models-mlp_threads-2.json``; :func:`benchmarks._output.settings_path`),
    so that a run with other settings never overwrites the committed result unless
    ``--out`` names it."""
    return settings_path("train_step_cpu", args, parser, results=RESULTS)


if __name__ == "__main__":
    main()
