"""The search space of a tuning study: what optuna samples and what the user fixed.

Every part of the space can be searched or fixed from the command line with one syntax:

- a number (``--lr 1e-3``) fixes a float parameter;
- ``LOW:HIGH`` (``--lam 1e-3:1``) searches it, on a log scale for ``lam``, ``lr`` and
  ``gate_lr`` and on a linear scale for ``k`` and ``init_drop_rate``;
- a comma list (``--estimator arm,disarm``) searches a categorical parameter; a single
  name fixes it.

:meth:`SearchSpace.suggest` turns one optuna trial into the keyword arguments of
:class:`applications.sparsify.train.TrainConfig` that the trial varies. Fixed parts are not
optuna parameters (they never appear in ``trial.params``) but are always in the returned
dict, so the full configuration of each trial is recorded.

This module does not import optuna, so the command line can describe the space without it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import optuna

#: Estimators that make sense for network pruning (``exact`` enumerates 2^D states).
EXCLUDED_ESTIMATORS = frozenset({"exact"})
#: Parameterizations the issue asks for; ``sigmoid`` is ``scaled_sigmoid`` with ``k = 1``.
DEFAULT_PARAMETERIZATIONS = ("scaled_sigmoid", "hard_sigmoid")
DEFAULT_ESTIMATORS = ("arm", "disarm", "hard_concrete")
#: Estimators whose gate parameters are always ``log a`` (no parameterization, no ``k``):
#: for them ``parameterization`` and ``k`` are not sampled (conditional parameters).
RELAXED_PARAMETERIZATION = frozenset({"hard_concrete"})


@dataclass(frozen=True)
class FloatRange:
    """A float parameter: fixed when ``low == high``, else searched in ``[low, high]``.

    Parameters
    ----------
    low, high : float
        Bounds, ``low <= high``.
    log : bool
        Sample on a log scale (both bounds must then be positive).
    """

    low: float
    high: float
    log: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"bounds must be finite; got {self.low}:{self.high}")
        if self.low > self.high:
            raise ValueError(f"low must not exceed high; got {self.low}:{self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale range needs positive bounds; got {self.low}:{self.high}")

    @property
    def fixed(self) -> bool:
        """``True`` when the parameter is not searched."""
        return self.low == self.high

    def suggest(self, trial: optuna.trial.Trial, name: str) -> float:
        """The fixed value, or ``trial.suggest_float(name, low, high, log=log)``."""
        if self.fixed:
            return float(self.low)
        return float(trial.suggest_float(name, self.low, self.high, log=self.log))

    def describe(self) -> str:
        """``"0.1"`` or ``"0.001:1 (log)"``."""
        if self.fixed:
            return f"{self.low:g}"
        return f"{self.low:g}:{self.high:g}" + (" (log)" if self.log else "")


def _expected_float_spec(
    low: float | None, high: float | None, exclusive: bool, log: bool
) -> str:
    """What a float option accepts, in words: ``"a number >= 0 or a range LOW:HIGH with
    0 < LOW <= HIGH (log scale)"``."""
    le = "<" if exclusive else "<="
    if low is None and high is None:
        single = "a number"
    elif high is None:
        single = f"a number {'>' if exclusive else '>='} {low:g}"
    elif low is None:
        single = f"a number {le} {high:g}"
    else:
        brackets = "()" if exclusive else "[]"
        single = f"a number in {brackets[0]}{low:g}, {high:g}{brackets[1]}"
    range_low, range_le = low, le
    if log and (low is None or low <= 0):
        # a log-scale range cannot start at (or below) zero even where a fixed zero is fine
        range_low, range_le = 0.0, "<"
    left = "" if range_low is None else f"{range_low:g} {range_le} "
    right = "" if high is None else f" {le} {high:g}"
    return (f"{single} or a range LOW:HIGH with {left}LOW <= HIGH{right}"
            + (" (log scale)" if log else ""))


