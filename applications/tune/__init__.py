"""Optuna studies of the pruning-rate vs accuracy trade-off (``binopt tune``).

Needs the ``tune`` extra (optuna, matplotlib, plotly), installed from the binopt checkout
with ``pip install -e '.[tune]'``. Importing this package does not import optuna; the names
below load on first use:

- :class:`~applications.tune.space.SearchSpace`, :class:`~applications.tune.space.FloatRange`
- :class:`~applications.tune.study.TuneSettings`, :func:`~applications.tune.study.run_study`,
  :func:`~applications.tune.study.run_worker`, :func:`~applications.tune.study.open_study`
- :func:`~applications.tune.report.write_report`,
  :func:`~applications.tune.report.build_report`,
  :func:`~applications.tune.report.pareto_front`
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SearchSpace": "space",
    "FloatRange": "space",
    "TuneSettings": "study",
    "run_study": "study",
    "run_worker": "study",
    "open_study": "study",
    "resolve_storage": "study",
    "write_report": "report",
    "build_report": "report",
    "pareto_front": "report",
    "set_reference": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
