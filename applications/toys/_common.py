"""Helpers shared by the toy problems: estimator specs, moments, progress bars, JSON output."""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import shlex
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import binopt

from ..atomic_files import atomic_write  # noqa: F401  (re-exported for plotting)
from ..errors import UserError


# ----------------------------------------------------------------------------- estimators
@dataclass(frozen=True)
class EstimatorSpec:
    """An estimator named on the command line: ``name`` or ``name:key=value:key=value``.

    Attributes
    ----------
    label : str
        The text the user wrote (used as the row label in tables and plots).
    name : str
        Registry name passed to :func:`binopt.get_estimator`.
    options : dict
        Keyword options for the estimator's constructor.
    """

    label: str
    name: str
    options: tuple[tuple[str, Any], ...] = ()

    def build(self, generator: torch.Generator | None = None) -> binopt.Estimator:
        """Instantiate the estimator (with its own random generator)."""
        try:
            return binopt.get_estimator(self.name, generator=generator, **dict(self.options))
        except (TypeError, ValueError) as exc:
            raise UserError(f"cannot build estimator {self.label!r}: {exc}") from exc


def parse_estimator_spec(text: str) -> EstimatorSpec:
    """Parse ``name[:key=value...]``, e.g. ``reinforce_loo:num_samples=4``.

    Raises
    ------
    UserError
        Unknown estimator names or malformed options.
    """
    text = text.strip()
    if not text:
        raise UserError("empty estimator name")
    name, *opts = text.split(":")
    options: dict[str, Any] = {}
    for opt in opts:
        if "=" not in opt:
            raise UserError(f"estimator option {opt!r} in {text!r} must look like key=value")
        key, value = opt.split("=", 1)
        try:
            options[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = value.strip()
    spec = EstimatorSpec(label=text, name=name.strip(), options=tuple(sorted(options.items())))
    spec.build()  # validate now: unknown names and bad options are user errors
    return spec


def parse_estimator_list(text: str | Sequence[str]) -> list[EstimatorSpec]:
    """Comma-separated (or already split) estimator specs, duplicates rejected."""
    items = text.split(",") if isinstance(text, str) else [t for s in text for t in s.split(",")]
    specs = [parse_estimator_spec(t) for t in items if t.strip()]
    if not specs:
        raise UserError("no estimator given")
    dup = duplicated([s.label for s in specs])
    if dup:
        raise UserError(f"estimator listed twice: {', '.join(dup)}")
    return specs


#: What ``--import`` says in ``--help``.
IMPORT_HELP = (
    "import this module first, for the estimators it registers with "
    "binopt.register_estimator: a dotted name importable from the current folder or "
    "PYTHONPATH, or the path of a .py file (repeatable)"
)


def add_import_option(parser: argparse.ArgumentParser) -> None:
    """``--import MODULE_OR_FILE`` (repeatable, into ``args.imports``): see
    :func:`import_modules`."""
    parser.add_argument("--import", dest="imports", action="extend", nargs="+", default=None,
                        metavar="MODULE_OR_FILE", help=IMPORT_HELP)


def duplicated(labels: Sequence[str]) -> list[str]:
    """The labels listed more than once, sorted."""
    return sorted({x for x in labels if labels.count(x) > 1})
_UNKNOWN_HINT = (
    "; an estimator of your own becomes available once its module, which registers it with "
    "binopt.register_estimator, is loaded with --import MODULE_OR_FILE"
)


def import_modules(modules: Sequence[str] | None, option: str = "--import") -> list[str]:
    """Import user modules for their side effects (registering estimators), in order.

    Parameters
    ----------
    modules : sequence of str, optional
        Dotted module names, importable from the current folder (as with ``python -m``) or
        ``sys.path``, or paths of ``.py`` files (anything ending in ``.py`` or containing a
        path separator).
    option : str
        The option named in error messages.

    Returns
    -------
    list of str
        The names the modules were imported under.

    Raises
    ------
    UserError
        A file that does not exist or a module that cannot be found. Errors raised while
        the module runs propagate with their traceback: they are bugs in the module.
    """
    import importlib
    import importlib.util

    names = []
    for text in modules or ():
        text = text.strip()
        if not text:
            raise UserError(f"{option} needs a module name or the path of a .py file; got ''")
        if text.endswith(".py") or os.sep in text or "/" in text:
            path = Path(text).expanduser()
            if not path.is_file():
                raise UserError(f"{option} {text}: no such file")
            name = path.stem
            loaded = sys.modules.get(name)
            if loaded is not None and Path(getattr(loaded, "__file__", "") or "") != path.resolve():
                raise UserError(
                    f"{option} {text}: a module named {name!r} is already imported from "
                    f"{getattr(loaded, '__file__', None) or 'elsewhere'}; rename the file"
                )
            if loaded is None:
                spec = importlib.util.spec_from_file_location(name, path.resolve())
                if spec is None or spec.loader is None:
                    raise UserError(f"{option} {text}: not a loadable Python file")
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[name]
                    raise
            names.append(name)
            continue
        # like ``python -m``: the current folder first, for the time of the import
        cwd = os.getcwd()
        added = cwd not in sys.path
        if added:
            sys.path.insert(0, cwd)
        try:
            importlib.import_module(text)
        except ModuleNotFoundError as exc:
            parts = text.split(".")
            if exc.name not in {".".join(parts[: k + 1]) for k in range(len(parts))}:
                raise  # a module that the user's module imports: a bug there, with traceback
            raise UserError(
                f"{option} {text}: no module named {exc.name!r} in the current folder or on "
                "PYTHONPATH (give a dotted module name or the path of a .py file)"
            ) from None
        finally:
            if added and sys.path and sys.path[0] == cwd:
                del sys.path[0]
        names.append(text)
    return names


def parse_cli_estimators(text: str, option: str = "--estimators",
                         single: bool = False) -> list[EstimatorSpec]:
    """:func:`parse_estimator_list` (or, with ``single``, :func:`parse_estimator_spec`) for
    a command line: messages name ``option``, and an unknown name says how to make an
    estimator of one's own known (``--import``)."""
    try:
        return [parse_estimator_spec(text)] if single else parse_estimator_list(text)
    except UserError as exc:
        if "unknown estimator" in str(exc):
            raise UserError(f"{option}: {exc}{_UNKNOWN_HINT}") from None
        raise


# ----------------------------------------------------------------------------- moments
class MomentAccumulator:
    """Per-coordinate mean, variance and the standard errors of both, from chunks of estimates.

    Power sums up to the fourth are accumulated in float64 around a shift (the first
    chunk's mean) to limit cancellation. The standard error of the sample variance uses the
    fourth central moment, ``Var(s^2) = (m4 - s^4 (n - 3) / (n - 1)) / n``, floored at its
    smallest possible value ``2 s^4 / (n (n - 1))`` (reached when ``m4 = s^4``).

    Parameters
    ----------
    groups : int, optional
        With ``num_estimates``, also keep the first two power sums of ``groups`` contiguous
        groups of estimates, for :meth:`mean_variance_se`.
    num_estimates : int, optional
        How many estimates will be added in all (sizes the groups).
    """

    def __init__(self, groups: int | None = None, num_estimates: int | None = None) -> None:
        self.n = 0
        self.shift: torch.Tensor | None = None
        self.sums: list[torch.Tensor] = []
        self.group_size = None
        if groups is not None:
            if num_estimates is None or groups < 2 or num_estimates < 2 * groups:
                raise ValueError(
                    "groups needs num_estimates >= 2 * groups >= 4; got groups="
                    f"{groups}, num_estimates={num_estimates}"
                )
            self.group_size = math.ceil(num_estimates / groups)
        self.group_sums: list[list] = []  # [rows, sum y, sum y^2] per group

    def update(self, chunk: torch.Tensor) -> None:
        """Add estimates of shape ``(n, D)``."""
        x = chunk.detach().to(torch.float64).reshape(chunk.shape[0], -1)
        if self.shift is None:
            self.shift = x.mean(0)
            self.sums = [torch.zeros_like(self.shift) for _ in range(4)]
        y = x - self.shift
        p = torch.ones_like(y)
        for k in range(4):
            p = p * y
            self.sums[k] += p.sum(0)
        self.n += x.shape[0]
        if self.group_size is not None:
            self._add_to_groups(y)

    def _add_to_groups(self, y: torch.Tensor) -> None:
        start = 0
        while start < y.shape[0]:
            if not self.group_sums or self.group_sums[-1][0] == self.group_size:
                self.group_sums.append([0, torch.zeros_like(y[0]), torch.zeros_like(y[0])])
            group = self.group_sums[-1]
            take = y[start : start + self.group_size - group[0]]
            group[0] += take.shape[0]
            group[1] += take.sum(0)
            group[2] += (take * take).sum(0)
            start += take.shape[0]

    def result(self) -> dict[str, torch.Tensor]:
        """``mean``, ``variance`` (unbiased), ``mean_se`` and ``variance_se``, each ``(D,)``."""
        if self.n < 2 or self.shift is None:
            raise ValueError("need at least 2 estimates for a variance")
        n = self.n
        r1, r2, r3, r4 = (s / n for s in self.sums)
        mu = r1
        m2 = (r2 - mu**2).clamp_min(0)
        m4 = (r4 - 4 * mu * r3 + 6 * mu**2 * r2 - 3 * mu**4).clamp_min(0)
        var = m2 * n / (n - 1)
        var_of_var = (m4 - var**2 * (n - 3) / (n - 1)) / n
        # Since mu4 >= sigma^4, Var(s^2) >= 2 sigma^4 / (n (n - 1)); the plug-in above can
        # fall far below that (two-point distributions, where mu4 = sigma^4).
        var_of_var = torch.maximum(var_of_var, 2 * var**2 / (n * (n - 1)))
        return {
            "mean": mu + self.shift,
            "variance": var,
            "mean_se": (var / n).sqrt(),
            "variance_se": var_of_var.sqrt(),
        }

    def mean_variance_se(self) -> float:
        """Standard error of the variance averaged over coordinates, ``mean_k s_k^2``.

        The per-coordinate standard errors cannot be combined as if the coordinates were
        independent: the gradients of a network's parameters are strongly correlated (on
        the VAE, ``sqrt(sum se_k^2) / D`` came out about 3x too small). This is the
        delete-one-group jackknife over the groups set at construction, which needs no
        assumption about the correlations: ``SE^2 = (G - 1) / G sum_g (t_(-g) - t_bar)^2``
        with ``t_(-g)`` the statistic without group ``g``.
        """
        if self.group_size is None:
            raise ValueError("mean_variance_se needs groups= and num_estimates= at construction")
        if len(self.group_sums) < 2:
            raise ValueError(f"need at least 2 groups of estimates; got {len(self.group_sums)}")
        s1, s2 = self.sums[0], self.sums[1]
        leave_out = []
        for rows, g1, g2 in self.group_sums:
            n = self.n - rows
            a1, a2 = s1 - g1, s2 - g2
            leave_out.append(float(((a2 - a1 * a1 / n) / (n - 1)).clamp_min(0).mean()))
        t = torch.tensor(leave_out, dtype=torch.float64)
        g = len(leave_out)
        return float(((g - 1) / g * ((t - t.mean()) ** 2).sum()).sqrt())


def check_at_least(minimum: int, **values: int) -> None:
    """Raise ``ValueError`` naming the first argument below ``minimum``."""
    for name, value in values.items():
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}; got {value}")


