"""Benchmark: L0-ARM vs L0-HC vs dense on mnist5k (MLP 784-300-100-10 and LeNet-5-Caffe).

Trains, for every seed, the dense network, L0-ARM (Bernoulli gates, ARM gradients, sigmoid
``k phi`` parameterization) and L0-HC (hard concrete gates through the same training code)
over a grid of ``lambda`` values, and reports the test error, the fraction of weights and
FLOPs the exported (genuinely smaller) network keeps, and the pruned architectures.

Bars checked (issue #4):

- L0-ARM within 1.0 point of the dense test error while keeping at most 10% of the weights
  of the MLP and at most 5% of the weights of LeNet-5 (mean over seeds);
- L0-ARM keeping fewer weights than L0-HC at equal or lower error.

Usage::

    python benchmarks/sparsify_mnist5k.py            # full run (~30 min on 2 idle cores)
    python benchmarks/sparsify_mnist5k.py --quick    # smoke test (~1 min)

Writes ``benchmarks/results/sparsify_mnist5k.{json,md,png}`` (the committed result) with
the default settings, ``sparsify_mnist5k_quick.{json,md,png}`` with ``--quick`` (whatever
the other options), and ``sparsify_mnist5k_<settings>.{json,md,png}`` otherwise, where
``<settings>`` spells out the options that differ from the defaults (``--models mlp
--seeds 0`` writes ``sparsify_mnist5k_models-mlp_seeds-0.*``; see :func:`output_stem`), so
that such a run never overwrites the committed files. ``--seeds``/``--models`` name the
runs they select (in any order: ``--seeds 4 3 2 1 0`` is the default). Left out of the
name, because they do not change what is measured: ``--workers`` (every run trains on one
thread of its own, so the number of runs in parallel changes the wall times, not the
results), ``--runs`` and ``--results``
(locations), ``--reuse`` (which earlier runs with the same settings are read back) and
``--replot`` (re-renders the files of the run its other options name). The individual
runs (metrics, checkpoints, summaries, exported models) go to ``--runs``, by default
``runs/sparsify_mnist5k`` (``runs/sparsify_mnist5k_quick`` with ``--quick``) for every
selection of seeds and models: a run folder is named by its model, method, lambda and
seed, so a partial benchmark reads back (or fills in) runs of the full one.
An interrupted benchmark restarts where it stopped: finished runs are read back from their
``summary.json``, unfinished ones resume from their checkpoints.

Reuse across code revisions: every run folder keeps ``benchmark_revision.json``, the git
revisions (``git rev-parse HEAD``; ``null`` where git or the repository is missing) of
the code that trained it, and every record of the JSON its ``git_revision``, whether it was
``reused`` (read back from an earlier invocation) and, for those, the revision that
produced it. ``--reuse`` decides what an earlier run may be used for:

- ``same-revision`` (the default): read back or resume only runs of the current revision;
  a run of another (or an unknown) revision is trained again from scratch (so without git
  every run is re-trained). Uncommitted changes do not change the revision: re-run with
  ``--reuse never`` after editing the code.
- ``any``: read back or resume every run whose settings match, whatever its revision (the
  behaviour before revisions were recorded).
- ``never``: train every run from scratch.

The JSON also records the command line (``argv``), the parsed options (``args``) and the
environment (versions, machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._output import settings_stem  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
#: Per run folder: the git revisions of the code that trained the run (see run_one).
REVISION_FILE = "benchmark_revision.json"
REUSE_POLICIES = ("same-revision", "any", "never")
LABELS = {"dense": "dense", "arm": "L0-ARM", "hard_concrete": "L0-HC"}
TARGET_KEPT = {"mlp": 0.10, "lenet5": 0.05}
MODEL_NAMES = {"mlp": "MLP 784-300-100-10", "lenet5": "LeNet-5-Caffe 20-50-800-500"}
MODELS = ("mlp", "lenet5")

# Per-model settings of the full benchmark (see docs/sparsify/results.md for how they were
# chosen). "gated" holds the gate settings shared by L0-ARM and L0-HC: the learning rate of
# the gate parameters (Adam; weights keep lr 1e-3), and for L0-ARM the slope k of
# pi = sigmoid(k phi) and the initial drop rate (None: the model's default).
FULL = {
    "mlp": {
        "epochs": 200,
        "lams": {"arm": [0.02, 0.03, 0.05], "hard_concrete": [0.02, 0.03, 0.05]},
        "gated": {"gate_lr": 7e-3, "k": 7.0, "init_drop_rate": None},
    },
    "lenet5": {
        "epochs": 60,
        "lams": {"arm": [0.005, 0.01], "hard_concrete": [0.02, 0.05]},
        "gated": {"gate_lr": 7e-3, "k": 7.0, "init_drop_rate": None},
    },
}
QUICK = {
    "mlp": {"epochs": 2, "lams": {"arm": [0.03], "hard_concrete": [0.03]},
            "gated": {"gate_lr": 7e-3}},
    "lenet5": {"epochs": 1, "lams": {"arm": [0.01], "hard_concrete": [0.01]},
               "gated": {"gate_lr": 7e-3}},
}


# ----------------------------------------------------------------------------- planning
def plan_runs(settings: dict, seeds: list[int], runs_dir: Path, limit: int | None,
              models: list[str]) -> list[dict[str, Any]]:
    """Every run of the benchmark as a JSON-able spec (longest first)."""
    specs = []
    for model in models:
        s = settings[model]
        for seed in seeds:
            specs.append(dict(model=model, kind="dense", lam=0.0, seed=seed, epochs=s["epochs"],
                              limit=limit, gated={},
                              out=str(runs_dir / model / f"dense_s{seed}")))
            for kind, lams in s["lams"].items():
                for lam in lams:
                    specs.append(dict(
                        model=model, kind=kind, lam=lam, seed=seed, epochs=s["epochs"],
                        limit=limit, gated=dict(s["gated"]),
                        out=str(runs_dir / model / f"{kind}_lam{lam:g}_s{seed}"),
                    ))
    specs.sort(key=lambda r: (r["model"] != "lenet5", r["kind"] == "dense"))
    return specs


def _config(spec: dict[str, Any]):
    from applications.sparsify.train import TrainConfig

    gated = spec["gated"]
    return TrainConfig(
        model=spec["model"], dataset="mnist5k", estimator=spec["kind"] if spec["kind"] != "dense"
        else "arm", lam=spec["lam"], epochs=spec["epochs"], batch_size=100, lr=1e-3,
        seed=spec["seed"], device="cpu", num_threads=1, progress=False, out=spec["out"],
        limit=spec["limit"], init_drop_rate=gated.get("init_drop_rate"),
        k=float(gated.get("k", 7.0)), gate_lr=gated.get("gate_lr"),
    )


def git_revision(root: Path = ROOT) -> str | None:
    """``git rev-parse HEAD`` of ``root``; ``None`` without git or outside a repository."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    rev = done.stdout.strip()
    return rev or None