def parse_float_spec(
    text: str | float,
    *,
    log: bool,
    name: str,
    low: float | None = None,
    high: float | None = None,
    exclusive: bool = False,
) -> FloatRange:
    """Parse ``"V"`` (fixed) or ``"LOW:HIGH"`` (searched).

    Parameters
    ----------
    text : str or float
        The command-line value.
    log : bool
        Scale of a searched range (its ``LOW`` must then be positive).
    name : str
        Option name without the dashes, for error messages.
    low, high : float, optional
        Admissible interval that every bound must lie in.
    exclusive : bool
        ``low`` and ``high`` themselves are excluded (default: included).

    Raises
    ------
    ValueError
        On a malformed value, a bound outside the interval, ``LOW > HIGH`` or a log-scale
        range with ``LOW <= 0``. The message names the option, says what it takes and
        repeats the value given, e.g. ``--lam takes a number >= 0 or a range LOW:HIGH with
        0 < LOW <= HIGH (log scale); got '-1'``.
    """
    problem = ValueError(
        f"--{name} takes {_expected_float_spec(low, high, exclusive, log)}; got {text!r}"
    )
    if isinstance(text, int | float):
        parts = [float(text)]
    else:
        raw = str(text).strip().split(":")
        if len(raw) not in (1, 2) or any(not p.strip() for p in raw):
            raise problem
        try:
            parts = [float(p) for p in raw]
        except ValueError:
            raise problem from None
    for v in parts:
        if not math.isfinite(v):
            raise problem
        if low is not None and (v <= low if exclusive else v < low):
            raise problem
        if high is not None and (v >= high if exclusive else v > high):
            raise problem
    lo, hi = parts[0], parts[-1]
    if lo > hi or (log and lo != hi and lo <= 0):
        raise problem
    try:
        return FloatRange(lo, hi, log=log and lo != hi)
    except ValueError as exc:  # pragma: no cover - the checks above cover FloatRange's
        raise ValueError(f"--{name}: {exc}") from None