def check_learning_rate(lr: float) -> None:
    """Raise ``ValueError`` unless ``lr`` is a finite number > 0 (NaN fails ``lr <= 0``)."""
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a finite number > 0; got {lr}")


def check_stateless(est: binopt.Estimator, label: str) -> None:
    """Refuse an estimator that changes with every estimate (REINFORCE with a moving-average
    baseline) where many estimates are measured at one point: they would not be identically
    distributed, or (through ``grad``, which leaves the baseline alone) the baseline would
    silently be ignored."""
    if getattr(est, "baseline", None) == "moving_average":
        raise UserError(
            f"{label}: a moving-average baseline changes with every estimate, so variance "
            "measurements at one point are not defined for it; measure 'reinforce' (no "
            "baseline) or 'reinforce_loo' instead"
        )


def jackknife_groups(num_estimates: int) -> int | None:
    """Groups for :meth:`MomentAccumulator.mean_variance_se`: up to 20, at least 2 estimates
    each (``None`` below 4 estimates: no standard error then)."""
    groups = min(20, num_estimates // 2)
    return groups if groups >= 2 else None


def z_score(diff: float, se: float, atol: float = 1e-12) -> float:
    """``diff / se``; 0 when both are at rounding level, ``inf`` when only ``se`` is."""
    if se > 0:
        return diff / se
    return 0.0 if abs(diff) <= atol else math.copysign(math.inf, diff)


# ----------------------------------------------------------------------------- output
def progress(iterable: Iterable, desc: str, total: int | None = None, enabled: bool | None = None):
    """A tqdm progress bar, shown only when stderr is a terminal (or when ``enabled``)."""
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(iterable, desc=desc, total=total, disable=not show, leave=False, dynamic_ncols=True)


def command_line(prog: str, args: Any, parser: Any) -> str:
    """The full command equivalent to the parsed ``args`` (every option spelled out).

    Rebuilt from the namespace rather than ``sys.argv`` so that it is right however the
    command was invoked (``binopt``, ``python -m applications.cli`` or ``main([...])``).
    """
    parts = [prog]
    for action in parser._actions:  # argparse keeps no public list of its actions
        if not action.option_strings or action.dest in ("help",):
            continue
        value = getattr(args, action.dest, None)
        opt = action.option_strings[-1]
        if action.nargs == 0:  # store_true / store_false
            if value != action.default:
                parts.append(opt)
        elif value is None:
            continue
        elif isinstance(value, (list, tuple)):
            parts += [opt, *(shlex.quote(str(v)) for v in value)]
        else:
            parts += [opt, shlex.quote(str(value))]
    return " ".join(parts)


def environment() -> dict[str, Any]:
    """Versions and machine facts recorded next to benchmark results."""
    import os
    import platform

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def default_results_dir(root: Path) -> str:
    """``benchmarks/results`` relative to the working directory when possible."""
    import os

    target = Path(root) / "benchmarks" / "results"
    try:
        return os.path.relpath(target)
    except ValueError:  # another drive on Windows
        return str(target)


def to_jsonable(obj: Any, digits: int | None = None) -> Any:
    """Tensors and arrays to lists, non-finite floats to strings, recursively.

    ``digits`` rounds floats to that many significant digits (smaller files).
    """
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist(), digits)
    if isinstance(obj, (np.floating, np.integer)):
        return to_jsonable(obj.item(), digits)
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return str(obj)
        return obj if digits is None else float(f"{obj:.{digits}g}")
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, digits) for v in obj]
    return obj


