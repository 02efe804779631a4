"""``binopt toy``: train the Yin-Zhou toy with several estimators; curves as JSON and PNG.

Example
-------
::

    binopt toy --p0 0.49 0.499 0.501 0.51 --dim 1 --steps 2000 --seeds 5 --out results/

For each ``p0`` and estimator it prints the final probability of the right answer (mean
+- standard error over seeds) and the last measured gradient variance, and writes
``toy_curves.json`` (every curve) and ``toy_curves.png`` (probability of the right answer
and gradient variance against the squared exact gradient, vs step). The JSON is written
after each ``p0`` (``"complete": false`` until the last one), so an interrupted run keeps
the values of ``p0`` already done.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from ..cli import HelpFormatter
from ..errors import UserError, with_option_names
from ._common import (
    add_import_option,
    command_line,
    fmt,
    format_table,
    import_modules,
    parse_cli_estimators,
    prepare_output,
    write_json,
)
from .yin_zhou import P0_VALUES, YinZhouToy, train_toy

DEFAULT_ESTIMATORS = "reinforce,reinforce_loo,arm,disarm,straight_through,gumbel,exact"
#: The option of each setting of :class:`YinZhouToy` (error messages name the option).
PROBLEM_OPTIONS = {"p0": "--p0", "dim": "--dim", "mode": "--mode"}
_PARSERS: dict[str, argparse.ArgumentParser] = {}


def register(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """Add the ``toy`` subcommand to the ``binopt`` dispatcher."""
    p = subparsers.add_parser(
        name,
        help=help_text,
        description=(
            "Optimise E[sum_i (z_i - p0)^2] over Bernoulli logits (the ARM paper's toy) with "
            "each estimator; record the probability of the right answer and the gradient "
            "variance along the way."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--p0", type=float, nargs="+", default=list(P0_VALUES), help="targets p0")
    p.add_argument("--dim", type=int, default=1, help="number of binary units D")
    p.add_argument("--mode", choices=("max", "min"), default="max", help="maximise or minimise")
    p.add_argument(
        "--estimators",
        default=DEFAULT_ESTIMATORS,
        help="comma-separated estimators; options as name:key=value; your own with --import",
    )
    add_import_option(p)
    p.add_argument("--steps", type=int, default=2000, help="optimiser steps")
    p.add_argument("--lr", type=float, default=0.1, help="learning rate")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="optimiser")
    p.add_argument("--seeds", type=int, default=3, help="independent runs per estimator")
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--init-logit", type=float, default=0.0, help="initial logit of every unit")
    p.add_argument("--eval-every", type=int, default=100, help="steps between variance checks")
    p.add_argument(
        "--variance-samples",
        type=int,
        default=1000,
        help="estimates per Monte Carlo variance check (exact variance used when D <= 4)",
    )
    p.add_argument(
        "--record-every", type=int, default=None, help="steps per curve point (default steps/500)"
    )
    p.add_argument("--out", default="toy_results", help="output folder")
    p.add_argument("--name", default="toy_curves", help="file name stem")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.set_defaults(func=run, _subcommand=name)
    _PARSERS[name] = p
    return p


def run(args: argparse.Namespace) -> int:
    """Entry point of ``binopt toy``.

    Every argument and the output folder are checked before any training; the JSON is
    rewritten after each ``p0`` so that an interrupted run keeps what is done.
    """
    import_modules(args.imports)  # first: they register estimators named below
    specs = parse_cli_estimators(args.estimators)
    for name, value in [
        ("steps", args.steps),
        ("seeds", args.seeds),
        ("eval-every", args.eval_every),
    ]:
        if value < 1:
            raise UserError(f"--{name} must be >= 1; got {value}")
    # None is "not given"; 0 used to be silently replaced by the default too
    if args.record_every is not None and args.record_every < 1:
        raise UserError(f"--record-every must be >= 1; got {args.record_every}")
    if args.variance_samples < 2:
        raise UserError(f"--variance-samples must be >= 2; got {args.variance_samples}")
    if not (math.isfinite(args.lr) and args.lr > 0):  # nan compares False with everything
        raise UserError(f"--lr must be a finite number > 0; got {args.lr}")
    if not math.isfinite(args.init_logit):
        raise UserError(f"--init-logit must be a finite number; got {args.init_logit}")
    if args.dim > 20 and any(s.name == "exact" for s in specs):
        raise UserError("the exact estimator enumerates 2^D states: use --dim <= 20 or drop it")
    toys = []
    for p0 in args.p0:  # every p0 before training the first
        try:
            toys.append(YinZhouToy(p0, args.dim, args.mode))
        except ValueError as exc:
            raise with_option_names(exc, PROBLEM_OPTIONS) from exc
    json_path, png_path = prepare_output(args.out, args.name, (".json", ".png"))
    record_every = (
        args.record_every if args.record_every is not None else max(1, args.steps // 500)
    )
    seeds = list(range(args.seed, args.seed + args.seeds))
    runs: list[dict[str, Any]] = []
    payload = {
        "command": command_line(f"binopt {args._subcommand}", args, _PARSERS[args._subcommand]),
        "complete": False,
        "runs": runs,
    }
    for toy in toys:
        try:
            result = train_toy(
                toy,
                specs,
                steps=args.steps,
                lr=args.lr,
                optimizer=args.optimizer,
                seeds=seeds,
                init_logit=args.init_logit,
                eval_every=args.eval_every,
                variance_samples=args.variance_samples,
                record_every=record_every,
            )
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        runs.append(result)
        payload["complete"] = len(runs) == len(toys)
        write_json(json_path, payload)  # after each p0: Ctrl-C keeps the finished ones
    _print_summary(runs)
    print(f"wrote {json_path}")
    if not args.no_plot:
        from .plotting import plot_toy_curves

        print(f"wrote {plot_toy_curves(runs, png_path)}")
    return 0


def _print_summary(runs: list[dict[str, Any]]) -> None:
    rows = []
    for r in runs:
        prob = r["problem"]
        for label, c in r["estimators"].items():
            rows.append(
                [
                    f"{prob['p0']:g}",
                    label,
                    str(c["evaluations"]),
                    f"{c['final_prob_right']:.3f} +- {c['final_prob_right_se']:.3f}",
                    fmt(float(c["variance_mean"][0])),
                    fmt(float(c["variance_mean"][-1])),
                ]
            )
    s = runs[0]["settings"]
    prob = runs[0]["problem"]
    print(
        f"Yin-Zhou toy, D={prob['dim']}, {prob['mode']}imise, {s['steps']} steps of "
        f"{s['optimizer']} lr={s['lr']}, {len(s['seeds'])} seed(s)"
    )
    header = ["p0", "estimator", "evals", "P(right) final", "var at start", "var at end"]
    print(format_table(header, rows))


__all__ = ["register", "run"]