def _may_reuse(policy: str, stored: str | None, current: str | None) -> bool:
    """Whether a run written at revision ``stored`` may be reused (or resumed) now."""
    if policy == "any":
        return True
    if policy == "never":
        return False
    return current is not None and stored == current  # "same-revision"


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one run (or read it back when already finished); return a condensed record.

    ``spec["git_revision"]`` is the revision of the code now, ``spec["reuse"]`` the policy
    (``same-revision``, ``any`` or ``never``; see the module docstring). ``OUT/`` keeps
    :data:`REVISION_FILE` with the revisions of the code that trained the run.
    """
    from applications.sparsify.train import train, train_dense

    config = _config(spec)
    current, policy = spec.get("git_revision"), spec.get("reuse", "same-revision")
    out = Path(spec["out"])
    summary_path, revision_path = out / "summary.json", out / REVISION_FILE
    revisions: list[str | None] = []
    if revision_path.exists():
        revisions = list(json.loads(revision_path.read_text()).get("git_revisions", []))
    stored = revisions[-1] if revisions else None
    allowed = _may_reuse(policy, stored, current)
    summary, note = None, None
    if summary_path.exists():
        old = json.loads(summary_path.read_text())
        if old.get("config", {}) | {"resume": False} == config.to_dict() | {"resume": False}:
            if allowed:
                summary = old
            else:
                note = (f"re-run: finished at revision {stored or 'unknown'}, now "
                        f"{current or 'unknown'} (--reuse {policy})")
    reused = summary is not None
    if summary is None:
        # picks up a checkpoint of an interrupted benchmark of a revision it may reuse;
        # otherwise starts afresh (which deletes the earlier run's outputs)
        config.resume = allowed
        revisions = [*revisions, current] if allowed else [current]
        revisions = [r for i, r in enumerate(revisions) if r not in revisions[:i]]
        out.mkdir(parents=True, exist_ok=True)
        revision_path.write_text(json.dumps({"git_revisions": revisions}, indent=2) + "\n")
        summary = train_dense(config) if spec["kind"] == "dense" else train(config)
    return {
        "git_revision": revisions[-1] if revisions else None,
        "git_revisions": revisions,
        "reused": reused,
        "rerun_note": note,
        "model": spec["model"], "method": spec["kind"], "lambda": spec["lam"],
        "seed": spec["seed"], "epochs": spec["epochs"],
        "test_error": summary["test_error"],
        "params_kept_fraction": summary["params_kept_fraction"],
        "flops_kept_fraction": summary["flops_kept_fraction"],
        "expected_kept_fraction": summary["expected_kept_fraction"],
        "architecture": summary["architecture"],
        "dense_architecture": summary["dense_architecture"],
        "compression_method": summary.get("compression_method"),
        "params_kept": summary.get("params_kept"), "params_dense": summary.get("params_dense"),
        "train_time_s": summary["train_time_s"],
        "wall_time_s": summary["wall_time_s"],
        "init_drop_rate": spec["gated"].get("init_drop_rate"), "k": spec["gated"].get("k"),
        "gate_lr": spec["gated"].get("gate_lr"), "num_train": summary.get("num_train"),
        "num_test": summary.get("num_test"),
        "out": spec["out"],
    }


# ----------------------------------------------------------------------------- analysis
def _mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and sd over seeds per (model, method, lambda)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["model"], r["method"], r["lambda"]), []).append(r)
    rows = []
    for (model, method, lam), rs in sorted(groups.items(), key=lambda kv: (
            kv[0][0], ["dense", "arm", "hard_concrete"].index(kv[0][1]), kv[0][2])):
        rs = sorted(rs, key=lambda r: r["seed"])
        err, err_sd = _mean_sd([r["test_error"] for r in rs])
        kept, kept_sd = _mean_sd([r["params_kept_fraction"] for r in rs])
        flops, flops_sd = _mean_sd([r["flops_kept_fraction"] for r in rs])
        rows.append({
            "model": model, "method": method, "lambda": lam, "seeds": [r["seed"] for r in rs],
            "test_error_mean": err, "test_error_sd": err_sd,
            "params_kept_mean": kept, "params_kept_sd": kept_sd,
            "flops_kept_mean": flops, "flops_kept_sd": flops_sd,
            "architectures": [r["architecture"] for r in rs],
            "train_time_s_mean": statistics.fmean(r["train_time_s"] for r in rs),
        })
    return rows


def verdicts(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Evaluate the bars of issue #4 on the aggregated rows."""
    out: dict[str, Any] = {}
    for model in sorted({r["model"] for r in rows}):
        mrows = [r for r in rows if r["model"] == model]
        dense = next((r for r in mrows if r["method"] == "dense"), None)
        arm = [r for r in mrows if r["method"] == "arm"]
        hc = [r for r in mrows if r["method"] == "hard_concrete"]
        if dense is None:
            continue
        target = TARGET_KEPT.get(model, 0.1)
        d_err = dense["test_error_mean"]
        passing = [r for r in arm if r["test_error_mean"] - d_err <= 0.01
                   and r["params_kept_mean"] <= target]
        best = min(passing, key=lambda r: r["params_kept_mean"]) if passing else None
        within = [r for r in arm if r["test_error_mean"] - d_err <= 0.01]
        sparsest_within = min(within, key=lambda r: r["params_kept_mean"]) if within else None
        # ARM vs HC: for each HC point, an ARM point keeping fewer weights at <= error
        comparisons = []
        for h in hc:
            dominating = [a for a in arm if a["params_kept_mean"] < h["params_kept_mean"]
                          and a["test_error_mean"] <= h["test_error_mean"]]
            same_lam = next((a for a in arm if a["lambda"] == h["lambda"]), None)
            comparisons.append({
                "hc_lambda": h["lambda"],
                "hc_test_error": h["test_error_mean"], "hc_params_kept": h["params_kept_mean"],
                "arm_dominates": bool(dominating),
                "dominating_arm_lambdas": [a["lambda"] for a in dominating],
                "arm_same_lambda": None if same_lam is None else {
                    "test_error": same_lam["test_error_mean"],
                    "params_kept": same_lam["params_kept_mean"],
                    "fewer_weights": same_lam["params_kept_mean"] < h["params_kept_mean"],
                    "error_not_higher": same_lam["test_error_mean"] <= h["test_error_mean"],
                },
            })
        out[model] = {
            "dense_test_error": d_err,
            "target_params_kept": target,
            "arm_within_1pt_and_target": best is not None,
            "arm_best_passing": None if best is None else {
                "lambda": best["lambda"], "test_error": best["test_error_mean"],
                "params_kept": best["params_kept_mean"]},
            "arm_sparsest_within_1pt": None if sparsest_within is None else {
                "lambda": sparsest_within["lambda"],
                "test_error": sparsest_within["test_error_mean"],
                "params_kept": sparsest_within["params_kept_mean"]},
            "arm_vs_hc": comparisons,
        }
    return out


