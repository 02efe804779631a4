"""``binopt variance``: bias and variance of estimators on a problem, as a table, JSON and PNG.

Examples
--------
The ARM-paper toy at two logits (the bar of issue #3)::

    binopt variance --problem toy --p0 0.49 --dim 1 --phi 0 2 \\
        --estimators reinforce,arm,disarm --num-samples 200000 --out results/

Max-cut on a random graph after 200 training steps of DisARM::

    binopt variance --problem maxcut --nodes 10 --step 200 --train-estimator disarm

The binary VAE's gradient basket after 500 training steps::

    binopt variance --problem vae --model linear --step 500 --num-samples 200
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch

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
from .variance import Setting, bias_verdict, logit_setting, measure, ordering

DEFAULT_ESTIMATORS = "reinforce,reinforce_loo,arm,disarm,straight_through,gumbel"
PROBLEMS = ("toy", "maxcut", "vae")
#: Largest max-cut graph: its weights are a dense n x n matrix and every chunk of estimates
#: is (chunk size) x n (100,000 nodes asked for 80 GB).
MAX_NODES = 2000
#: Options of one problem only (by destination), refused with another ``--problem``.
PROBLEM_OPTIONS = {
    "toy": ("p0", "dim", "mode"),
    "maxcut": ("nodes", "edge_prob", "graph_seed", "weighted"),
    "vae": ("model", "batch_size", "latent_dim"),
}
#: The option of each setting of the toy and max-cut problems (for error messages).
_OPTION_OF_SETTING = {"p0": "--p0", "dim": "--dim", "mode": "--mode", "edge_prob": "--edge-prob"}
_PARSERS: dict[str, argparse.ArgumentParser] = {}


def register(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """Add the ``variance`` subcommand to the ``binopt`` dispatcher."""
    p = subparsers.add_parser(
        name,
        help=help_text,
        description=(
            "Draw many independent gradient estimates of each estimator at the same point of "
            "a problem and report mean, variance, bias against the exact gradient (where "
            "computable) and variance x evaluations of f (variance at equal cost)."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--problem", choices=PROBLEMS, default="toy", help="problem to measure on")
    p.add_argument(
        "--estimators",
        default=DEFAULT_ESTIMATORS,
        help="comma-separated estimators; options as name:key=value "
        "(reinforce_loo:num_samples=4); your own with --import",
    )
    add_import_option(p)
    p.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="independent estimates per estimator (default 10000; 200 for the VAE)",
    )
    p.add_argument("--chunk-size", type=int, default=10_000, help="estimates per vectorized call")
    p.add_argument("--seed", type=int, default=0, help="seed of the estimators' generators")
    p.add_argument("--coord", type=int, default=None, help="report one unit instead of all")
    p.add_argument(
        "--independent-streams",
        action="store_true",
        help="give each estimator its own random stream (default: common random numbers, "
        "every estimator seeded with --seed, which sharpens comparisons)",
    )
    where = p.add_argument_group("where to measure")
    where.add_argument(
        "--phi",
        type=float,
        nargs="+",
        default=None,
        help="toy, maxcut: logit value(s) for every unit; one table per value (default: 0 "
        "for the toy, normal logits with std 0.1 for max-cut)",
    )
    where.add_argument(
        "--logits", default=None, help="toy, maxcut: explicit comma-separated logit vector"
    )
    where.add_argument(
        "--step", type=int, default=0, help="first train this many steps, then measure there"
    )
    where.add_argument(
        "--train-estimator", default="disarm", help="estimator that trains up to --step"
    )
    where.add_argument(
        "--lr",
        type=float,
        default=None,
        help="Adam learning rate for --step (default: 0.1; 1e-3 for the VAE)",
    )
    toy = p.add_argument_group("toy (Yin-Zhou)")
    toy.add_argument("--p0", type=float, default=0.49, help="target of sum_i (z_i - p0)^2")
    toy.add_argument("--dim", type=int, default=1, help="number of binary units D")
    toy.add_argument("--mode", choices=("max", "min"), default="max", help="maximise or minimise")
    mc = p.add_argument_group("maxcut")
    mc.add_argument("--nodes", type=int, default=10, help="nodes of the random graph")
    mc.add_argument("--edge-prob", type=float, default=0.5, help="probability of each edge")
    mc.add_argument("--graph-seed", type=int, default=0, help="seed of the random graph")
    mc.add_argument("--weighted", action="store_true", help="uniform (0, 1] edge weights")
    vae = p.add_argument_group("vae")
    vae.add_argument(
        "--model",
        choices=("linear", "nonlinear"),
        default="linear",
        help="encoder and decoder architecture",
    )
    vae.add_argument(
        "--batch-size", type=int, default=50, help="minibatch size (training and measurement)"
    )
    vae.add_argument("--latent-dim", type=int, default=200, help="binary latent units")
    out = p.add_argument_group("output")
    out.add_argument("--out", default="variance_results", help="output folder")
    out.add_argument("--name", default=None, help="file name stem (default variance_PROBLEM)")
    out.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.set_defaults(func=run, _subcommand=name)
    _PARSERS[name] = p
    return p


def run(args: argparse.Namespace) -> int:
    """Entry point of ``binopt variance``.

    Every argument and the output folder are checked before any computing; a ``ValueError``
    from the problem, the training up to ``--step`` or the measurement is a user error.
    """
    import_modules(args.imports)  # first: they register estimators named below
    specs = parse_cli_estimators(args.estimators)
    _check_problem_options(args, _PARSERS[args._subcommand])
    n = (
        args.num_samples
        if args.num_samples is not None
        else (200 if args.problem == "vae" else 10_000)
    )
    if n < 2:
        raise UserError(f"--num-samples must be >= 2; got {n}")
    if args.chunk_size < 1:
        raise UserError(f"--chunk-size must be >= 1; got {args.chunk_size}")
    if args.step < 0:
        raise UserError(f"--step must be >= 0; got {args.step}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UserError(f"--lr must be a finite number > 0; got {args.lr}")
    for name, value in [("batch-size", args.batch_size), ("latent-dim", args.latent_dim)]:
        if value < 1:
            raise UserError(f"--{name} must be >= 1; got {value}")
    if args.problem == "maxcut" and not 2 <= args.nodes <= MAX_NODES:
        raise UserError(
            f"--nodes must be between 2 and {MAX_NODES} (the graph is a dense n x n matrix); "
            f"got {args.nodes}"
        )
    train_spec = parse_cli_estimators(args.train_estimator, "--train-estimator", single=True)[0]
    if args.step > 0:
        _check_train_estimator(args, train_spec)
    stem = f"variance_{args.problem}" if args.name is None else args.name
    json_path, png_path = prepare_output(args.out, stem, (".json", ".png"))
    try:
        if args.problem == "vae":
            problem, settings = _vae_settings(args, train_spec)
            chunk = min(args.chunk_size, 50)
        else:
            problem, settings = _logit_settings(args, train_spec)
            chunk = args.chunk_size
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    results = []
    for setting in settings:
        try:
            rows = measure(
                setting,
                specs,
                n,
                chunk,
                args.seed,
                args.coord,
                common_random_numbers=not args.independent_streams,
            )
        except ValueError as exc:
            raise UserError(str(exc)) from exc
        results.append({"label": setting.label, "info": setting.info, "rows": rows})
        _print_setting(problem, setting, rows, n, args.coord)
    payload = {
        "command": command_line(f"binopt {args._subcommand}", args, _PARSERS[args._subcommand]),
        "problem": problem,
        "num_samples": n,
        "seed": args.seed,
        "coord": args.coord,
        "common_random_numbers": not args.independent_streams,
        "settings": results,
    }
    write_json(json_path, payload, digits=None)  # full precision: exact comparisons
    print(f"wrote {json_path}")
    if not args.no_plot:
        from .plotting import plot_variance

        title = " ".join(f"{k}={v}" for k, v in problem.items() if k not in ("edges",))
        png = plot_variance(results, png_path, title=title)
        print(f"wrote {png}")
    return 0


# ----------------------------------------------------------------------------- settings
def _check_problem_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse an option of another problem (``--p0`` with ``--problem maxcut`` was ignored).

    An option counts as given when its value differs from its default.
    """
    for problem, dests in PROBLEM_OPTIONS.items():
        if problem == args.problem:
            continue
        for dest in dests:
            if getattr(args, dest) != parser.get_default(dest):
                raise UserError(
                    f"--{dest.replace('_', '-')} applies to --problem {problem} only; got "
                    f"--problem {args.problem}"
                )


