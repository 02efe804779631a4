"""A 24-trial Pareto study of the MNIST MLP (784-300-100-10) on mnist5k, with a dense reference.

What it does
------------
1. Trains the dense MLP once (``TrainConfig(baseline="dense")``, same epochs, optimizer,
   seed and validation split as the trials) for the reference error.
2. Runs ``binopt tune`` in Pareto mode (validation error vs FLOPs kept) with ``--jobs``
   worker processes sharing a journal file (one torch thread each). The search space is
   the default one with ranges suited to this small data set and budget (informed by the
   sparsify runs in docs/sparsify/results.md, which settle with a separate, larger gate
   learning rate): one lambda per gated layer in 0.01-0.1 (log), estimator arm / disarm /
   hard_concrete, gate sigmoid(k phi) or hard sigmoid with k in 4-10, initial drop rate
   0.1-0.5, weight learning rate 5e-4-3e-3 (log) and gate learning rate 3e-3-3e-2 (log;
   with only 32 steps per epoch the gates need a large step size to settle within the
   budget), 80 epochs per trial.
3. Writes the Pareto table, ``pareto.png``/``.html``, the Pareto set and every trial to
   ``benchmarks/results/tune_mnist5k_*`` and checks the bar: the front holds a point whose
   TEST error is within 1.0 point of the dense network's test error with at most 10% of the
   FLOPs kept.

The study is resumable: rerunning the command continues the journal in ``--out`` (a killed
run loses at most the trials in flight, which are retried). ``--report-only`` rebuilds the
result files from the journal without training.

Output names
------------
With the default settings the result files are the committed ones in
``benchmarks/results/``: ``tune_mnist5k.json`` and ``tune_mnist5k_{pareto.md,pareto.png,
pareto.html,best_trials.json,trials.json}``, and the study folder is
``runs/tune/mnist5k-bench-gatelr``. A run with other settings puts ``_<settings>``, the
options that differ from the defaults, after ``tune_mnist5k`` in every file name
(``--trials 6 --epochs 5`` writes ``tune_mnist5k_epochs-5_trials-6.json``,
``tune_mnist5k_epochs-5_trials-6_pareto.png``, ...; see :func:`output_stem`) and after
the default study folder's name, so it neither overwrites the committed results nor
continues the default study's journal (nor retrains its dense reference). Left out of the
names, because they do not change the study: ``--jobs`` and ``--threads`` (how the trials
are spread over processes and threads), ``--out`` and ``--results`` (locations) and
``--report-only`` (rebuilds the files of the study the other options name).

Usage::

    python benchmarks/tune_mnist5k.py                      # 24 trials, 2 workers
    python benchmarks/tune_mnist5k.py --trials 6 --epochs 5  # tune_mnist5k_epochs-5_trials-6*
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._output import settings_stem  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
STEM = "tune_mnist5k"
#: The default study folder (``--out``) of a run with the default settings.
STUDY_DIR = ROOT / "runs" / "tune" / "mnist5k-bench-gatelr"
#: Options that do not change the study (see "Output names" in the module docstring).
_NOT_SETTINGS = frozenset({"jobs", "threads", "results", "report_only"})
BAR_POINTS = 0.01  # within 1.0 point of the dense error
BAR_FLOPS = 0.10  # with at most 10% of FLOPs kept


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--lam", default="0.01:0.1", help="per-layer lambda range (log scale)")
    p.add_argument("--lr", default="5e-4:3e-3", help="weight learning-rate range (log scale)")
    p.add_argument("--gate-lr", default="3e-3:3e-2",
                   help="gate learning-rate range (log scale)")
    p.add_argument("--init-drop-rate", default="0.1:0.5", help="initial drop-rate range")
    p.add_argument("--k", default="4:10", help="gate slope range")
    p.add_argument("--seed", type=int, default=0, help="sampler seed")
    p.add_argument("--startup-trials", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--out", default=None,
                   help="study folder (journal, trial runs, dense baseline); default "
                   "runs/tune/mnist5k-bench-gatelr, with _<settings> appended when options "
                   "other than --jobs/--threads/--results/--report-only differ from the "
                   "defaults")
    p.add_argument("--results", default=str(RESULTS),
                   help="where the result files go (tune_mnist5k.json and "
                   "tune_mnist5k_*: the committed names with the default settings, else "
                   "tune_mnist5k_<settings>.json and tune_mnist5k_<settings>_*)")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the result files from the journal; train nothing")
    return p


def output_stem(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """``tune_mnist5k`` with the default settings, else ``tune_mnist5k_<settings>`` naming
    the options that differ (:func:`benchmarks._output.settings_stem`; the options in
    :data:`_NOT_SETTINGS` and ``--out`` are left out). The result files are
    ``RESULTS/<stem>.json`` and ``RESULTS/<stem>_{pareto.md,pareto.png,pareto.html,
    best_trials.json,trials.json}``."""
    return settings_stem(STEM, args, parser, ignore=_NOT_SETTINGS)


def study_dir(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Path:
    """``--out``, or by default :data:`STUDY_DIR` with the settings part of
    :func:`output_stem` appended (``mnist5k-bench-gatelr_epochs-5_trials-6``)."""
    if args.out is not None:
        return Path(args.out)
    return STUDY_DIR.with_name(STUDY_DIR.name + output_stem(args, parser)[len(STEM):])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, with ``--out`` resolved (:func:`study_dir`) and ``stem`` set to
    :func:`output_stem`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.stem = output_stem(args, parser)
    args.out = str(study_dir(args, parser))
    return args


def dense_reference(args: argparse.Namespace) -> dict:
    """Train (or reload) the dense baseline with the trials' budget and split."""
    from applications.sparsify.train import TrainConfig, train

    folder = Path(args.out) / "dense_reference"
    summary_path = folder / "summary.json"
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        if summary.get("epochs") == args.epochs and "dense_test_error" in summary:
            return summary
    if args.report_only:
        raise SystemExit(f"no dense reference in {folder}; run without --report-only first")
    print(f"dense reference: {args.epochs} epochs ...", flush=True)
    t0 = time.time()
    summary = train(TrainConfig(
        model="mlp", dataset="mnist5k", baseline="dense", epochs=args.epochs,
        validation_fraction=0.2, lam=0.1, estimator="arm", out=str(folder), progress=False,
        num_threads=max(1, (os.cpu_count() or 1)),
    ))
    print(f"dense reference: test error {100 * summary['dense_test_error']:.2f}% "
          f"({time.time() - t0:.0f} s)", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import optuna

    from applications.tune.report import set_reference, write_report
    from applications.tune.space import SearchSpace, parse_float_spec
    from applications.tune.study import TuneSettings, open_storage, resolve_storage, run_study

    dense = dense_reference(args)
    space = SearchSpace(
        lam=parse_float_spec(args.lam, log=True, name="lam"),
        lam_per_layer=True,
        k=parse_float_spec(args.k, log=False, name="k"),
        init_drop_rate=parse_float_spec(args.init_drop_rate, log=False, name="init-drop-rate"),
        lr=parse_float_spec(args.lr, log=True, name="lr"),
        gate_lr=parse_float_spec(args.gate_lr, log=True, name="gate-lr"),
    )
    settings = TuneSettings(
        storage=resolve_storage(None, args.out), study_name="mlp-mnist5k-pareto",
        n_trials=args.trials, out=args.out, mode="pareto", kept="flops",
        space=space,
        train={"model": "mlp", "dataset": "mnist5k", "epochs": args.epochs,
               "batch_size": 100, "seed": 0, "validation_fraction": 0.2},
        seed=args.seed, startup_trials=args.startup_trials, jobs=args.jobs, heartbeat=30.0,
        threads=args.threads,
    )
    if args.report_only:
        study = optuna.load_study(study_name=settings.study_name,
                                  storage=open_storage(settings.storage))
    else:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = run_study(settings)
    set_reference(study, test_error=dense["dense_test_error"],
                  val_error=dense.get("dense_val_error"), label="dense MLP")
    rep, paths = write_report(study, args.results, prefix=f"{args.stem}_")

    dense_err = float(dense["dense_test_error"])
    dense_val = dense.get("dense_val_error")

    def meets(r: dict, err_key: str, reference: float | None) -> bool:
        return (reference is not None and r.get(err_key) is not None
                and r.get("flops_kept_fraction") is not None
                and r[err_key] <= float(reference) + BAR_POINTS + 1e-12
                and r["flops_kept_fraction"] <= BAR_FLOPS)

    keys = ("number", "architecture", "val_error", "test_error", "flops_kept_fraction",
            "params_kept_fraction")
    # The bar proper: a point of the (validation) front whose held-out TEST error is within
    # one point of the dense network's test error. Also recorded: the same check with both
    # errors measured on the validation split (the front's own metric), and any trial at all.
    qualifying = [r for r in rep.front if meets(r, "test_error", dense_err)]
    qualifying_val = [r for r in rep.front if meets(r, "val_error", dense_val)]
    complete = [r for r in rep.records if r["state"] == "COMPLETE"]
    any_trial = [r for r in complete if meets(r, "test_error", dense_err)]
    closest = min(
        (r for r in rep.front if r.get("flops_kept_fraction") is not None
         and r["flops_kept_fraction"] <= BAR_FLOPS and r.get("test_error") is not None),
        key=lambda r: r["test_error"], default=None,
    )
    # picking the lowest TEST error among the front flatters it: the honest pick uses the
    # validation error, which the front was built on
    chosen_on_val = min(
        (r for r in rep.front if r.get("flops_kept_fraction") is not None
         and r["flops_kept_fraction"] <= BAR_FLOPS and r.get("val_error") is not None),
        key=lambda r: r["val_error"], default=None,
    )
    durations = [r["duration_s"] for r in rep.records if r.get("duration_s")]
    starts = [r["datetime_start"] for r in rep.records if r.get("datetime_start")]
    ends = [r["datetime_complete"] for r in rep.records if r.get("datetime_complete")]
    from datetime import datetime

    study_wall = ((datetime.fromisoformat(max(ends)) - datetime.fromisoformat(min(starts)))
                  .total_seconds() if starts and ends else None)
    dense_wall = dense.get("wall_time_s")
    result = {
        "bar": {
            "holds": bool(qualifying),
            "statement": "a Pareto-front point whose test error is within 1.0 point of the "
                         "dense MLP's test error with at most 10% of FLOPs kept",
            "dense_test_error": dense_err,
            "dense_val_error": dense_val,
            "qualifying_front_points": [{k: r[k] for k in keys} for r in qualifying],
            "best_front_point_within_flops": (
                {k: closest[k] for k in keys} if closest is not None else None),
            "front_point_chosen_on_validation": (
                {k: chosen_on_val[k] for k in keys} if chosen_on_val is not None else None),
            "test_error_margin_points": (
                100 * (closest["test_error"] - dense_err - BAR_POINTS)
                if closest is not None else None),
            "holds_on_validation_split": bool(qualifying_val),
            "qualifying_front_points_validation": [{k: r[k] for k in keys}
                                                   for r in qualifying_val],
            "trials_meeting_it_on_test_error_anywhere": [{k: r[k] for k in keys}
                                                         for r in any_trial],
        },
        "command": " ".join(["python", *(shlex.quote(a) for a in (
            sys.argv if argv is None else ["benchmarks/tune_mnist5k.py", *argv]))]),
        "study": {"name": settings.study_name, "storage": settings.storage,
                  "trials": args.trials, "jobs": args.jobs, "threads": args.threads,
                  "epochs": args.epochs,
                  "sampler_seed": args.seed, "space": settings.space.describe(),
                  "counts": rep.counts},
        "timing": {
            "dense_reference_wall_s": dense_wall,
            "study_wall_s": study_wall,
            "total_wall_s": (dense_wall or 0.0) + (study_wall or 0.0),
            "trial_mean_s": sum(durations) / len(durations) if durations else None,
            "note": f"{os.cpu_count()} CPU cores shared with other jobs (1-minute load "
                    f"average at the end {os.getloadavg()[0]:.1f}); the dense reference "
                    "trains the L0 net and the dense net",
        },
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform()},
        "files": {k: str(Path(v).relative_to(ROOT)) if Path(v).is_relative_to(ROOT) else str(v)
                  for k, v in paths.items()},
    }
    summary_path = Path(args.results) / f"{args.stem}.json"
    summary_path.write_text(json.dumps(result, indent=2) + "\n")

    from applications.tune.report import format_report

    print(format_report(rep, run_dirs=False))
    print()
    print(f"dense MLP test error {100 * dense_err:.2f}%; bar (front point with test error "
          f"<= {100 * (dense_err + BAR_POINTS):.2f}% and FLOPs kept <= 10%): "
          + ("HOLDS, trial(s) " + ", ".join(str(r["number"]) for r in qualifying)
             if qualifying else "DOES NOT HOLD"))
    if not qualifying and closest is not None:
        print(f"  closest front point with <= 10% FLOPs: trial {closest['number']} "
              f"({closest['architecture']}), test error {100 * closest['test_error']:.2f}% "
              f"at {100 * closest['flops_kept_fraction']:.2f}% FLOPs "
              f"({result['bar']['test_error_margin_points']:+.2f} points past the bar)")
    if dense_val is not None:
        print(f"  on the validation split (dense {100 * float(dense_val):.2f}%): "
              + ("holds, trial(s) " + ", ".join(str(r["number"]) for r in qualifying_val)
                 if qualifying_val else "does not hold"))
    if any_trial:
        print("  trials meeting it on test error (front or not): "
              + ", ".join(f"{r['number']} ({100 * r['test_error']:.2f}% at "
                          f"{100 * r['flops_kept_fraction']:.2f}% FLOPs)" for r in any_trial))
    bar = result["bar"]
    lines = [
        "", "## The bar", "",
        f"Dense MLP (same {args.epochs}-epoch budget and split): test error "
        f"{100 * dense_err:.2f}%"
        + (f", validation error {100 * float(dense_val):.2f}%." if dense_val is not None
           else "."),
        f"Bar: a Pareto-front point with test error <= {100 * (dense_err + BAR_POINTS):.2f}% "
        f"and at most 10% of FLOPs kept: **{'holds' if bar['holds'] else 'does not hold'}**.",
    ]
    if closest is not None:
        lines.append(
            f"Best front point within 10% FLOPs: trial {closest['number']} "
            f"({closest['architecture']}), validation {100 * closest['val_error']:.2f}%, test "
            f"{100 * closest['test_error']:.2f}% at {100 * closest['flops_kept_fraction']:.2f}% "
            f"FLOPs ({bar['test_error_margin_points']:+.2f} points from the bar's limit; "
            "the lowest test error of the front, an optimistic pick).")
    if chosen_on_val is not None:
        lines.append(
            f"Chosen on validation error instead: trial {chosen_on_val['number']} "
            f"({chosen_on_val['architecture']}), validation "
            f"{100 * chosen_on_val['val_error']:.2f}%, test "
            f"{100 * chosen_on_val['test_error']:.2f}% at "
            f"{100 * chosen_on_val['flops_kept_fraction']:.2f}% FLOPs.")
    lines.append(
        "Measured on the validation split instead (front point vs dense validation error): "
        + ("holds (trials " + ", ".join(str(r["number"]) for r in qualifying_val) + ")."
           if qualifying_val else "does not hold."))
    if any_trial:
        lines.append(
            "Trials meeting the bar on test error but not on the validation front: "
            + ", ".join(f"{r['number']} ({r['architecture']}, test {100 * r['test_error']:.2f}% "
                        f"at {100 * r['flops_kept_fraction']:.2f}% FLOPs)"
                        for r in any_trial if r not in qualifying) + ".")
    with open(paths["table"], "a") as fh:
        fh.write("\n".join(lines) + "\n")
    print("wrote " + ", ".join(str(p) for p in [*paths.values(), summary_path]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