# ----------------------------------------------------------------------------- reporting
def _pct(x: float, nd: int = 2) -> str:
    return f"{100 * x:.{nd}f}"


def markdown(payload: dict[str, Any]) -> str:
    rows, ver = payload["rows"], payload["verdicts"]
    lines = [
        "# L0-ARM vs L0-HC vs dense on mnist5k",
        "",
        f"{payload['settings_note']}",
        "",
        f"Seeds {payload['seeds']}; {payload['num_train']:,} training and "
        f"{payload['num_test']:,} test images; total wall time "
        f"{payload['wall_time_s'] / 60:.1f} min on {payload['machine']}."
        + (f" {payload['runs_reused']} of {len(payload['records'])} runs were read back "
           f"from earlier invocations (revisions {', '.join(payload['reused_revisions'])})."
           if payload.get("runs_reused") else ""),
        "Errors and kept fractions are means ± sd over seeds; weights/FLOPs kept are those of "
        "the exported (genuinely smaller) network relative to the dense one, biases included.",
        "",
    ]
    for model in [m for m in ("mlp", "lenet5") if any(r["model"] == m for r in rows)]:
        lines += [f"## {MODEL_NAMES.get(model, model)}", "",
                  "| method | λ | test error % | Δ vs dense (pts) | weights kept % | "
                  "FLOPs kept % | architectures (per seed) |",
                  "|---|---|---|---|---|---|---|"]
        dense = next((r for r in rows if r["model"] == model and r["method"] == "dense"), None)
        for r in (r for r in rows if r["model"] == model):
            delta = ("" if dense is None or r["method"] == "dense" else
                     f"{100 * (r['test_error_mean'] - dense['test_error_mean']):+.2f}")
            lam = "–" if r["method"] == "dense" else f"{r['lambda']:g}"
            lines.append(
                f"| {LABELS[r['method']]} | {lam} | {_pct(r['test_error_mean'])} ± "
                f"{_pct(r['test_error_sd'])} | {delta} | {_pct(r['params_kept_mean'])} ± "
                f"{_pct(r['params_kept_sd'])} | {_pct(r['flops_kept_mean'])} | "
                f"{', '.join(r['architectures'])} |"
            )
        v = ver.get(model)
        if v:
            lines += ["", f"**Bar (L0-ARM within 1.0 pt of dense, ≤ "
                          f"{100 * v['target_params_kept']:.0f}% weights):** "
                          + ("met" if v["arm_within_1pt_and_target"] else "not met")]
            if v["arm_best_passing"]:
                b = v["arm_best_passing"]
                lines.append(f"- sparsest passing L0-ARM: λ={b['lambda']:g}, error "
                             f"{_pct(b['test_error'])}% vs dense {_pct(v['dense_test_error'])}%, "
                             f"{_pct(b['params_kept'])}% of the weights")
            elif v["arm_sparsest_within_1pt"]:
                b = v["arm_sparsest_within_1pt"]
                lines.append(f"- sparsest L0-ARM within 1 pt: λ={b['lambda']:g}, "
                             f"{_pct(b['params_kept'])}% of the weights (target "
                             f"{100 * v['target_params_kept']:.0f}%)")
            else:
                lines.append("- no L0-ARM setting is within 1 pt of the dense error")
            for c in v["arm_vs_hc"]:
                same = c["arm_same_lambda"]
                text = (f"- vs L0-HC λ={c['hc_lambda']:g} ({_pct(c['hc_test_error'])}% error, "
                        f"{_pct(c['hc_params_kept'])}% weights): ")
                text += ("an L0-ARM point keeps fewer weights at equal or lower error (λ="
                         + ", ".join(f"{x:g}" for x in c["dominating_arm_lambdas"]) + ")"
                         if c["arm_dominates"] else
                         "no L0-ARM point keeps fewer weights at equal or lower error")
                if same:
                    text += (f"; same λ: L0-ARM {_pct(same['test_error'])}% error, "
                             f"{_pct(same['params_kept'])}% weights")
                lines.append(text)
        lines.append("")
    stem = payload.get("benchmark") or ("sparsify_mnist5k"
                                        + ("_quick" if payload.get("quick") else ""))
    lines += [f"![error vs weights kept]({stem}.png)", ""]
    return "\n".join(lines)


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records, rows = payload["records"], payload["rows"]
    models = [m for m in ("mlp", "lenet5") if any(r["model"] == m for r in rows)]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    colors = {"arm": "tab:blue", "hard_concrete": "tab:orange", "dense": "0.3"}
    for ax, model in zip(axes[0], models):
        for r in (r for r in records if r["model"] == model and r["method"] != "dense"):
            ax.scatter(100 * r["params_kept_fraction"], 100 * r["test_error"], s=12,
                       color=colors[r["method"]], alpha=0.35)
        for method in ("arm", "hard_concrete"):
            mr = sorted((r for r in rows if r["model"] == model and r["method"] == method),
                        key=lambda r: r["params_kept_mean"])
            if not mr:
                continue
            ax.errorbar([100 * r["params_kept_mean"] for r in mr],
                        [100 * r["test_error_mean"] for r in mr],
                        yerr=[100 * r["test_error_sd"] for r in mr], marker="o",
                        color=colors[method], label=LABELS[method], capsize=3)
            for r in mr:
                ax.annotate(f"λ={r['lambda']:g}", (100 * r["params_kept_mean"],
                                                   100 * r["test_error_mean"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=7)
        dense = next((r for r in rows if r["model"] == model and r["method"] == "dense"), None)
        if dense is not None:
            d = 100 * dense["test_error_mean"]
            ax.axhline(d, color="0.3", linestyle="--", label=f"dense {d:.2f}%")
            ax.axhline(d + 1.0, color="0.6", linestyle=":", label="dense + 1 pt")
        ax.axvline(100 * TARGET_KEPT.get(model, 0.1), color="tab:green", linestyle=":",
                   label="weights target")
        ax.set_xscale("log")
        fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(fmt)
        ax.xaxis.set_minor_formatter(fmt)
        ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("weights kept (%) of the exported network")
        ax.set_ylabel("test error (%)")
        ax.set_title(MODEL_NAMES.get(model, model))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke version (~1 minute)")
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--workers", type=int, default=2, help="parallel runs (1 thread each)")
    p.add_argument("--runs", default=None, help="folder for the individual runs")
    p.add_argument("--results", default=str(RESULTS),
                   help="folder for the result files (sparsify_mnist5k.{json,md,png} with "
                   "the default settings, sparsify_mnist5k_quick.* with --quick, else "
                   "sparsify_mnist5k_<settings>.* naming the options that differ)")
    p.add_argument("--replot", action="store_true",
                   help="only re-render the .md and .png from the existing .json (of the "
                   "run the other options name)")
    p.add_argument("--reuse", choices=REUSE_POLICIES, default="same-revision",
                   help="finished (or interrupted) runs in --runs to read back (or resume): "
                   "only those of the current git revision (default; re-run the others "
                   "from scratch), any, or never")
    return p


#: Options that do not change what is measured (see the module docstring).
_NOT_SETTINGS = frozenset({"workers", "runs", "results", "reuse", "replot"})


def _seeds(args: argparse.Namespace) -> list[int]:
    # five seeds: the last-epoch test error of an L0-ARM run moves by about 0.6 points
    # between runs that differ only in float rounding, so three seeds left the mean
    # uncertain by about 0.35 points (docs/sparsify/results.md)
    return args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2, 3, 4])


