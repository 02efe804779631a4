"""Throughput of every estimator: the vectorized path against a per-sample Python loop.

For each registered estimator and D in {10, 1000, 100000} this measures gradient estimates
per second of

- ``vectorized``: one call ``est.grad(f, logits, num_samples=N)`` (N = 1000), i.e. all N
  estimates from one vectorized evaluation of ``f``;
- ``loop``: the same estimator called once per estimate, ``est.grad(f, logits,
  num_samples=1)`` in a Python ``for`` loop (the per-sample path of the same code);
- ``plain loop``: the estimator's formula for ONE estimate written directly in torch
  (DESIGN.md 2) in a Python loop, without binopt's per-call work (argument checks,
  structure handling, autograd bookkeeping): the fastest a per-sample loop can be.

The objective is the Yin-Zhou toy ``f(z) = sum_i (z_i - 0.49)^2`` on ``float32`` logits
(zero logits, pi = 1/2). At D = 100000 the loops time fewer estimates than N and the rate
is extrapolated per estimate (the table says how many were timed). Exact runs at D = 10 only
(2^D evaluations); being deterministic, one enumeration serves all N of its estimates. Every
timing is the best of a few repeats (the least disturbed by other load on the machine).

At large D every path is memory-bound: N x D temporaries (400 MB per tensor at D = 100000,
N = 1000) cost more in allocation and bandwidth than the per-call overhead that
vectorization removes, so expect ratios near or below 1 there. Vectorization pays where
the per-call overhead dominates: small D, many estimates.

The acceptance bar (issue #2): vectorized >= 50x the loop at D = 10, N = 1000.

Usage::

    python benchmarks/estimators.py                 # full run, writes results/estimators_cpu.json
    python benchmarks/estimators.py --quick         # D in {10, 1000}, fewer repeats: *_quick.json
    python benchmarks/estimators.py --out my.json --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

import binopt  # noqa: E402
from applications.toys._common import environment  # noqa: E402
from benchmarks._output import settings_path  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"

REQUIRED_RATIO = 50.0
REQUIRED_AT_DIM = 10


def toy_f(z: torch.Tensor) -> torch.Tensor:
    return ((z - 0.49) ** 2).sum(-1)


# ------------------------------------------------------------------ plain per-sample loops
def _plain_estimate(name: str, est, f, a: torch.Tensor) -> torch.Tensor:
    """One gradient estimate w.r.t. ``a`` (shape (D,)) by the formula, in plain torch."""
    d = a.shape[0]
    if name in ("straight_through", "gumbel", "hard_concrete"):
        a = a.detach().requires_grad_()
        if name == "straight_through":
            pi = torch.sigmoid(a)
            hard = (torch.rand(d, dtype=a.dtype, device=a.device) < pi.detach()).to(a.dtype)
            z = hard + (pi - pi.detach())
        else:
            u = torch.rand(d, dtype=a.dtype, device=a.device).clamp(1e-6, 1 - 1e-6)
            noise = torch.log(u) - torch.log1p(-u)
            if name == "gumbel":
                z = torch.sigmoid((a + noise) / est.temperature)
            else:
                s = torch.sigmoid((noise + a) / est.beta)
                z = (s * (est.zeta - est.gamma) + est.gamma).clamp(0.0, 1.0)
        (g,) = torch.autograd.grad(f(z.unsqueeze(0)).sum(), a)
        return g
    pi = torch.sigmoid(a)
    if name == "reinforce":
        z = (torch.rand(d, dtype=a.dtype, device=a.device) < pi).to(a.dtype)
        return f(z.unsqueeze(0))[0] * (z - pi)
    if name == "reinforce_loo":
        k = est.num_samples
        z = (torch.rand(k, d, dtype=a.dtype, device=a.device) < pi).to(a.dtype)
        fv = f(z)
        return ((fv - (fv.sum() - fv) / (k - 1)).unsqueeze(1) * (z - pi)).sum(0) / k
    u = torch.rand(d, dtype=a.dtype, device=a.device)
    z1 = (u > 1 - pi).to(a.dtype)
    z2 = (u < pi).to(a.dtype)
    fv = f(torch.stack([z1, z2]))
    if name == "arm":
        return (fv[0] - fv[1]) * (u - 0.5)
    if name == "disarm":
        return (
            0.5 * (fv[1] - fv[0]) * (1 - 2 * z1) * (z1 != z2).to(a.dtype) * torch.sigmoid(a.abs())
        )
    raise KeyError(name)


# ------------------------------------------------------------------------------- timing
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _best_time(fn: Callable[[], object], min_total: float, max_repeats: int) -> float:
    """Best of up to ``max_repeats`` runs, stopping once ``min_total`` seconds were spent."""
    best, spent, runs = math.inf, 0.0, 0
    while runs < max_repeats and (runs == 0 or spent < min_total):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        dt = time.perf_counter() - t0
        best, spent, runs = min(best, dt), spent + dt, runs + 1
    return best


def _loop(fn: Callable[[], object], n: int) -> Callable[[], None]:
    def run():
        for _ in range(n):
            fn()

    return run


def bench_one(name: str, dim: int, n: int, device: str, quick: bool) -> dict:
    est = binopt.get_estimator(name)
    logits = torch.zeros(dim, device=device)
    big = dim >= 100_000
    repeats = 1 if (quick or big) else 5
    min_total = 0.0 if quick else 0.5

    # warm-up (lazy initialisation, allocator), small at large D
    est.grad(toy_f, logits, num_samples=min(n, 10))
    t_vec = _best_time(lambda: est.grad(toy_f, logits, num_samples=n), min_total, repeats)

    loop_n = n if dim <= 1000 else 50
    if quick:
        loop_n = min(loop_n, 200)
    for _ in range(3):
        est.grad(toy_f, logits, num_samples=1)
    t_loop = _best_time(
        _loop(lambda: est.grad(toy_f, logits, num_samples=1), loop_n), 0.0, 1 if big else 2
    )

    plain = None
    if name != "exact":
        for _ in range(3):
            _plain_estimate(name, est, toy_f, logits)
        t_plain = _best_time(
            _loop(lambda: _plain_estimate(name, est, toy_f, logits), loop_n), 0.0, 1 if big else 2
        )
        plain = loop_n / t_plain

    vec, loop = n / t_vec, loop_n / t_loop
    return {
        "estimator": name,
        "dim": dim,
        "num_samples": n,
        "evaluations_per_estimate": est.evaluations_per_estimate,
        "vectorized_seconds": t_vec,
        "vectorized_per_s": vec,
        "loop_estimates_timed": loop_n,
        "loop_per_s": loop,
        "plain_loop_per_s": plain,
        "ratio_vs_loop": vec / loop,
        "ratio_vs_plain_loop": None if plain is None else vec / plain,
    }


# ------------------------------------------------------------------------------- output
def _fmt_rate(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def _fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.1f}x"


def table(rows: list[dict]) -> str:
    head = (
        f"{'estimator':<17}{'D':>8}{'vectorized/s':>15}{'loop/s':>12}{'ratio':>10}"
        f"{'plain loop/s':>15}{'ratio':>10}  note"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        notes = []
        if r["estimator"] == "exact":
            notes.append("deterministic: one enumeration (2^D evaluations) serves all N")
        if r["loop_estimates_timed"] < r["num_samples"]:
            notes.append(f"loops timed {r['loop_estimates_timed']} estimates, rate extrapolated")
        note = "; ".join(notes)
        lines.append(
            f"{r['estimator']:<17}{r['dim']:>8}{_fmt_rate(r['vectorized_per_s']):>15}"
            f"{_fmt_rate(r['loop_per_s']):>12}{_fmt_ratio(r['ratio_vs_loop']):>10}"
            f"{_fmt_rate(r['plain_loop_per_s']):>15}{_fmt_ratio(r['ratio_vs_plain_loop']):>10}"
            f"  {note}"
        )
    return "\n".join(lines)


def default_out(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    """``RESULTS/estimators_<device>_quick.json`` for ``--quick`` (a smoke run, ignored by
    git); ``estimators_<device>.json`` when every other setting is the default; otherwise a
    name spelling out the settings that differ (e.g. ``estimators_cpu_threads-2.json``), so
    that no run with other settings overwrites the committed result unless ``--out`` says
    so. ``--strict`` changes nothing measured and is left out of the name."""
    stem = f"estimators_{torch.device(args.device).type}"
    if args.quick:
        return RESULTS / f"{stem}_quick.json"
    return settings_path(stem, args, parser, ignore={"device", "strict"}, results=RESULTS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON output (default: benchmarks/results/estimators_<device>.json with the "
        "default settings, estimators_<device>_quick.json with --quick, else a name "
        "spelling out the settings that differ)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="D in {10, 1000}, single repeats (a smoke run)"
    )
    parser.add_argument("--device", default="cpu", help="torch device of the logits (cpu)")
    parser.add_argument("--num-samples", type=int, default=1000, help="N estimates (1000)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: the committed CPU result's setting, "
                        "which times the implementations rather than the idle cores; 0: "
                        "torch's default)")
    parser.add_argument(
        "--strict", action="store_true", help=f"exit 1 if the {REQUIRED_RATIO:.0f}x bar is missed"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dims = [10, 1000] if args.quick else [10, 1000, 100_000]
    out = args.out or default_out(args, parser)

    rows = []
    t_start = time.perf_counter()
    for dim in dims:
        for name in binopt.available_estimators():
            if name == "exact" and dim > binopt.MAX_EXACT_DIM:
                continue
            rows.append(bench_one(name, dim, args.num_samples, args.device, args.quick))
            r = rows[-1]
            print(
                f"  {name:<17} D={dim:<7} vectorized {_fmt_rate(r['vectorized_per_s'])}/s, "
                f"loop {_fmt_rate(r['loop_per_s'])}/s",
                file=sys.stderr,
                flush=True,
            )
    elapsed = time.perf_counter() - t_start

    at_bar = [r for r in rows if r["dim"] == REQUIRED_AT_DIM]
    worst = min(at_bar, key=lambda r: r["ratio_vs_loop"])
    passed = worst["ratio_vs_loop"] >= REQUIRED_RATIO
    print(
        f"\nEstimates per second, N = {args.num_samples}, device {args.device}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(table(rows))
    plain = [r["ratio_vs_plain_loop"] for r in at_bar if r["ratio_vs_plain_loop"] is not None]
    print(
        f"\nD = {REQUIRED_AT_DIM}: smallest vectorized/loop ratio {worst['ratio_vs_loop']:.1f}x "
        f"({worst['estimator']}); vs the plain torch loop at least {min(plain):.1f}x. "
        f"Bar {REQUIRED_RATIO:.0f}x: {'PASS' if passed else 'FAIL'}. ({elapsed:.0f} s)"
    )

    payload = {
        "benchmark": "estimators",
        "description": "gradient estimates per second: vectorized grad(num_samples=N) vs "
        "per-sample loops; f(z) = sum((z - 0.49)^2), float32 zero logits",
        "argv": list(sys.argv) if argv is None else [f"benchmarks/{Path(__file__).name}", *argv],
        "settings": {**vars(args), "out": str(out)},
        "environment": environment(),
        "meta": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "binopt": binopt.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "device": args.device,
            "device_name": (
                torch.cuda.get_device_name(torch.device(args.device))
                if args.device.startswith("cuda")
                else platform.processor() or platform.machine()
            ),
            "num_samples": args.num_samples,
            "quick": args.quick,
            "seconds": elapsed,
        },
        "bar": {
            "dim": REQUIRED_AT_DIM,
            "required_ratio": REQUIRED_RATIO,
            "min_ratio_vs_loop": worst["ratio_vs_loop"],
            "min_ratio_estimator": worst["estimator"],
            "min_ratio_vs_plain_loop": min(plain),
            "passed": passed,
        },
        "results": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out}")
    return 1 if (args.strict and not passed) else 0


if __name__ == "__main__":
    sys.exit(main())