def _check_train_estimator(args: argparse.Namespace, spec) -> None:
    """Refuse, before any computing, a ``--train-estimator`` that cannot train the problem."""
    if spec.name != "exact":
        return
    if args.problem == "vae":
        raise UserError(
            f"--train-estimator {spec.label} cannot train the VAE (it would enumerate "
            f"2^{args.latent_dim} latent states); use a Monte Carlo estimator such as disarm"
        )
    units = args.dim if args.problem == "toy" else args.nodes
    limit = getattr(spec.build(), "max_dim", None)
    if limit is not None and units > limit:
        raise UserError(
            f"--train-estimator {spec.label} enumerates 2^D states and is limited to D <= "
            f"{limit}; the problem has {units} units (use a Monte Carlo estimator such as "
            "disarm, or --step 0)"
        )


def _start_logits(args: argparse.Namespace, dim: int) -> list[tuple[str, torch.Tensor]]:
    if args.logits is not None and args.phi is not None:
        raise UserError("give either --phi or --logits, not both")
    if args.logits is not None:
        try:
            values = [float(v) for v in args.logits.split(",") if v.strip()]
        except ValueError as exc:
            raise UserError(
                f"--logits must be comma-separated numbers; got {args.logits!r}"
            ) from exc
        if len(values) != dim:
            raise UserError(f"--logits has {len(values)} values; the problem has {dim} units")
        if not all(math.isfinite(v) for v in values):
            raise UserError(f"--logits must be finite numbers; got {args.logits!r}")
        return [("logits", torch.tensor(values, dtype=torch.float64))]
    if args.phi is not None and not all(math.isfinite(v) for v in args.phi):
        raise UserError(f"--phi must be finite numbers; got {' '.join(map(str, args.phi))}")
    if args.phi is None and args.problem == "maxcut":
        # phi = 0 is a stationary point of max-cut where ARM/DisARM are exactly 0: start
        # from small random logits unless asked otherwise
        g = torch.Generator().manual_seed(args.seed)
        return [("random init", 0.1 * torch.randn(dim, generator=g, dtype=torch.float64))]
    phis = args.phi if args.phi is not None else [0.0]
    return [(f"phi={phi:g}", torch.full((dim,), float(phi), dtype=torch.float64)) for phi in phis]


