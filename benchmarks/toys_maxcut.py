"""Max-cut on random G(n, 0.5) graphs solved by optimising Bernoulli logits with each estimator.

Reference: the exact optimum by enumeration for n <= 20, greedy + single-flip local search
(best of 20 random orders) for larger n. For each graph size, estimator and seed (seed =
initial logits and estimator noise; the graph is fixed per n) the script reports the cut of
the rounded logits and the best cut among the monitoring samples, as ratios to the
reference: mean +- standard error over seeds.

Writes ``maxcut_<name>.json`` and ``.png`` into the folder ``--out`` (default
``benchmarks/results``). Without ``--name``, ``<name>`` is ``random_graphs`` with the
default settings (the committed ``maxcut_random_graphs.{json,png}``) and
``random_graphs_<settings>`` otherwise, ``<settings>`` naming the options that differ from
the defaults (``--steps 100 --seeds 1`` writes ``maxcut_random_graphs_seeds-1_steps-100.*``;
see :func:`output_stem`), so that such a run never overwrites the committed files.
``--workers`` and ``--out`` are left out of the name: every run is seeded and runs on one
thread, so the number of processes does not change the results. ``--name`` is taken as
given (its files are ``maxcut_<--name>.*``, whatever the settings).

Usage::

    python benchmarks/toys_maxcut.py --sizes 10 16 20 50 100 200 --steps 2000 --seeds 3
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from applications.toys._common import (  # noqa: E402
    default_results_dir,
    environment,
    format_table,
    parse_estimator_spec,
    pyplot,
    standard_error,
    write_json,
)
from applications.toys.maxcut import (  # noqa: E402
    brute_force,
    local_search,
    optimize_logits,
    random_maxcut,
)
from benchmarks._output import settings_stem  # noqa: E402

EXACT_MAX_N = 20


def _reference(job: dict) -> dict:
    torch.set_num_threads(1)
    q = random_maxcut(job["n"], job["edge_prob"], job["graph_seed"])
    t0 = time.time()
    ls, _ = local_search(q, restarts=20, seed=0)
    out = {"n": job["n"], "edges": q.meta["edges"], "local_search_cut": -ls}
    if job["n"] <= EXACT_MAX_N:
        best, _ = brute_force(q)
        out["optimum_cut"] = -best
    out["seconds"] = time.time() - t0
    return out


def _run(job: dict) -> dict:
    torch.set_num_threads(1)
    q = random_maxcut(job["n"], job["edge_prob"], job["graph_seed"])
    r = optimize_logits(
        q,
        parse_estimator_spec(job["estimator"]),
        steps=job["steps"],
        lr=job["lr"],
        seed=job["seed"],
        record_every=max(1, job["steps"] // 200),
        show_progress=False,
    )
    return {
        "n": job["n"],
        "estimator": job["estimator"],
        "seed": job["seed"],
        "rounded_cut": -r["rounded_energy"],
        "best_sample_cut": -r["best_sample_energy"],
        "evaluations": r["evaluations"],
        "steps": r["steps"],
        "expected_cut": [-e for e in r["expected_energy"]],
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 16, 20, 50, 100, 200])
    p.add_argument("--edge-prob", type=float, default=0.5)
    p.add_argument("--graph-seed", type=int, default=0)
    p.add_argument(
        "--estimators", default="reinforce,reinforce_loo,arm,disarm,straight_through,gumbel"
    )
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--name", default=None,
                   help="file name stem after maxcut_, taken as given (default: "
                   "random_graphs with the default settings, else "
                   "random_graphs_<settings> naming the options that differ)")
    p.add_argument("--out", default=default_results_dir(ROOT), help="output folder")
    return p


def output_stem(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """``maxcut_<--name>``; without ``--name`` ``maxcut_random_graphs`` with the default
    settings and ``maxcut_random_graphs_<settings>`` otherwise
    (:func:`benchmarks._output.settings_stem`; ``--workers`` and ``--out`` left out)."""
    if args.name is not None:
        return f"maxcut_{args.name}"
    return settings_stem("maxcut_random_graphs", args, parser, ignore={"workers", "name"})


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    stem = output_stem(args, parser)
    estimators = [e.strip() for e in args.estimators.split(",") if e.strip()]
    base = dict(edge_prob=args.edge_prob, graph_seed=args.graph_seed)
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        refs = list(pool.map(_reference, [dict(base, n=n) for n in args.sizes]))
        jobs = [
            dict(base, n=n, estimator=e, seed=s, steps=args.steps, lr=args.lr)
            for n in args.sizes
            for e in estimators
            for s in range(args.seeds)
        ]
        runs = list(pool.map(_run, jobs))
    wall = time.time() - t0
    ref_by_n = {r["n"]: r for r in refs}
    summary: dict[str, dict[str, dict]] = {}
    rows = []
    for n in args.sizes:
        ref = ref_by_n[n]
        ref_cut = ref.get("optimum_cut", ref["local_search_cut"])
        kind = "optimum" if "optimum_cut" in ref else "local search"
        rows.append([str(n), f"[{kind}]", "", f"{ref_cut:g}", "1", "", ""])
        if "optimum_cut" in ref:
            ls_ratio = ref["local_search_cut"] / ref_cut
            rows.append(
                [
                    str(n),
                    "[local search]",
                    "",
                    f"{ref['local_search_cut']:g}",
                    f"{ls_ratio:.3f}",
                    "",
                    "",
                ]
            )
        summary[str(n)] = {"reference": kind, "reference_cut": ref_cut, **ref, "estimators": {}}
        for e in estimators:
            rs = [r for r in runs if r["n"] == n and r["estimator"] == e]
            rc = [r["rounded_cut"] / ref_cut for r in rs]
            bc = [r["best_sample_cut"] / ref_cut for r in rs]
            summary[str(n)]["estimators"][e] = {
                "rounded_ratio_mean": float(np.mean(rc)),
                "rounded_ratio_se": standard_error(rc),
                "best_sample_ratio_mean": float(np.mean(bc)),
                "best_sample_ratio_se": standard_error(bc),
                "evaluations": rs[0]["evaluations"],
                "rounded_cuts": [r["rounded_cut"] for r in rs],
            }
            rows.append(
                [
                    str(n),
                    e,
                    str(rs[0]["evaluations"]),
                    f"{np.mean([r['rounded_cut'] for r in rs]):.1f}",
                    f"{np.mean(rc):.3f} +- {standard_error(rc):.3f}",
                    f"{np.mean(bc):.3f} +- {standard_error(bc):.3f}",
                    str(sum(r == 1.0 for r in rc)),
                ]
            )
    header = ["n", "solver", "f evals", "cut", "ratio (rounded)", "ratio (best sample)", "hits"]
    table = format_table(header, rows)
    print(
        f"max-cut on G(n, {args.edge_prob}), {args.steps} Adam steps lr {args.lr}, "
        f"{args.seeds} seeds, wall {wall:.0f} s"
    )
    print(table)
    out = Path(args.out)
    command = " ".join(["python benchmarks/toys_maxcut.py", *(shlex.quote(a) for a in argv)])
    write_json(
        out / f"{stem}.json",
        {
            "command": command,
            "environment": environment(),
            "wall_seconds": wall,
            "settings": vars(args),
            "summary": summary,
            "table": table,
            "runs": runs,
        },
    )
    _plot(args, estimators, summary, runs, out / f"{stem}.png")
    print(f"wrote {out / stem}.json/.png")


def _plot(args, estimators, summary, runs, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    cmap = plt.get_cmap("tab10")
    sizes = args.sizes
    width = 0.8 / len(estimators)
    for k, e in enumerate(estimators):
        m = [summary[str(n)]["estimators"][e]["rounded_ratio_mean"] for n in sizes]
        s = [summary[str(n)]["estimators"][e]["rounded_ratio_se"] for n in sizes]
        x = np.arange(len(sizes)) + (k - (len(estimators) - 1) / 2) * width
        axes[0].bar(x, m, width, yerr=np.nan_to_num(s), color=cmap(k), label=e, capsize=2)
    axes[0].set_xticks(np.arange(len(sizes)))
    axes[0].set_xticklabels([f"n={n}\n({summary[str(n)]['reference']})" for n in sizes], fontsize=8)
    axes[0].set_ylim(0.8, 1.02)
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_ylabel("cut of rounded logits / reference cut")
    axes[0].legend(fontsize=7, ncol=2)
    n_show = max(n for n in sizes if n <= EXACT_MAX_N) if min(sizes) <= EXACT_MAX_N else sizes[0]
    ref = summary[str(n_show)]["reference_cut"]
    for k, e in enumerate(estimators):
        rs = [r for r in runs if r["n"] == n_show and r["estimator"] == e]
        y = np.mean([r["expected_cut"] for r in rs], axis=0) / ref
        axes[1].plot(rs[0]["steps"], y, color=cmap(k), label=e, lw=1.2)
    axes[1].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel(f"E[cut] / optimum (n={n_show})")
    axes[1].set_title(f"expected cut along training, mean of {args.seeds} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
