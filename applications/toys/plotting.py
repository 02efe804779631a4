"""Matplotlib figures (Agg backend) for the toy problems and the variance command."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ._common import atomic_write, pyplot


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Save ``fig`` to ``path`` atomically (:func:`atomic_write`) and close it.

    The format comes from the suffix; without one it is PNG and ``.png`` is appended, as
    ``savefig`` does. An interrupted save leaves the previous figure, never a truncated one.

    Returns
    -------
    Path
        The file written.
    """
    plt = pyplot()
    path = Path(path)
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    try:
        # the temporary name's suffix is .tmp: the format must be given explicitly
        atomic_write(path, lambda fh: fig.savefig(fh, format=path.suffix[1:].lower(), dpi=dpi))
    finally:
        plt.close(fig)
    return path


#: tab10 without its red (index 3): red marks the estimators with a detected bias.
_PALETTE = (0, 1, 2, 4, 5, 6, 7, 8, 9)


def _colors(labels: Sequence[str]) -> dict[str, Any]:
    plt = pyplot()
    cmap = plt.get_cmap("tab10")
    return {label: cmap(_PALETTE[i % len(_PALETTE)]) for i, label in enumerate(labels)}


def plot_variance(
    settings: Sequence[Mapping[str, Any]], path: str | Path, title: str = ""
) -> Path:
    """Bars of the variance of one estimate (top) and variance x evaluations (bottom).

    One column per setting. Error bars are 2 standard errors; black ticks are exact
    variances. Zero variances are drawn at the bottom of the axis and marked "0". An
    estimator whose bias was detected (``bias_detected`` in its row) has its name in red
    followed by "(biased)": a low variance says nothing for it.

    Parameters
    ----------
    settings : sequence of mappings
        The ``settings`` list of the variance JSON: each has a ``label`` and ``rows`` (the
        rows :func:`~applications.toys.variance.measure` returns), e.g.
        ``[{"label": setting.label, "rows": measure(setting, specs)}]``.
    path : str or Path
        Output file; the format comes from the suffix (PNG without one).
    title : str
        Title above all columns.

    Returns
    -------
    Path
        The file written.
    """
    if isinstance(settings, Mapping) or not isinstance(settings, Sequence) or not settings:
        raise TypeError(
            "settings must be a non-empty list of {'label': ..., 'rows': [...]} mappings; "
            f"got {type(settings).__name__}"
            + (" (wrap one setting in a list)" if isinstance(settings, Mapping) else "")
        )
    for k, setting in enumerate(settings):
        if not isinstance(setting, Mapping) or "label" not in setting or "rows" not in setting:
            raise TypeError(
                f"settings[{k}] must be a mapping with 'label' and 'rows'; got "
                f"{type(setting).__name__}"
                + (f" with keys {sorted(setting)}" if isinstance(setting, Mapping) else "")
            )
        if not setting["rows"]:
            raise ValueError(f"settings[{k}] ({setting['label']!r}) has no rows to plot")
    plt = pyplot()
    n = len(settings)
    width = max(4.5, 3.2 * n + 1.5)
    fig, axes = plt.subplots(2, n, figsize=(width, 6.5), squeeze=False)
    for j, setting in enumerate(settings):
        rows = setting["rows"]
        labels = [r["estimator"] for r in rows]
        x = np.arange(len(rows))
        colors = [_colors(labels)[lab] for lab in labels]
        for i, (key, ylabel) in enumerate(
            [
                ("variance", "variance of one estimate"),
                ("variance_x_evaluations", "variance x evals"),
            ]
        ):
            ax = axes[i, j]
            scale = np.array(
                [1.0 if key == "variance" else (r["evaluations"] or np.nan) for r in rows]
            )
            vals = np.array([r["variance"] for r in rows]) * scale
            se = np.array([r["variance_se"] for r in rows]) * scale
            positive = vals[vals > 0]
            floor = positive.min() / 20 if positive.size else 1e-12
            nz = vals > 0
            ax.bar(x[nz], vals[nz] - floor, bottom=floor, color=np.asarray(colors)[nz], alpha=0.85)
            ax.errorbar(
                x[nz],
                vals[nz],
                yerr=np.minimum(2 * se[nz], vals[nz] * 0.999),
                fmt="none",
                ecolor="0.2",
                capsize=3,
            )
            for k, r in enumerate(rows):
                ev = r.get("exact_variance")
                if ev is not None and ev * scale[k] > floor:
                    ax.plot([k - 0.4, k + 0.4], [ev * scale[k]] * 2, color="k", lw=2)
                if vals[k] == 0:
                    ax.annotate("0", (k, floor), ha="center", va="bottom", fontsize=11)
            ax.set_ylim(bottom=floor)
            ax.set_xlim(-0.6, len(rows) - 0.4)
            ax.set_yscale("log")
            ax.set_xticks(x)
            biased = [bool(r.get("bias_detected")) for r in rows]
            ticks = ax.set_xticklabels(
                [f"{lab} (biased)" if b else lab for lab, b in zip(labels, biased)],
                rotation=35, ha="right", fontsize=8,
            )
            for tick, b in zip(ticks, biased):
                if b:
                    tick.set_color("tab:red")
            if j == 0:
                ax.set_ylabel(ylabel)
            if i == 0:
                ax.set_title(setting["label"], fontsize=10)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="0.2", marker="|", ls="none", ms=10,
                      label="Monte Carlo, +-2 s.e."),
               Line2D([], [], color="k", lw=2, label="exact variance")]
    # below the columns, where it hides no bar
    fig.legend(handles=handles, fontsize=8, loc="lower center", ncol=2, frameon=False)
    if title:
        # wrapped to the figure's width (about 13 characters per inch at this size)
        fig.suptitle(textwrap.fill(title, int(13 * width)), fontsize=10)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return save_figure(fig, path)