def output_stem(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """The name of the result files, before ``.json``/``.md``/``.png``.

    ``sparsify_mnist5k`` (the committed result) with the default settings,
    ``sparsify_mnist5k_quick`` with ``--quick``, else ``sparsify_mnist5k_<settings>``
    naming the options that differ (:func:`benchmarks._output.settings_stem`), seeds and
    models compared as sets; the options in :data:`_NOT_SETTINGS` are left out.
    """
    if args.quick:
        return "sparsify_mnist5k_quick"
    values = {**vars(args), "seeds": sorted(set(_seeds(args))),
              "models": [m for m in MODELS if m in args.models]}
    return settings_stem("sparsify_mnist5k", values, parser, ignore=_NOT_SETTINGS,
                         defaults={"seeds": _seeds(parser.parse_args([]))})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tag = output_stem(args, parser)
    if args.replot:
        results = Path(args.results)
        payload = json.loads((results / f"{tag}.json").read_text())
        payload["verdicts"] = verdicts(payload["rows"])
        (results / f"{tag}.json").write_text(json.dumps(payload, indent=2) + "\n")
        (results / f"{tag}.md").write_text(markdown(payload))
        plot(payload, results / f"{tag}.png")
        print(markdown(payload))
        return 0

    settings = QUICK if args.quick else FULL
    seeds = _seeds(args)
    limit = 500 if args.quick else None
    # shared by every selection of seeds and models (see the module docstring)
    runs_dir = Path(args.runs or ROOT / "runs" / ("sparsify_mnist5k"
                                                  + ("_quick" if args.quick else "")))
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    specs = plan_runs(settings, seeds, runs_dir, limit, args.models)
    revision = git_revision()
    for spec in specs:
        spec.update(git_revision=revision, reuse=args.reuse)
    print(f"{len(specs)} runs, {args.workers} worker(s); runs in {runs_dir}; revision "
          f"{revision or 'unknown'}, reuse: {args.reuse}", flush=True)

    t0 = time.perf_counter()
    records: list[dict[str, Any]] = []
    if args.workers <= 1:
        for spec in specs:
            records.append(run_one(spec))
            _progress(records[-1], len(records), len(specs), t0)
    else:
        with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(run_one, s) for s in specs]
            for fut in as_completed(futures):
                records.append(fut.result())
                _progress(records[-1], len(records), len(specs), t0)
    wall = time.perf_counter() - t0

    import torch

    import binopt
    from applications.toys._common import environment

    records.sort(key=lambda r: (r["model"], r["method"], r["lambda"], r["seed"]))
    rows = aggregate(records)
    reused = [r for r in records if r["reused"]]
    payload = {
        "benchmark": tag,
        "argv": list(sys.argv) if argv is None else [f"benchmarks/{Path(__file__).name}", *argv],
        "args": vars(args),
        "git_revision": revision,
        "reuse": args.reuse,
        "runs_reused": len(reused),
        "reused_revisions": sorted({str(r["git_revision"]) for r in reused}),
        "environment": environment(),
        "quick": args.quick,
        "seeds": seeds,
        "settings": {m: settings[m] for m in args.models},
        "settings_note": (
            "Adam, lr 1e-3 for the weights, gate_lr for the gate parameters, batch 100, no "
            "weight decay, no data augmentation; L0-ARM: Bernoulli gates, ARM gradient, "
            "pi = sigmoid(k phi), test-time gate kept iff pi >= 1/2; L0-HC: "
            "hard concrete gates (beta 2/3, gamma -0.1, zeta 1.1) on log a, clamped to "
            "[log 1e-2, log 1e2]; one gate sample per minibatch for both; penalty "
            "lambda/N * sum_j P(z_j != 0) |g_j| with N the training-set size. Epochs and gate "
            "settings per "
            "model: " + "; ".join(
                f"{m}: {settings[m]['epochs']} epochs, {settings[m]['gated'] or 'model defaults'}"
                for m in args.models) + "."
        ),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), "
                   f"{args.workers} worker(s) x 1 thread",
        "versions": {"binopt": binopt.__version__, "torch": str(torch.__version__),
                     "python": platform.python_version()},
        "wall_time_s": wall,
        "run_wall_time_s_total": sum(r["wall_time_s"] for r in records),
        "num_train": records[0]["num_train"],
        "num_test": records[0]["num_test"],
        "rows": rows,
        "verdicts": verdicts(rows),
        "records": records,
    }
    (results / f"{tag}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (results / f"{tag}.md").write_text(markdown(payload))
    plot(payload, results / f"{tag}.png")
    print(markdown(payload))
    print(f"wrote {results / tag}.{{json,md,png}} in {wall / 60:.1f} min")
    return 0


def _progress(rec: dict[str, Any], done: int, total: int, t0: float) -> None:
    if rec.get("rerun_note"):
        print(f"  {rec['out']}: {rec['rerun_note']}", flush=True)
    how = (f"reused (revision {(rec['git_revision'] or 'unknown')[:12]}) "
           if rec.get("reused") else "")
    print(f"[{done}/{total} {(time.perf_counter() - t0) / 60:5.1f} min] {how}{rec['model']:6s} "
          f"{LABELS[rec['method']]:6s} lam={rec['lambda']:<5g} seed={rec['seed']} "
          f"err={100 * rec['test_error']:.2f}% kept={100 * rec['params_kept_fraction']:.2f}% "
          f"arch={rec['architecture']}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