def _train_logits(f, logits: torch.Tensor, spec, steps: int, lr: float, seed: int) -> torch.Tensor:
    est = spec.build(generator=torch.Generator().manual_seed(seed + 424242))
    x = logits.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        est.surrogate(f, x).backward()
        opt.step()
    return x.detach()


def _logit_settings(args: argparse.Namespace, train_spec) -> tuple[dict[str, Any], list[Setting]]:
    if args.problem == "toy":
        from .yin_zhou import YinZhouToy

        try:
            prob = YinZhouToy(args.p0, args.dim, args.mode)
        except ValueError as exc:
            raise with_option_names(exc, _OPTION_OF_SETTING) from exc
        f, exact, dim = prob.loss, prob.exact_grad, prob.dim
        problem = {"name": "yin_zhou", "p0": prob.p0, "dim": prob.dim, "mode": prob.mode}
    else:
        from .maxcut import random_maxcut

        try:
            prob = random_maxcut(args.nodes, args.edge_prob, args.graph_seed, args.weighted)
        except ValueError as exc:
            raise with_option_names(exc, _OPTION_OF_SETTING) from exc
        f, exact, dim = prob.energy, prob.exact_grad, prob.n
        problem = {"name": "maxcut", **prob.meta}
    if args.coord is not None and not 0 <= args.coord < dim:
        raise UserError(f"--coord must be in [0, {dim}); got {args.coord}")
    lr = 0.1 if args.lr is None else args.lr
    settings = []
    for label, logits in _start_logits(args, dim):
        info: dict[str, Any] = {"start": label}
        if args.step > 0:
            logits = _train_logits(f, logits, train_spec, args.step, lr, args.seed)
            label = f"{label}, step {args.step}"
            info.update({"step": args.step, "train_estimator": train_spec.label, "lr": lr})
        settings.append(logit_setting(label, f, logits, exact(logits), info))
    return problem, settings