def write_json(path: Path, payload: dict[str, Any], digits: int | None = 7) -> Path:
    """Write ``payload`` as indented JSON (creating parent folders), floats rounded to
    ``digits`` significant digits (``None``: full precision).

    The file is replaced atomically (:func:`atomic_write`): an interrupted write leaves the
    previous version, never a truncated file.
    """
    text = dumps_compact(to_jsonable(payload, digits)) + "\n"
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def check_stem(stem: str, option: str = "--name") -> str:
    """``stem`` if it is a usable file name stem, else a :class:`UserError` naming ``option``.

    Refused: the empty name (``--name ""`` wrote ``.json`` and ``.png.png``), ``.`` and
    ``..``, and names with a path separator (outputs go in the output folder).
    """
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    if stem in ("", ".", "..") or any(s in stem for s in seps) or "\0" in stem:
        raise UserError(
            f"{option} must be a file name stem (not empty, no '/'); got {stem!r}"
        )
    return stem


def prepare_output(folder: str | Path, stem: str, suffixes: Sequence[str]) -> list[Path]:
    """Check, before any computing, that ``folder/stem<suffix>`` can be written for each suffix.

    Creates the folder (:func:`output_dir`), checks the stem (:func:`check_stem`), that the
    folder accepts new files (by creating and removing a temporary one) and that no output
    path is an existing folder.

    Returns
    -------
    list of Path
        The output paths, in the order of ``suffixes``.

    Raises
    ------
    UserError
        Saying which check failed.
    """
    check_stem(stem)
    if not str(folder).strip():  # Path("") is the working folder: say so rather than guess
        raise UserError(f"--out must be a folder (use . for this one); got {str(folder)!r}")
    out = output_dir(folder)
    try:
        with tempfile.TemporaryFile(dir=out, prefix=".binopt-write-check-"):
            pass
    except OSError as exc:
        raise UserError(f"cannot write to output folder {str(out)!r}: {exc.strerror}") from exc
    paths = [out / f"{stem}{suffix}" for suffix in suffixes]
    for path in paths:
        if path.is_dir():
            raise UserError(f"output {str(path)!r} is a folder; choose another --name or --out")
    return paths


