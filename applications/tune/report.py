"""Results of a tuning study: the Pareto table, ``pareto.png``, ``pareto.html`` and JSON.

Everything here reads the study's storage only (nothing is trained), so
``binopt tune --report`` can rebuild the outputs of a finished or still running study.

Files written by :func:`write_report` into the output folder:

``pareto.md``
    The Pareto set (validation error vs kept fraction) as a Markdown table: trial,
    architecture, validation and test error, kept fractions of FLOPs and parameters,
    hyperparameters, run folder.
``pareto.png``
    All complete trials and the Pareto front (matplotlib); the test error of each front
    point and, when the study has one, the dense reference error.
``pareto.html``
    The same plot, interactive (plotly), when plotly is installed.
``best_trials.json``
    The Pareto set (and, in target mode, the best trial) with every recorded attribute.
``trials.json``
    Every trial of the study, whatever its state.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ..errors import UserError
from .space import RELAXED_PARAMETERIZATION
from .study import ATTR, counts_toward_budget

REFERENCE_ATTR = "binopt_reference"


def _f(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


#: ``TrainConfig`` fields and the ``binopt sparsify`` options that set them. ``None``:
#: not part of the command (``out`` is given separately; the re-run should start afresh
#: and show its progress).
SPARSIFY_OPTIONS: dict[str, str | None] = {
    "model": "--model", "dataset": "--dataset", "data_root": "--data-root",
    "estimator": "--estimator", "estimator_options": "--estimator-options", "lam": "--lam",
    "parameterization": "--parameterization", "k": "--k", "init_drop_rate": "--init-drop-rate",
    "epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "gate_lr": "--gate-lr",
    "optimizer": "--optimizer", "lr_schedule": "--lr-schedule",
    "weight_decay": "--weight-decay", "seed": "--seed", "data_seed": "--data-seed",
    "device": "--device", "amp": "--amp", "num_threads": "--threads",
    "validation_fraction": "--validation-fraction", "limit": "--limit",
    "model_options": "--model-options", "baseline": "--baseline",
    "distributed": "--distributed", "out": None, "resume": None, "progress": None,
}


def _option_value(value: Any) -> str:
    """How ``binopt sparsify`` reads a value back exactly (``repr`` of a float round-trips)."""
    if isinstance(value, Mapping):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, float):
        return repr(value)
    return str(value)


def sparsify_command(config: Mapping[str, Any], out: str | Path) -> str:
    """The ``binopt sparsify`` command that trains ``config`` again, into ``out``.

    With the trial's settings and seeds, on the same kind of device, the run gives the
    trial's network again (same architecture, same errors).

    Parameters
    ----------
    config : mapping
        A trial's ``TrainConfig`` as recorded in its ``config`` user attribute.
    out : path
        Output folder of the new run (not the trial's own folder, which it would replace).

    Returns
    -------
    str
        One shell command line, arguments quoted where needed.

    Raises
    ------
    ValueError
        When ``config`` holds a setting that has no ``binopt sparsify`` option.
    """
    unknown = sorted(set(config) - set(SPARSIFY_OPTIONS))
    if unknown:
        raise ValueError(f"no binopt sparsify option for the training setting(s) "
                         f"{', '.join(unknown)}; known: {', '.join(SPARSIFY_OPTIONS)}")
    args = ["binopt", "sparsify"]
    from applications.sparsify.train import is_hard_concrete

    # hard concrete brings its own gate: the parameterization and its slope do nothing
    unused = {"parameterization", "k"} if is_hard_concrete(config.get("estimator")) else set()
    for name, option in SPARSIFY_OPTIONS.items():
        value = config.get(name)
        if option is None or value is None or value is False or value == {} or name in unused:
            continue
        if value is True:
            args.append(option)
        elif name == "lam" and isinstance(value, Mapping):  # per layer: 1=0.1,3=0.05
            args += [option, ",".join(f"{k}={_option_value(float(v))}" for k, v in value.items())]
        else:
            args += [option, _option_value(value)]
    args += ["--out", str(out)]
    return shlex.join(args)


def retrain_folder(record: Mapping[str, Any]) -> Path:
    """Where the re-run of a trial goes: ``OUT/retrain/NNNN`` next to ``OUT/trials``."""
    run_dir = record.get("run_dir")
    base = Path(run_dir).parent.parent if run_dir else Path("runs") / "tune"
    return base / "retrain" / f"{int(record['number']):04d}"


def trial_record(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """A flat, JSON-serialisable description of one trial.

    Besides the results and settings, ``command`` is the ``binopt sparsify`` command that
    trains the trial's network again (:func:`sparsify_command`, into
    :func:`retrain_folder`), or ``None`` when the trial recorded no settings.
    """
    a = trial.user_attrs
    config = a.get("config") or {}
    hyper = {
        key: config.get(key, trial.params.get(key))
        for key in ("estimator", "parameterization", "k", "lam", "init_drop_rate", "lr",
                    "gate_lr", "epochs", "batch_size")
    }
    if hyper.get("estimator") in RELAXED_PARAMETERIZATION:  # gates are log a: no g, no k
        hyper["parameterization"], hyper["k"] = "log_a", None
    record = {
        "number": trial.number,
        "state": trial.state.name,
        "values": list(trial.values) if trial.values is not None else None,
        "val_error": _f(a.get("val_error")),
        "test_error": _f(a.get("test_error")),
        "flops_kept_fraction": _f(a.get("flops_kept_fraction")),
        "params_kept_fraction": _f(a.get("params_kept_fraction")),
        "expected_kept_fraction": _f(a.get("expected_kept_fraction")),
        "architecture": a.get("architecture"),
        "kept_units": a.get("kept_units"),
        "hyperparameters": hyper,
        "params": dict(trial.params),
        "run_dir": a.get("run_dir"),
        "duration_s": _f(a.get("duration_s")) or (
            (trial.datetime_complete - trial.datetime_start).total_seconds()
            if trial.datetime_complete and trial.datetime_start else None),
        "error": a.get("error"),
        "pruned_at_epoch": a.get("pruned_at_epoch"),
        "interrupted": bool(a.get("binopt_interrupted")),
        "surplus": bool(a.get("binopt_surplus")),
        "retry_of": a.get("binopt_retry_of"),
        "gated_weights_kept_fraction": _f(a.get("gated_weights_kept_fraction")),
        "worker": a.get("binopt_worker"),
        "intermediate_values": {str(k): v for k, v in trial.intermediate_values.items()},
        "datetime_start": trial.datetime_start.isoformat() if trial.datetime_start else None,
        "datetime_complete": (
            trial.datetime_complete.isoformat() if trial.datetime_complete else None
        ),
    }
    record["command"] = None
    if isinstance(a.get("config"), Mapping):
        try:
            record["command"] = sparsify_command(a["config"], retrain_folder(record))
        except ValueError:  # a setting of a newer training code: no exact command
            pass
    return record


def pareto_front(records: Sequence[Mapping[str, Any]], kept: str = "flops") -> list[dict]:
    """Complete trials not dominated in (validation error, kept fraction), by kept fraction.

    A trial is dominated when another is no worse in both and better in one. Trials with
    identical objectives are all kept.
    """
    key = f"{kept}_kept_fraction"
    pts = [
        dict(r) for r in records
        if r["state"] == "COMPLETE" and r.get("val_error") is not None
        and r.get(key) is not None
    ]
    front = []
    for r in pts:
        e, k = r["val_error"], r[key]
        dominated = any(
            (o["val_error"] <= e and o[key] <= k) and (o["val_error"] < e or o[key] < k)
            for o in pts
        )
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: (r[key], r["val_error"], r["number"]))


@dataclass
class StudyReport:
    """What :func:`build_report` gathers from a study."""

    study_name: str
    mode: str
    kept: str
    settings: dict[str, Any]
    records: list[dict[str, Any]]
    front: list[dict[str, Any]]
    best: dict[str, Any] | None
    reference: dict[str, Any] | None
    counts: dict[str, int] = field(default_factory=dict)


def build_report(study: optuna.Study) -> StudyReport:
    """Collect the records, the Pareto set and the best trial of a study."""
    settings = dict(study.user_attrs.get(ATTR) or {})
    mode = settings.get("mode") or ("pareto" if len(study.directions) > 1 else "target")
    kept = settings.get("kept") or "flops"
    trials = study.get_trials(deepcopy=False)
    records = [trial_record(t) for t in trials]
    front = pareto_front(records, kept)
    best = None
    if mode == "target":
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        if done:
            best = trial_record(min(done, key=lambda t: (t.value, t.number)))
    counts: dict[str, int] = {}
    for t in trials:
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    counts["counted"] = sum(counts_toward_budget(t) for t in trials)
    counts["interrupted"] = sum(bool(t.user_attrs.get("binopt_interrupted")) for t in trials)
    return StudyReport(
        study_name=study.study_name, mode=mode, kept=kept, settings=settings,
        records=records, front=front, best=best,
        reference=study.user_attrs.get(REFERENCE_ATTR), counts=counts,
    )


def set_reference(study: optuna.Study, *, test_error: float, val_error: float | None = None,
                  label: str = "dense") -> None:
    """Store a reference (the dense network's error) that the plot and table show."""
    study.set_user_attr(
        REFERENCE_ATTR,
        {"label": label, "test_error": float(test_error),
         "val_error": None if val_error is None else float(val_error)},
    )


# ----------------------------------------------------------------------------- table
def _pct(x: Any, digits: int = 2) -> str:
    v = _f(x)
    return "-" if v is None else f"{100 * v:.{digits}f}"


def _num(x: Any) -> str:
    if isinstance(x, Mapping):
        return "/".join(_num(v) for v in x.values())
    v = _f(x)
    return "-" if v is None else f"{v:.3g}"


_SHORT = {"scaled_sigmoid": "sigmoid(k)", "hard_sigmoid": "hard(k)", "log_a": "log a"}


def format_table(rows: Sequence[Mapping[str, Any]], *, run_dirs: bool = True) -> str:
    """Markdown table of trial records (errors and kept fractions in percent)."""
    head = ["trial", "architecture", "val err %", "test err %", "FLOPs kept %",
            "params kept %", "estimator", "gate", "k", "lam", "init drop", "lr", "gate lr"]
    if run_dirs:
        head.append("run folder")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        h = r.get("hyperparameters") or {}
        cells = [
            str(r["number"]), str(r.get("architecture") or "-"), _pct(r.get("val_error")),
            _pct(r.get("test_error")), _pct(r.get("flops_kept_fraction")),
            _pct(r.get("params_kept_fraction")), str(h.get("estimator") or "-"),
            _SHORT.get(str(h.get("parameterization")), str(h.get("parameterization") or "-")),
            _num(h.get("k")), _num(h.get("lam")), _num(h.get("init_drop_rate")),
            _num(h.get("lr")), _num(h.get("gate_lr")),
        ]
        if run_dirs:
            cells.append(f"`{r.get('run_dir') or '-'}`")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_report(rep: StudyReport, *, run_dirs: bool = True) -> str:
    """The text ``binopt tune`` prints: header, counts, Pareto table, best trial."""
    c = rep.counts
    objective = (
        f"minimise validation error and {rep.kept} kept fraction" if rep.mode == "pareto"
        else (
            f"minimise validation error + {rep.settings.get('weight')} x {rep.kept} kept"
            if rep.settings.get("weight") is not None
            else f"minimise validation error with {rep.kept} kept <= "
                 f"{_pct(rep.settings.get('budget'), 1)}%"
        )
    )
    parts = [
        f"study {rep.study_name!r} ({rep.mode} mode: {objective})",
        "trials: " + ", ".join(f"{n} {k}" for k, n in sorted(c.items())
                               if k not in ("counted", "interrupted") and n),
    ]
    if c.get("interrupted"):
        parts[-1] += f" ({c['interrupted']} interrupted and retried)"
    if rep.reference:
        parts.append(
            f"reference ({rep.reference.get('label', 'dense')}): test error "
            f"{_pct(rep.reference.get('test_error'))}%"
            + (f", val error {_pct(rep.reference.get('val_error'))}%"
               if rep.reference.get("val_error") is not None else "")
        )
    parts.append("")
    parts.append(f"Pareto set ({len(rep.front)} trials; validation error vs {rep.kept} kept; "
                 "test error measured once at the end of each trial):")
    parts.append(format_table(rep.front, run_dirs=run_dirs) if rep.front else "(no complete trial)")
    if rep.best is not None:
        parts.append("")
        value = _num((rep.best.get("values") or [None])[0])
        parts.append(f"best trial (target objective {value}):")
        parts.append(format_table([rep.best], run_dirs=run_dirs))
        if rep.best.get("command"):
            parts.append("")
            parts.append(f"train it again: {rep.best['command']}")
    if rep.front:
        parts.append("")
        parts.append("The binopt sparsify command that trains a trial again: \"command\" in "
                     "best_trials.json and trials.json, or binopt tune --command TRIAL with "
                     "this study's --storage and --study-name.")
    return "\n".join(parts)


# ----------------------------------------------------------------------------- plots
_KEPT_LABEL = {"flops": "FLOPs", "params": "parameters"}


def _labels_by_point(rows: Sequence[Mapping[str, Any]], key: str) -> dict[tuple, str]:
    """Trial numbers per plotted point, ``"0,2"`` where trials coincide (else overprinted)."""
    out: dict[tuple, list[str]] = {}
    for r in rows:
        out.setdefault((100 * r[key], 100 * r["val_error"]), []).append(str(r["number"]))
    return {xy: ",".join(numbers) for xy, numbers in out.items()}


def _budget(rep: StudyReport) -> float | None:
    """The kept-fraction budget of a target-mode study (``None`` otherwise)."""
    if rep.mode != "target" or rep.settings.get("weight") is not None:
        return None
    return _f(rep.settings.get("budget"))


def plot_pareto(rep: StudyReport, path: str | Path) -> Path:
    """Write ``pareto.png``: kept fraction (log x) vs error, front highlighted.

    Grey: every complete trial (validation error); red: the Pareto front with its trial
    numbers; open circles: the front's test errors; in target mode a star marks the best
    trial and a dashed line the budget; dashed and dotted black lines: the reference error
    and one point above it, when the study has a reference.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    key = f"{rep.kept}_kept_fraction"
    done = [r for r in rep.records if r["state"] == "COMPLETE"
            and r.get(key) is not None and r.get("val_error") is not None]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    if done:
        ax.scatter([100 * r[key] for r in done], [100 * r["val_error"] for r in done],
                   s=18, c="0.6", label="trials (validation error)", zorder=2)
    if rep.front:
        xs = [100 * r[key] for r in rep.front]
        ax.step(xs, [100 * r["val_error"] for r in rep.front], where="post", c="C3", lw=1,
                zorder=3)
        ax.scatter(xs, [100 * r["val_error"] for r in rep.front], s=36, c="C3",
                   label="Pareto front (validation error)", zorder=4)
        tests = [(100 * r[key], 100 * r["test_error"]) for r in rep.front
                 if r.get("test_error") is not None]
        if tests:
            ax.scatter(*zip(*tests), s=36, facecolors="none", edgecolors="C0",
                       label="Pareto front (test error)", zorder=4)
        for (x, y), numbers in _labels_by_point(rep.front, key).items():
            ax.annotate(numbers, (x, y), textcoords="offset points", xytext=(3, 3),
                        fontsize=7, c="C3")
    budget = _budget(rep)
    if budget is not None:
        ax.axvline(100 * budget, c="C2", ls="--", lw=1,
                   label=f"budget ({_pct(budget, 1)}% {_KEPT_LABEL[rep.kept]})")
    best = rep.best or {}
    if best.get(key) is not None and best.get("val_error") is not None:
        ax.scatter([100 * best[key]], [100 * best["val_error"]], s=160, marker="*", c="gold",
                   edgecolors="k", linewidths=0.6, label=f"best trial ({best['number']})",
                   zorder=5)
    ref = rep.reference or {}
    if _f(ref.get("test_error")) is not None:
        e = 100 * float(ref["test_error"])
        ax.axhline(e, c="k", ls="--", lw=1, label=f"{ref.get('label', 'dense')} test error")
        ax.axhline(e + 1.0, c="k", ls=":", lw=1, label="+1 point")
    xs_all = [100 * r[key] for r in done]
    ys_all = [100 * r["val_error"] for r in done]
    fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    if xs_all and min(xs_all) > 0:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(fmt)
    if ys_all and min(ys_all) > 0 and max(ys_all) > 5 * min(ys_all):
        ax.set_yscale("log")  # collapsed trials (90% error) would squash the front
        ax.yaxis.set_major_formatter(fmt)
        ax.yaxis.set_minor_formatter(fmt)
    ax.set_xlabel(f"{_KEPT_LABEL[rep.kept]} kept (%)")
    ax.set_ylabel("error (%)")
    ax.set_title(f"{rep.study_name}: error vs {_KEPT_LABEL[rep.kept]} kept")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_pareto_html(rep: StudyReport, path: str | Path) -> Path | None:
    """Write ``pareto.html`` with plotly (hover shows each trial); ``None`` without plotly."""
    try:
        import plotly.graph_objects as go
    except ImportError:
        return None
    key = f"{rep.kept}_kept_fraction"
    done = [r for r in rep.records if r["state"] == "COMPLETE"
            and r.get(key) is not None and r.get("val_error") is not None]

    def hover(r: Mapping[str, Any]) -> str:
        h = r.get("hyperparameters") or {}
        return "<br>".join([
            f"trial {r['number']} ({r.get('architecture')})",
            f"val {_pct(r.get('val_error'))}% test {_pct(r.get('test_error'))}%",
            f"FLOPs {_pct(r.get('flops_kept_fraction'))}% params "
            f"{_pct(r.get('params_kept_fraction'))}%",
            *(f"{k}: {_num(v) if not isinstance(v, str) else v}" for k, v in h.items()),
            f"{r.get('run_dir')}",
        ])

    fig = go.Figure()
    fig.add_trace(go.Scatter(
        x=[100 * r[key] for r in done], y=[100 * r["val_error"] for r in done],
        mode="markers", name="trials", marker={"color": "gray"},
        hovertext=[hover(r) for r in done], hoverinfo="text",
    ))
    fig.add_trace(go.Scatter(
        x=[100 * r[key] for r in rep.front], y=[100 * r["val_error"] for r in rep.front],
        mode="lines+markers", line={"shape": "hv"}, name="Pareto front (val)",
        hovertext=[hover(r) for r in rep.front], hoverinfo="text",
    ))
    fig.add_trace(go.Scatter(
        x=[100 * r[key] for r in rep.front if r.get("test_error") is not None],
        y=[100 * r["test_error"] for r in rep.front if r.get("test_error") is not None],
        mode="markers", name="Pareto front (test)", marker={"symbol": "circle-open"},
    ))
    best = rep.best or {}
    if best.get(key) is not None and best.get("val_error") is not None:
        fig.add_trace(go.Scatter(
            x=[100 * best[key]], y=[100 * best["val_error"]], mode="markers",
            name=f"best trial ({best['number']})",
            marker={"symbol": "star", "size": 14, "color": "gold"},
            hovertext=[hover(best)], hoverinfo="text",
        ))
    budget = _budget(rep)
    ys = [100 * r["val_error"] for r in done]
    if budget is not None and ys:  # a trace, not a shape: shapes misplace text on log axes
        fig.add_trace(go.Scatter(
            x=[100 * budget] * 2, y=[min(ys), max(ys)], mode="lines",
            name=f"budget ({_pct(budget, 1)}% {_KEPT_LABEL[rep.kept]})",
            line={"dash": "dash", "color": "green"}, hoverinfo="name",
        ))
    ref = rep.reference or {}
    if _f(ref.get("test_error")) is not None:
        fig.add_hline(y=100 * float(ref["test_error"]), line_dash="dash",
                      annotation_text=f"{ref.get('label', 'dense')} test error")
    label = _KEPT_LABEL[rep.kept]
    log_x = bool(done) and min(100 * r[key] for r in done) > 0
    fig.update_layout(
        title=f"{rep.study_name}: error vs {label} kept",
        xaxis={"title": f"{label} kept (%)", "type": "log" if log_x else "linear"},
        yaxis={"title": "error (%)"},
    )
    path = Path(path)
    fig.write_html(str(path), include_plotlyjs="cdn")
    return path


# ----------------------------------------------------------------------------- files
def write_report(study: optuna.Study, out: str | Path, *, html: bool = True,
                 prefix: str = "") -> tuple[StudyReport, dict[str, Path]]:
    """Write the table, plots and JSON files of a study into ``out``.

    Parameters
    ----------
    study : optuna.Study
    out : path
        Output folder (created).
    html : bool
        Also write ``pareto.html`` when plotly is installed.
    prefix : str
        Prepended to every file name (``tune_mnist5k_`` gives ``tune_mnist5k_pareto.png``).

    Returns
    -------
    report : StudyReport
    paths : dict
        Name -> path of each written file.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rep = build_report(study)
    paths: dict[str, Path] = {}
    table = format_report(rep)
    paths["table"] = out / f"{prefix}pareto.md"
    paths["table"].write_text(f"# {rep.study_name}\n\n{table}\n")
    paths["png"] = plot_pareto(rep, out / f"{prefix}pareto.png")
    if html:
        p = plot_pareto_html(rep, out / f"{prefix}pareto.html")
        if p is not None:
            paths["html"] = p
    meta = {"study_name": rep.study_name, "mode": rep.mode, "kept": rep.kept,
            "settings": rep.settings, "counts": rep.counts, "reference": rep.reference}
    paths["best"] = out / f"{prefix}best_trials.json"
    paths["best"].write_text(json.dumps({**meta, "pareto": rep.front, "best": rep.best},
                                        indent=2) + "\n")
    paths["trials"] = out / f"{prefix}trials.json"
    paths["trials"].write_text(json.dumps({**meta, "trials": rep.records}, indent=2) + "\n")
    return rep, paths


def load_study_for_report(storage: str, study_name: str | None) -> optuna.Study:
    """Open an existing study; with no name, the storage's only study.

    Raises
    ------
    UserError
        When the storage holds no study, several (and no name was given) or not that name.
    """
    from .study import _sqlite_path, open_storage

    path = Path(storage[len("journal:"):]) if storage.startswith("journal:") else _sqlite_path(
        storage)
    if path is not None and not path.exists():
        raise UserError(f"no study storage at {path}")
    st = open_storage(storage)
    names = [s.study_name for s in optuna.get_all_study_summaries(st, include_best_trial=False)]
    if study_name is None:
        if not names:
            raise UserError(f"storage {storage!r} holds no study")
        if len(names) > 1:
            raise UserError(
                f"storage {storage!r} holds {len(names)} studies ({', '.join(names)}); "
                "name one with --study-name"
            )
        study_name = names[0]
    if study_name not in names:
        raise UserError(
            f"no study {study_name!r} in {storage!r}"
            + (f"; it holds: {', '.join(names)}" if names else " (it holds none)")
        )
    return optuna.load_study(study_name=study_name, storage=st)
