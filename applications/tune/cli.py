"""``binopt tune``: optuna search of the pruning-rate vs accuracy trade-off.

Examples
--------
Pareto study, 24 trials, two local worker processes sharing a journal file::

    binopt tune --model mlp --dataset mnist5k --trials 24 --jobs 2 --epochs 30

Fix parts of the search space (a number fixes, ``LOW:HIGH`` searches, a comma list
chooses)::

    binopt tune --estimator arm --parameterization scaled_sigmoid --k 7 --lam 1e-3:1

Target mode (one objective, pruned trials)::

    binopt tune --mode target --budget 0.1 --pruner median --trials 40

Print the results again without running anything::

    binopt tune --report --storage runs/tune/mlp-mnist5k-pareto/study.log

Print the ``binopt sparsify`` command that trains trial 7 again, exactly::

    binopt tune --command 7 --storage runs/tune/mlp-mnist5k-pareto/study.log

This module imports optuna only when the command runs, so ``binopt --help`` works without
it; a missing optuna is reported as one line asking to install the ``tune`` extra.

Exit status: 0 when at least one trial completed, 2 on a user error (nothing is trained
and no trial uses up the budget), 1 when the study has no complete trial (the failed
trials count towards ``--trials``; the message says how to run more), 130 when
interrupted (Ctrl-C or SIGTERM: the running trials are recorded as interrupted and are
retried when the same command runs again).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..cli import HelpFormatter
from ..errors import UserError

if TYPE_CHECKING:  # pragma: no cover - optuna is imported when the command runs
    import optuna

# binopt is installed from a checkout (it is not on PyPI): the extra comes from there too
INSTALL_HINT = ("binopt tune needs optuna; install it from the binopt checkout with: "
                "pip install -e '.[tune]'")


def register(subparsers: Any, name: str = "tune", help_text: str | None = None) -> None:
    """Add the ``tune`` subcommand to ``subparsers`` (``set_defaults(func=run)``)."""
    p = subparsers.add_parser(
        name, help=help_text,
        description="Optuna search of the pruning-rate vs accuracy trade-off: each trial "
        "trains `binopt sparsify` with settings drawn from the search space and is scored on "
        "a validation split carved from the training data.",
        formatter_class=HelpFormatter,
        epilog="Search-space syntax: a number fixes a float parameter, LOW:HIGH searches it "
               "(log scale for --lam, --lr and --gate-lr), a comma list searches a categorical "
               "one. See docs/tune.md.",
    )
    g = p.add_argument_group("study")
    g.add_argument("--model", default="mlp", help="mlp, lenet5 or wrn (default: mlp)")
    g.add_argument("--dataset", default="mnist5k",
                   help="mnist5k, mnist1d (offline), mnist, cifar10, cifar100 (need --data-root)")
    g.add_argument("--data-root", default=None, help="folder of the full data sets")
    g.add_argument("--trials", type=int, default=20,
                   help="total number of trials of the study, across workers and restarts")
    g.add_argument("--storage", default=None,
                   help="optuna RDB URL (sqlite:///study.db, postgresql://user:pw@host/db) or "
                        "journal file (journal:PATH, *.log, *.jsonl); default: "
                        "OUT/study.log (journal file)")
    g.add_argument("--study-name", default=None,
                   help="default: MODEL-DATASET-MODE; an existing study is resumed")
    g.add_argument("--jobs", type=int, default=1,
                   help="worker processes on this machine (each with sampler seed derived from "
                        "--seed and its index)")
    g.add_argument("--out", default=None,
                   help="study folder: trial runs in OUT/trials/NNNN, report files "
                        "(default: runs/tune/STUDY-NAME)")
    g.add_argument("--mode", choices=("pareto", "target"), default="pareto",
                   help="pareto: minimise validation error and kept fraction (default); "
                        "target: one objective with pruning")
    g.add_argument("--kept", choices=("flops", "params"), default="flops",
                   help="kept fraction of FLOPs (default) or of parameters")
    g.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    g.add_argument("--startup-trials", type=int, default=10,
                   help="random trials before TPE takes over (default 10)")

    t = p.add_argument_group("target mode")
    t.add_argument("--budget", type=float, default=0.1,
                   help="kept-fraction budget: minimise validation error subject to kept <= "
                        "BUDGET (default 0.1)")
    t.add_argument("--weight", type=float, default=None,
                   help="instead of a budget, minimise val_error + WEIGHT * kept")
    t.add_argument("--pruner", choices=("median", "halving", "none"), default="median",
                   help="stops unpromising trials early (median: below the median of earlier "
                   "trials at the same epoch; halving: successive halving)")
    t.add_argument("--pruner-warmup", type=int, default=1,
                   help="epochs before a trial may be pruned (default 1)")
    t.add_argument("--pruner-startup", type=int, default=5,
                   help="complete trials before the median pruner prunes (default 5)")

    s = p.add_argument_group("search space (fix a part by giving one value)")
    s.add_argument("--lam", default="1e-3:1", help="L0 strength (default 1e-3:1, log scale)")
    s.add_argument("--lam-per-layer", action="store_true",
                   help="one lambda per gated layer instead of one global lambda")
    s.add_argument("--parameterization", default="scaled_sigmoid,hard_sigmoid",
                   help="gate parameterizations (default scaled_sigmoid,hard_sigmoid)")
    s.add_argument("--k", default="2:10", help="gate slope k (default 2:10)")
    s.add_argument("--estimator", default="arm,disarm,hard_concrete",
                   help="estimators (default arm,disarm,hard_concrete)")
    s.add_argument("--init-drop-rate", default="0.05:0.6",
                   help="initial drop rate of every gate (default 0.05:0.6)")
    s.add_argument("--lr", default="3e-4:3e-3", help="learning rate (default 3e-4:3e-3, log)")
    s.add_argument("--gate-lr", default="3e-3:3e-2",
                   help="learning rate of the gate parameters (default 3e-3:3e-2, log)")

    tr = p.add_argument_group("training (fixed for every trial)")
    tr.add_argument("--epochs", type=int, default=10, help="passes over the training set")
    tr.add_argument("--batch-size", type=int, default=100, help="examples per optimizer step")
    tr.add_argument("--optimizer", default="adam", help="adam or sgd")
    tr.add_argument("--weight-decay", type=float, default=0.0,
                    help="L2 on the weights (never on the gate parameters)")
    tr.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    tr.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    tr.add_argument("--train-seed", type=int, default=0,
                   help="training seed, same for every trial so all share one validation split")
    tr.add_argument("--validation-fraction", type=float, default=0.2,
                   help="fraction of the training data held out for the objective (default 0.2)")
    tr.add_argument("--limit", type=int, default=None,
                    help="use at most this many training and test examples (default: all)")
    tr.add_argument("--hidden", default=None, help="MLP hidden widths, e.g. 300,100")
    tr.add_argument("--model-options", default=None, help="JSON dict of model options")

    w = p.add_argument_group("workers and output")
    w.add_argument("--heartbeat", type=float, default=30.0,
                   help="seconds between heartbeats of a running trial; a trial silent for "
                        "3x this + 5 s counts as interrupted and is retried (default 30)")
    w.add_argument("--threads", type=int, default=None,
                   help="torch threads per worker (default: cores / jobs when jobs > 1)")
    w.add_argument("--worker-index", type=int, default=0,
                   help="index of this command's first worker when starting workers on several "
                        "machines (worker i is seeded from --seed, i and the trial count)")
    w.add_argument("--no-wait", action="store_true",
                   help="return when the budget is used up even if trials still run elsewhere")
    w.add_argument("--report", action="store_true",
                   help="only print the results of an existing study and write its files")
    w.add_argument("--command", type=int, default=None, metavar="TRIAL",
                   help="only print the binopt sparsify command that trains trial TRIAL of "
                        "an existing study again (same settings and seeds, new --out)")
    w.add_argument("--no-html", action="store_true", help="do not write pareto.html")
    w.add_argument("--quiet", action="store_true", help="no per-trial lines")
    p.set_defaults(func=run)


def _space(args: argparse.Namespace):
    import binopt
    from binopt.parameterizations import available_parameterizations

    from .space import EXCLUDED_ESTIMATORS, SearchSpace, parse_choices, parse_float_spec

    try:
        return SearchSpace(
            lam=parse_float_spec(args.lam, log=True, name="lam", low=0.0),
            lam_per_layer=bool(args.lam_per_layer),
            parameterization=parse_choices(
                args.parameterization, name="parameterization",
                allowed=[p for p in available_parameterizations() if p != "sigmoid"],
            ),
            k=parse_float_spec(args.k, log=False, name="k", low=0.0, exclusive=True),
            estimator=parse_choices(
                args.estimator, name="estimator",
                allowed=[e for e in binopt.available_estimators() if e not in EXCLUDED_ESTIMATORS],
            ),
            init_drop_rate=parse_float_spec(args.init_drop_rate, log=False,
                                            name="init-drop-rate", low=0.0, high=1.0,
                                            exclusive=True),
            lr=parse_float_spec(args.lr, log=True, name="lr", low=0.0, exclusive=True),
            gate_lr=parse_float_spec(args.gate_lr, log=True, name="gate-lr", low=0.0,
                                     exclusive=True),
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _model_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if args.model_options:
        try:
            options = json.loads(args.model_options)
        except json.JSONDecodeError as exc:
            raise UserError(f"--model-options must be a JSON object like "
                            f"'{{\"hidden\": [100, 50]}}'; got {args.model_options!r} ({exc})"
                            ) from None
        if not isinstance(options, dict):
            raise UserError(f"--model-options must be a JSON object; got {args.model_options!r}")
    if args.hidden:
        try:
            options["hidden"] = [int(h) for h in str(args.hidden).split(",") if h.strip()]
        except ValueError:
            raise UserError(f"--hidden takes comma-separated widths; got {args.hidden!r}") from None
        if not options["hidden"] or min(options["hidden"]) < 1:
            raise UserError(f"--hidden takes positive widths; got {args.hidden!r}")
    return options


def settings_from_args(args: argparse.Namespace):
    """Build :class:`~applications.tune.study.TuneSettings` from parsed arguments."""
    from .study import TuneSettings, resolve_storage

    name = args.study_name or f"{args.model}-{args.dataset}-{args.mode}"
    out = args.out or str(Path("runs") / "tune" / name)
    train = {
        "model": args.model, "dataset": args.dataset, "data_root": args.data_root,
        "epochs": args.epochs, "batch_size": args.batch_size, "optimizer": args.optimizer,
        "weight_decay": args.weight_decay, "seed": args.train_seed, "device": args.device,
        "amp": bool(args.amp), "limit": args.limit, "model_options": _model_options(args),
        "validation_fraction": args.validation_fraction,
    }
    for option, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UserError(f"{option} must be >= 1; got {value}")
    if args.limit is not None and args.limit < 2:
        raise UserError(f"--limit must be >= 2; got {args.limit}")
    return TuneSettings(
        storage=resolve_storage(args.storage, out), study_name=name, n_trials=args.trials,
        out=out, mode=args.mode, kept=args.kept, budget=args.budget, weight=args.weight,
        pruner=args.pruner, pruner_warmup=args.pruner_warmup,
        pruner_startup=args.pruner_startup, space=_space(args), train=train, seed=args.seed,
        startup_trials=args.startup_trials, heartbeat=args.heartbeat, jobs=args.jobs,
        threads=args.threads, wait=not args.no_wait, verbose=not args.quiet,
        worker_index=args.worker_index,
    )


def _print_files(paths: dict[str, Path]) -> None:
    print("\nwrote: " + ", ".join(str(p) for p in paths.values()))


def retrain_command(study: optuna.Study, number: int) -> str:
    """The ``binopt sparsify`` command that trains trial ``number`` of ``study`` again.

    Parameters
    ----------
    study : optuna.Study
    number : int
        The trial's number.

    Returns
    -------
    str
        The command of :func:`~applications.tune.report.sparsify_command`, writing to
        ``OUT/retrain/NNNN``.

    Raises
    ------
    UserError
        When the study has no such trial, or the trial recorded no training settings (it
        failed before training, or was a surplus trial).
    """
    from . import report as rp

    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    if number not in trials:
        raise UserError(f"--command takes a trial number of study {study.study_name!r} "
                        f"(0 to {max(trials) if trials else -1}); got {number}")
    record = rp.trial_record(trials[number])
    if not record["command"]:
        raise UserError(f"trial {number} of study {study.study_name!r} ({record['state']}) "
                        "recorded no training settings, so there is nothing to train again")
    return str(record["command"])


@contextlib.contextmanager
def _terminate_interrupts() -> Iterator[None]:
    """SIGTERM (a scheduler's time limit, ``kill``) interrupts like Ctrl-C while this runs,
    so that the running trials are recorded as interrupted (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    """Run (or with ``--report`` or ``--command`` only report) a study; returns the exit
    status."""
    try:
        import optuna
    except ImportError as exc:
        raise UserError(INSTALL_HINT) from exc

    from . import report as rp
    from . import study as st

    if args.report or args.command is not None:
        option = "--report" if args.report else "--command"
        if args.storage is None and args.study_name is None and args.out is None:
            raise UserError(f"{option} needs --storage (and --study-name if it holds several)")
        name = args.study_name
        default_out = args.out or str(
            Path("runs") / "tune" / (name or f"{args.model}-{args.dataset}-{args.mode}"))
        storage = st.resolve_storage(args.storage, default_out)
        study = rp.load_study_for_report(storage, name)
        if args.command is not None:
            print(retrain_command(study, args.command))
            return 0
        if args.out:
            out = Path(args.out)
        elif storage.startswith("journal:"):
            out = Path(storage[len("journal:"):]).parent
        else:
            out = Path("runs") / "tune" / study.study_name
        rep, paths = rp.write_report(study, out, html=not args.no_html)
        print(rp.format_report(rep))
        _print_files(paths)
        return 0

    settings = settings_from_args(args)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if settings.verbose:
        space = ", ".join(f"{k} {v}" for k, v in settings.space.describe().items())
        print(f"binopt tune: study {settings.study_name!r} ({settings.mode} mode, "
              f"{settings.n_trials} trials, {settings.jobs} worker(s)) in {settings.storage}\n"
              f"  space: {space}", flush=True)
    try:
        with _terminate_interrupts():
            study = st.run_study(settings)
    except KeyboardInterrupt:
        print(f"binopt: interrupted; finished trials are kept in {settings.storage} and the "
              "running ones are recorded as interrupted: run the same command again to "
              "continue (interrupted trials are retried from their last finished epoch)",
              file=sys.stderr)
        return 130
    rep, paths = rp.write_report(study, settings.out, html=not args.no_html)
    print()
    print(rp.format_report(rep))
    _print_files(paths)
    problem = st.no_complete_trial_message(study, settings.n_trials)
    if problem is not None:
        # A run that produced nothing must not look like a success to scripts and CI.
        print(f"binopt: error: {problem}", file=sys.stderr)
        return 1
    return 0