def plot_toy_curves(runs: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Probability of the right answer (top) and variance vs squared exact gradient (bottom),
    one column per ``p0``; shaded bands are +-1 standard error over seeds."""
    plt = pyplot()
    n = len(runs)
    fig, axes = plt.subplots(2, n, figsize=(3.6 * n + 1, 6.5), squeeze=False)
    labels = list(runs[0]["estimators"])
    colors = _colors(labels)
    for j, run in enumerate(runs):
        prob = run["problem"]
        for label, c in run["estimators"].items():
            steps = np.asarray(c["steps"])
            m, s = np.asarray(c["prob_right_mean"]), np.asarray(c["prob_right_se"])
            ax = axes[0, j]
            ax.plot(steps, m, color=colors[label], label=label, lw=1.3)
            ax.fill_between(steps, m - s, m + s, color=colors[label], alpha=0.2, lw=0)
            vs = np.asarray(c["variance_steps"])
            v = np.asarray(c["variance_mean"], dtype=float)
            if np.any(v > 0):
                axes[1, j].plot(
                    vs, np.where(v > 0, v, np.nan), color=colors[label], lw=1.3, marker=".", ms=3
                )
        first = next(iter(run["estimators"].values()))
        axes[1, j].plot(
            first["variance_steps"],
            first["exact_grad_sq"],
            "k--",
            lw=1,
            label="exact grad$^2$ (" + labels[0] + ")",
        )
        axes[0, j].set_title(f"p0={prob['p0']}, D={prob['dim']}, {prob['mode']}", fontsize=10)
        axes[0, j].set_ylim(-0.02, 1.02)
        axes[1, j].set_yscale("log")
        axes[1, j].set_xlabel("step")
    axes[0, 0].set_ylabel("P(right answer)")
    axes[1, 0].set_ylabel("gradient variance (mean per unit)")
    axes[0, -1].legend(fontsize=7, loc="best")
    axes[1, -1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_curves(
    curves: Mapping[str, Sequence[Mapping[str, Sequence[float]]]],
    path: Path,
    x_key: str,
    y_key: str,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logy: bool = False,
    hline: float | None = None,
    hline_label: str = "",
) -> Path:
    """Mean +- standard error over runs of ``y_key`` vs ``x_key``, one line per label."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    colors = _colors(list(curves))
    for label, runs in curves.items():
        x = np.asarray(runs[0][x_key])
        ys = np.asarray([r[y_key] for r in runs], dtype=float)
        m = ys.mean(0)
        ax.plot(x, m, color=colors[label], label=f"{label} (n={len(runs)})", lw=1.3)
        if len(runs) > 1:
            s = ys.std(0, ddof=1) / np.sqrt(len(runs))
            ax.fill_between(x, m - s, m + s, color=colors[label], alpha=0.25, lw=0)
    if hline is not None:
        ax.axhline(hline, color="k", ls="--", lw=1, label=hline_label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_basket(
    basket: Mapping[Any, Mapping[str, Mapping[str, Any]]],
    path: Path,
    title: str = "",
    reference: str | None = "disarm",
) -> Path:
    """Gradient-basket variance, variance x evaluations and (when ``reference`` is one of
    the estimators) variance x evaluations relative to ``reference`` for the estimators
    within a factor 5 of it (linear axis), vs training step."""
    plt = pyplot()
    steps = sorted(basket, key=int)
    labels = list(basket[steps[0]])
    colors = _colors(labels)
    ref = reference if reference in labels else None
    fig, axes = plt.subplots(1, 3 if ref else 2, figsize=(16 if ref else 11, 4.2))
    x = [int(s) for s in steps]
    for label in labels:
        v = np.array([basket[s][label]["variance"] for s in steps])
        ve = np.array([basket[s][label]["variance_x_evaluations"] for s in steps])
        axes[0].plot(x, v, marker="o", ms=3, color=colors[label], label=label)
        axes[1].plot(x, ve, marker="o", ms=3, color=colors[label], label=label)
        if ref:
            r = np.array([basket[s][ref]["variance_x_evaluations"] for s in steps])
            if np.all((ve / r > 0.2) & (ve / r < 5)):  # comparable estimators only
                axes[2].plot(x, ve / r, marker="o", ms=3, color=colors[label], label=label)
    ylabels = ["variance (mean over encoder params)", "variance x evaluations"]
    for ax, yl in zip(axes, ylabels):
        ax.set_yscale("log")
        ax.set_xlabel("training step of the shared trajectory")
        ax.set_ylabel(yl)
    axes[1].legend(fontsize=8)
    if ref:
        axes[2].axhline(1.0, color="k", lw=0.8, ls="--")
        axes[2].set_xlabel("training step of the shared trajectory")
        axes[2].set_ylabel(f"variance x evaluations / {ref}'s")
        axes[2].set_title("estimators within 5x of the reference", fontsize=10)
        axes[2].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
