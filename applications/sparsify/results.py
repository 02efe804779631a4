"""Human-readable summaries and plots of sparsification runs.

- :func:`format_summary`: the few lines ``binopt sparsify`` prints at the end of a run.
- :func:`plot_run`: ``OUT/summary.png``, kept units per gated layer (bars against the layer
  sizes) and error per epoch (test, validation, dense baseline) with the expected kept
  fraction.
- :func:`read_metrics`, :func:`read_summary`: read a run folder back.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["format_summary", "plot_run", "read_metrics", "read_summary"]

_ESTIMATOR_LABELS = {"arm": "L0-ARM", "hard_concrete": "L0-HC", "disarm": "L0-DisARM"}


def estimator_label(name: str) -> str:
    """``"arm"`` -> ``"L0-ARM"``, ``"hard_concrete"`` -> ``"L0-HC"``, else ``"L0-<name>"``."""
    key = str(name).strip().lower().replace("-", "_")
    if key in ("hc", "l0_hc", "hard_concrete"):
        key = "hard_concrete"
    return _ESTIMATOR_LABELS.get(key, f"L0-{name}")


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * float(x):.2f}%"


def format_summary(summary: Mapping[str, Any]) -> str:
    """A short human summary of a run's ``summary.json``.

    Examples
    --------
    >>> print(format_summary({"model": "mlp", "dataset": "mnist5k", "estimator": "arm",
    ...     "lambda": 0.1, "epochs": 2, "seed": 0, "architecture": "700-50-40",
    ...     "dense_architecture": "784-300-100", "params_kept_fraction": 0.1,
    ...     "flops_kept_fraction": 0.1, "test_error": 0.05, "out": "runs/x"}))
    L0-ARM mlp on mnist5k (lambda=0.1, 2 epochs, seed 0)
      architecture    784-300-100 -> 700-50-40
      weights kept    10.00% (FLOPs 10.00%)
      test error      5.00%
      outputs         runs/x
    """
    lines = [
        f"{estimator_label(summary.get('estimator', '?'))} {summary.get('model', '?')} on "
        f"{summary.get('dataset', '?')} (lambda={summary.get('lambda')}, "
        f"{summary.get('epochs')} epochs, seed {summary.get('seed')})",
        f"  architecture    {summary.get('dense_architecture', '?')} -> "
        f"{summary.get('architecture', '?')}",
        f"  weights kept    {_pct(summary.get('params_kept_fraction'))} "
        f"(FLOPs {_pct(summary.get('flops_kept_fraction'))})",
    ]
    if "val_error" in summary:
        lines.append(f"  val error       {_pct(summary['val_error'])}")
    err = f"  test error      {_pct(summary.get('test_error'))}"
    if "dense_test_error" in summary:
        err += f"   (dense baseline {_pct(summary['dense_test_error'])})"
    lines.append(err)
    lines.append(f"  outputs         {summary.get('out', '?')}")
    return "\n".join(lines)


def read_summary(folder: str | os.PathLike) -> dict[str, Any]:
    """``folder/summary.json`` as a dict."""
    return json.loads((Path(folder) / "summary.json").read_text(encoding="utf-8"))


def read_metrics(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-epoch rows of ``folder/metrics.jsonl``."""
    path = Path(folder) / "metrics.jsonl"
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_run(
    history: Sequence[Mapping[str, Any]],
    dense_history: Sequence[Mapping[str, Any]],
    kept_units: Mapping[str, int],
    total_units: Mapping[str, int],
    path: str | os.PathLike,
    title: str = "",
) -> Path:
    """Write a two-panel PNG: kept units per gated layer, and error vs epoch.

    Parameters
    ----------
    history, dense_history : sequences of dict
        Per-epoch metrics of the gated network and of the dense baseline (may be empty).
    kept_units, total_units : mapping
        Units kept / present per gated layer (same keys, network order).
    path : path-like
        Output PNG.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, (ax_units, ax_err) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(total_units)
    xs = range(len(names))
    totals = [int(total_units[n]) for n in names]
    kept = [int(kept_units.get(n, 0)) for n in names]
    ax_units.bar(xs, totals, color="0.85", label="units")
    ax_units.bar(xs, kept, color="tab:blue", label="kept")
    for x, k, t in zip(xs, kept, totals):
        ax_units.text(x, k, f"{k}/{t}", ha="center", va="bottom", fontsize=8)
    ax_units.set_xticks(list(xs))
    ax_units.set_xticklabels([f"layer {n}" for n in names], rotation=30, ha="right")
    ax_units.set_ylabel("gated units")
    ax_units.set_title("kept units per gated layer")
    ax_units.legend(loc="upper right", fontsize=8)

    if history:
        epochs = [r["epoch"] for r in history]
        ax_err.plot(epochs, [100 * r["test_error"] for r in history], label="test (L0)",
                    color="tab:blue")
        if "val_error" in history[0]:
            ax_err.plot(epochs, [100 * r["val_error"] for r in history], label="val (L0)",
                        color="tab:blue", linestyle="--")
    if dense_history:
        ax_err.plot([r["epoch"] for r in dense_history],
                    [100 * r["test_error"] for r in dense_history], label="test (dense)",
                    color="tab:gray")
    curves = [100 * r["test_error"] for h in (history, dense_history) for r in h[len(h) // 10:]]
    if curves:  # let the first epochs' large errors run off the top
        ax_err.set_ylim(0, min(100.0, 1.5 * max(curves) + 1.0))
    ax_err.set_xlabel("epoch")
    ax_err.set_ylabel("error (%)")
    ax_err.set_title("error and expected kept fraction")
    if history:
        ax_kept = ax_err.twinx()
        ax_kept.plot(epochs, [100 * r["expected_kept_fraction"] for r in history],
                     color="tab:orange", label="E[kept] (gated weights)")
        ax_kept.set_ylabel("expected kept fraction (%)", color="tab:orange")
        ax_kept.set_ylim(0, 100)
        h1, l1 = ax_err.get_legend_handles_labels()
        h2, l2 = ax_kept.get_legend_handles_labels()
        ax_err.legend(h1 + h2, l1 + l2, loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
