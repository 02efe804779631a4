"""Does the compiled CPU kernel change what L0-ARM training of the MLP reaches?

The kernel (:mod:`applications.sparsify.cpu_extension`) and the Python implementation of
the fused linear-chain pass compute the same gradients up to float rounding, but an L0-ARM
run amplifies rounding: two such runs part ways after a few hundred steps and end at
different test errors. This script trains the benchmark's MLP L0-ARM runs
(``sparsify_mnist5k.py``'s settings: 200 epochs of mnist5k, batch 100, gate_lr 7e-3,
k 7) with both implementations, same seeds, and reports the paired differences of the
test error and the kept weights with their standard errors: a change of the code shows as
a mean difference several standard errors from 0; rounding noise does not.

Usage::

    python benchmarks/sparsify_kernel_check.py                 # seeds 0-9, lambda 0.02 and 0.03
    python benchmarks/sparsify_kernel_check.py --seeds 0 1 --lams 0.03

Prints a table and writes ``benchmarks/results/sparsify_kernel_check.json`` with the default
settings (else ``sparsify_kernel_check_<settings>.json``). Runs live in ``--runs`` and are
read back when finished at the same git revision (as ``sparsify_mnist5k.py`` does).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._output import settings_path  # noqa: E402
from benchmarks.sparsify_mnist5k import FULL, git_revision, run_one  # noqa: E402

IMPLEMENTATIONS = ("compiled", "python")


def run_with(spec: dict[str, Any]) -> dict[str, Any]:
    """:func:`sparsify_mnist5k.run_one` with the kernel on (``compiled``) or off."""
    from applications.sparsify import cpu_extension

    if spec["implementation"] == "compiled":
        if cpu_extension.load() is None:
            raise RuntimeError(f"compiled kernel unavailable: {cpu_extension.status()}")
        record = run_one(spec)
    else:
        with cpu_extension.disabled():
            record = run_one(spec)
    return {**record, "implementation": spec["implementation"]}


def _mean_se(values: list[float]) -> dict[str, float]:
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return {"mean": statistics.mean(values), "sd": sd, "se": sd / math.sqrt(len(values)),
            "n": len(values)}


def paired(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per lambda and overall: the mean test error and kept weights of each implementation
    and the paired difference (compiled - python) with its standard error."""
    by = {(r["implementation"], r["lambda"], r["seed"]): r for r in records}
    out: dict[str, Any] = {}
    groups = sorted({r["lambda"] for r in records})
    all_err, all_kept = [], []
    for lam in [*groups, "all"]:
        lams = groups if lam == "all" else [lam]
        keys = [(la, s) for la in lams for s in sorted({r["seed"] for r in records})
                if ("compiled", la, s) in by and ("python", la, s) in by]
        if not keys:
            continue
        d_err = [by[("compiled", *k)]["test_error"] - by[("python", *k)]["test_error"]
                 for k in keys]
        d_kept = [by[("compiled", *k)]["params_kept_fraction"]
                  - by[("python", *k)]["params_kept_fraction"] for k in keys]
        entry = {
            "pairs": len(keys),
            "test_error_difference": _mean_se(d_err),
            "params_kept_difference": _mean_se(d_kept),
        }
        for impl in IMPLEMENTATIONS:
            entry[impl] = {
                "test_error": _mean_se([by[(impl, *k)]["test_error"] for k in keys]),
                "params_kept_fraction": _mean_se(
                    [by[(impl, *k)]["params_kept_fraction"] for k in keys]),
            }
        out[str(lam)] = entry
        if lam != "all":
            all_err += d_err
            all_kept += d_kept
    return out


def table(summary: dict[str, Any]) -> str:
    lines = ["| λ | pairs | test error %, compiled | python | difference (± se) | "
             "weights kept %, compiled | python | difference (± se) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for lam, e in summary.items():
        de, dk = e["test_error_difference"], e["params_kept_difference"]
        lines.append(
            f"| {lam} | {e['pairs']} | {100 * e['compiled']['test_error']['mean']:.2f} | "
            f"{100 * e['python']['test_error']['mean']:.2f} | "
            f"{100 * de['mean']:+.2f} ± {100 * de['se']:.2f} | "
            f"{100 * e['compiled']['params_kept_fraction']['mean']:.2f} | "
            f"{100 * e['python']['params_kept_fraction']['mean']:.2f} | "
            f"{100 * dk['mean']:+.2f} ± {100 * dk['se']:.2f} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--lams", type=float, nargs="+",
                        default=[0.02, 0.03], help="the MLP bar's lambdas of the benchmark")
    parser.add_argument("--epochs", type=int, default=FULL["mlp"]["epochs"])
    parser.add_argument("--workers", type=int, default=2, help="parallel runs (1 thread each)")
    parser.add_argument("--runs", default="/tmp/binopt_kernel_check",
                        help="folder for the individual runs")
    parser.add_argument("--out", default=None, help="JSON output (default: see above)")
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1 or args.epochs < 1:
        parser.error("--workers and --epochs must be at least 1")
    out = Path(args.out) if args.out else settings_path(
        "sparsify_kernel_check", args, parser, ignore=("workers", "runs", "out"))
    revision = git_revision()
    gated = dict(FULL["mlp"]["gated"])
    specs = [dict(model="mlp", kind="arm", lam=lam, seed=seed, epochs=args.epochs, limit=None,
                  gated=gated, implementation=impl, git_revision=revision,
                  reuse="same-revision",
                  out=str(Path(args.runs) / impl / f"arm_lam{lam:g}_s{seed}"))
             for impl in IMPLEMENTATIONS for lam in args.lams for seed in args.seeds]
    started = time.time()
    records = []
    print(f"{len(specs)} runs, {args.workers} worker(s); runs in {args.runs}", flush=True)
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_with, s) for s in specs]
        for fut in as_completed(futures):
            r = fut.result()
            records.append(r)
            print(f"[{len(records)}/{len(specs)} {(time.time() - started) / 60:5.1f} min] "
                  f"{r['implementation']:8s} lam={r['lambda']:<5g} seed={r['seed']} "
                  f"err={100 * r['test_error']:.2f}% kept={100 * r['params_kept_fraction']:.2f}%",
                  flush=True)
    records.sort(key=lambda r: (r["implementation"], r["lambda"], r["seed"]))
    summary = paired(records)
    print(table(summary))
    payload = {
        "benchmark": "sparsify_kernel_check",
        "what": __doc__.split("\n\n")[1].replace("\n", " "),
        "settings": {"seeds": args.seeds, "lams": args.lams, "epochs": args.epochs,
                     "gated": gated, "batch_size": 100, "lr": 1e-3, "dataset": "mnist5k"},
        "argv": list(sys.argv) if argv is None else [f"benchmarks/{Path(__file__).name}",
                                                     *argv],
        "git_revision": revision,
        "summary": summary,
        "records": records,
        "wall_time_s": time.time() - started,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text(
        "# Compiled kernel vs Python: MLP L0-ARM on mnist5k\n\n" + table(summary) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md').name}")
    return payload


if __name__ == "__main__":
    main()