def _vae_settings(args: argparse.Namespace, train_spec) -> tuple[dict[str, Any], list[Setting]]:
    if args.phi is not None or args.logits is not None:
        raise UserError("--phi/--logits do not apply to the VAE (its logits come from the encoder)")
    from .vae import basket_gradients, load_mnist, train_vae

    lr = 1e-3 if args.lr is None else args.lr
    data = load_mnist()
    run = train_vae(
        data,
        train_spec,
        kind=args.model,
        steps=args.step,
        batch_size=args.batch_size,
        lr=lr,
        seed=args.seed,
        latent_dim=args.latent_dim,
        eval_test=False,
    )
    model = run["model"]
    x = data.batch(args.batch_size, torch.Generator().manual_seed(args.seed * 100_003 + args.step))

    def draw(est, n: int) -> torch.Tensor:
        try:
            return basket_gradients(model, x, est, n)[0]
        except ValueError as exc:
            raise UserError(str(exc)) from exc

    problem = {
        "name": "vae",
        "model": args.model,
        "latent_dim": args.latent_dim,
        "batch_size": args.batch_size,
        "gradient": "encoder parameters",
    }
    info = {"step": args.step, "train_estimator": train_spec.label, "lr": lr}
    label = f"step {args.step}" + (f" ({train_spec.label})" if args.step else "")
    return problem, [Setting(label, draw, None, None, info)]


# ----------------------------------------------------------------------------- printing
def _print_setting(
    problem: dict[str, Any], setting: Setting, rows: list[dict], n: int, coord: int | None
) -> None:
    desc = " ".join(f"{k}={v}" for k, v in problem.items() if k != "name")
    units = rows[0]["units"]
    print(f"\n{problem['name']} ({desc}) at {setting.label}: {n} estimates per estimator")
    if coord is not None:
        print(f"  unit {coord} of {units}")
    elif units > 1:
        print(
            f"  {units} units: mean/exact are Euclidean norms, variances are means over units, "
            "bias z is the largest per-unit |z|"
        )
    header = [
        "estimator",
        "evals",
        "mean",
        "+-se",
        "exact",
        "bias z",
        "variance",
        "+-se",
        "exact var",
        "var z",
        "var x evals",
    ]
    table = []
    for r in rows:
        table.append(
            [
                r["estimator"],
                str(r["evaluations"]),
                fmt(r["mean"]),
                fmt(r["mean_se"], 2),
                fmt(r["exact"]),
                fmt(r.get("bias_z"), 2),
                fmt(r["variance"]),
                fmt(r["variance_se"], 2),
                fmt(r["exact_variance"]),
                fmt(r.get("variance_z"), 2),
                fmt(r["variance_x_evaluations"]),
            ]
        )
    print(format_table(header, table))
    print(f"variance:               {ordering(rows, 'variance')}")
    print(f"variance x evaluations: {ordering(rows, 'variance_x_evaluations')}")
    verdict = bias_verdict(rows)
    if verdict:
        print(verdict)


__all__ = ["register", "run"]
