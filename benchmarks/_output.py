"""Default output names of the benchmark scripts (one rule for all of them).

A run with the default settings writes the committed result ``RESULTS/<stem>.json``; a run
with other settings writes ``RESULTS/<stem>_<settings>.json``, ``<settings>`` naming the
settings that differ from the defaults, so that it never overwrites the committed result
unless ``--out`` names it. ``--smoke``/``--quick`` runs are named by their scripts
(``<stem>_smoke.json``, ``<stem>_quick.json``: ignored by git). Scripts that write several
files, or take a folder rather than a file, put the name part from :func:`settings_stem`
(``<stem>`` or ``<stem>_<settings>``) in front of each file's own ending.

The scripts import this as ``benchmarks._output`` after putting the repository root on
``sys.path``, which works both when they run as ``python benchmarks/x.py`` and when tests
load them from their file (``load_benchmark`` in ``tests/conftest.py``).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

#: The folder of the committed results.
RESULTS = Path(__file__).resolve().parent / "results"

#: The longest ``<settings>`` part of a name (longer ones are cut).
MAX_SLUG = 80


def settings_slug(changed: Mapping[str, Any]) -> str:
    """``key-value`` pairs joined by ``_``, sorted by key: lists and tuples joined by ``+``,
    ``True`` as the bare key (a flag), characters outside ``[A-Za-z0-9.+-]`` replaced by
    ``_``, cut to :data:`MAX_SLUG` characters.

    >>> settings_slug({"threads": 2, "models": ["mlp"], "no_fused": True})
    'models-mlp_no_fused_threads-2'
    """
    parts = []
    for key, value in sorted(changed.items()):
        if isinstance(value, (list, tuple)):
            value = "+".join(map(str, value))
        parts.append(key if value is True else f"{key}-{value}")
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", "_".join(parts)).strip("_")[:MAX_SLUG]


def changed_settings(args: argparse.Namespace | Mapping[str, Any],
                     parser: argparse.ArgumentParser, ignore: Iterable[str] = (),
                     defaults: Mapping[str, Any] | None = None,
                     base_argv: Sequence[str] = ()) -> dict[str, Any]:
    """The settings of ``args`` that differ from the parser's defaults (``defaults``
    updates those), leaving out ``out``, the keys in ``ignore`` and keys the parser does
    not define. The parser's defaults are those of ``parser.parse_args(base_argv)``: give
    ``base_argv`` the positional arguments a parser requires."""
    values = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    base = {**vars(parser.parse_args(list(base_argv))), **(defaults or {})}
    skip = {"out", *ignore}
    return {k: v for k, v in values.items() if k not in skip and k in base and v != base[k]}


def settings_stem(stem: str, args: argparse.Namespace | Mapping[str, Any],
                  parser: argparse.ArgumentParser, ignore: Iterable[str] = (),
                  defaults: Mapping[str, Any] | None = None,
                  base_argv: Sequence[str] = ()) -> str:
    """``stem`` when every setting of ``args`` is the default, else ``<stem>_<slug>`` with
    the :func:`settings_slug` of the settings that differ (see :func:`changed_settings` for
    ``ignore``, ``defaults`` and ``base_argv``): the name part, before the file endings, of
    every file a run writes.

    >>> import argparse
    >>> p = argparse.ArgumentParser()
    >>> _ = p.add_argument("--steps", type=int, default=10)
    >>> settings_stem("vae_bar", p.parse_args([]), p), settings_stem(
    ...     "vae_bar", p.parse_args(["--steps", "5"]), p)
    ('vae_bar', 'vae_bar_steps-5')
    """
    changed = changed_settings(args, parser, ignore, defaults, base_argv)
    return f"{stem}_{settings_slug(changed)}" if changed else stem


def settings_path(stem: str, args: argparse.Namespace | Mapping[str, Any],
                  parser: argparse.ArgumentParser, ignore: Iterable[str] = (),
                  defaults: Mapping[str, Any] | None = None,
                  results: Path | str = RESULTS) -> Path:
    """``results/<stem>.json`` when every setting of ``args`` is the default, else
    ``results/<stem>_<slug>.json`` with the :func:`settings_slug` of the settings that
    differ (see :func:`changed_settings` for ``ignore`` and ``defaults``)."""
    return Path(results) / f"{settings_stem(stem, args, parser, ignore, defaults)}.json"