def dumps_compact(obj: Any, indent: int = 1, level: int = 0) -> str:
    """JSON with nested containers indented but lists of scalars kept on one line."""
    pad, inner = " " * (indent * level), " " * (indent * (level + 1))
    if isinstance(obj, dict):
        if not obj:
            return "{}"
        items = [
            f"{inner}{json.dumps(str(k))}: {dumps_compact(v, indent, level + 1)}"
            for k, v in obj.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list):
        if all(not isinstance(v, (dict, list)) for v in obj):
            return json.dumps(obj)
        items = [f"{inner}{dumps_compact(v, indent, level + 1)}" for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj)


def output_dir(path: str | Path) -> Path:
    """Create the output folder or raise a :class:`UserError` saying why it cannot be."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output folder {str(out)!r}: {exc.strerror}") from exc
    return out


def pyplot():
    """``matplotlib.pyplot`` with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Right-aligned plain-text table (first column left-aligned)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [
            str(c).ljust(w) if i == 0 else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(r, widths))
        ]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(x: float | None, digits: int = 4) -> str:
    """Compact float formatting; ``n/a`` for missing values."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    ax = abs(x)
    if 1e-3 <= ax < 1e5:
        return f"{x:.{digits}g}"
    return f"{x:.{digits - 1}e}"


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean of ``values`` (``nan`` for fewer than two)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        return float("nan")
    return float(v.std(ddof=1) / math.sqrt(v.size))