def parse_choices(
    text: str | Sequence[str], *, name: str, allowed: Sequence[str]
) -> tuple[str, ...]:
    """Parse a comma list of names (one name fixes the parameter).

    Raises
    ------
    ValueError
        On an empty list or a name not in ``allowed``.
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    names = tuple(dict.fromkeys(s.strip().lower().replace("-", "_") for s in items if s.strip()))
    if not names:
        raise ValueError(f"--{name} needs at least one value")
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(
            f"--{name}: unknown value(s) {', '.join(unknown)}; choose from {', '.join(allowed)}"
        )
    return names


def _suggest_choice(trial: optuna.trial.Trial, name: str, choices: tuple[str, ...]) -> str:
    if len(choices) == 1:
        return choices[0]
    return str(trial.suggest_categorical(name, list(choices)))


@dataclass(frozen=True)
class SearchSpace:
    """What a study searches over; every part can be fixed.

    Parameters
    ----------
    lam : FloatRange
        L0 strength ``lambda`` (log scale).
    lam_per_layer : bool
        One ``lambda`` per gated layer (optuna parameters ``lam[<layer>]``) instead of one
        global ``lam``.
    parameterization : tuple of str
        Gate parameterizations to choose from (``scaled_sigmoid``, ``hard_sigmoid``).
    k : FloatRange
        Slope of the gate function (``sigmoid(k phi)`` or ``hardsigmoid(k phi)``).
        Parameterization and ``k`` are conditional: hard concrete has neither.
    estimator : tuple of str
        Gradient estimators to choose from.
    init_drop_rate : FloatRange
        Initial probability that a gate is off (one value for every layer).
    lr : FloatRange
        Adam learning rate of the weights (log scale).
    gate_lr : FloatRange
        Learning rate of the gate parameters (``phi`` or ``log a``; log scale). The gates
        usually need a larger step than the weights to settle within a short budget.
    """

    lam: FloatRange = field(default_factory=lambda: FloatRange(1e-3, 1.0, log=True))
    lam_per_layer: bool = False
    parameterization: tuple[str, ...] = DEFAULT_PARAMETERIZATIONS
    k: FloatRange = field(default_factory=lambda: FloatRange(2.0, 10.0))
    estimator: tuple[str, ...] = DEFAULT_ESTIMATORS
    init_drop_rate: FloatRange = field(default_factory=lambda: FloatRange(0.05, 0.6))
    lr: FloatRange = field(default_factory=lambda: FloatRange(3e-4, 3e-3, log=True))
    gate_lr: FloatRange = field(default_factory=lambda: FloatRange(3e-3, 3e-2, log=True))

    def __post_init__(self) -> None:
        if not self.parameterization or not self.estimator:
            raise ValueError("parameterization and estimator need at least one choice")
        bad = set(self.estimator) & EXCLUDED_ESTIMATORS
        if bad:
            raise ValueError(f"estimator(s) {sorted(bad)} cannot train a network")
        if not (0.0 < self.init_drop_rate.low and self.init_drop_rate.high < 1.0):
            raise ValueError("init_drop_rate must lie strictly between 0 and 1")
        if self.lr.low <= 0 or self.gate_lr.low <= 0 or self.k.low <= 0 or self.lam.low < 0:
            raise ValueError("lr, gate_lr and k must be positive and lam non-negative")

    def suggest(
        self, trial: optuna.trial.Trial, layer_names: Sequence[str] | None = None
    ) -> dict[str, Any]:
        """Sample one configuration.

        Parameters
        ----------
        trial : optuna.trial.Trial
        layer_names : sequence of str, optional
            Gated layer names; required when ``lam_per_layer``.

        Returns
        -------
        dict
            ``lam`` (float or dict layer -> float), ``estimator``, ``parameterization``
            and ``k`` (not for hard concrete, whose gates are parameterized by ``log a``),
            ``init_drop_rate``, ``lr``, ``gate_lr``: keyword arguments of ``TrainConfig``.
        """
        out: dict[str, Any] = {}
        if self.lam_per_layer:
            if not layer_names:
                raise ValueError("lam_per_layer needs the gated layer names")
            out["lam"] = {n: self.lam.suggest(trial, f"lam[{n}]") for n in layer_names}
        else:
            out["lam"] = self.lam.suggest(trial, "lam")
        out["estimator"] = _suggest_choice(trial, "estimator", self.estimator)
        if out["estimator"] not in RELAXED_PARAMETERIZATION:
            out["parameterization"] = _suggest_choice(
                trial, "parameterization", self.parameterization
            )
            out["k"] = self.k.suggest(trial, "k")
        out["init_drop_rate"] = self.init_drop_rate.suggest(trial, "init_drop_rate")
        out["lr"] = self.lr.suggest(trial, "lr")
        out["gate_lr"] = self.gate_lr.suggest(trial, "gate_lr")
        return out

    def describe(self) -> dict[str, str]:
        """Human-readable summary, one entry per part (``"fixed"`` parts show one value)."""
        return {
            "lam": self.lam.describe() + (" per layer" if self.lam_per_layer else ""),
            "estimator": ",".join(self.estimator),
            "parameterization": ",".join(self.parameterization),
            "k": self.k.describe(),
            "init_drop_rate": self.init_drop_rate.describe(),
            "lr": self.lr.describe(),
            "gate_lr": self.gate_lr.describe(),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (inverse: :meth:`from_dict`)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SearchSpace:
        """Rebuild a space from :meth:`to_dict`."""
        kw: dict[str, Any] = dict(data)
        for key in ("lam", "k", "init_drop_rate", "lr", "gate_lr"):
            if key in kw and isinstance(kw[key], Mapping):
                kw[key] = FloatRange(**kw[key])
        for key in ("parameterization", "estimator"):
            if key in kw:
                kw[key] = tuple(kw[key])
        return cls(**kw)
