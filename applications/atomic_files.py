"""Files written so that a crash never leaves a truncated one (checkpoints, exports, results)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_synced(path: str | Path, write: Callable[[Any], Any]) -> None:
    """Write ``path`` through ``write(fh)`` (a binary file) and flush it to disk.

    The fsync comes before any rename of the file: otherwise a crash can leave the new name
    on empty data.
    """
    with open(path, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_write(path: str | Path, write: Callable[[Any], Any]) -> Path:
    """Write a file through ``write(fh)`` (``fh`` a binary file) without ever truncating it.

    The bytes go to a temporary file in the same folder (creating parent folders), which is
    flushed to disk and renamed over ``path`` (``os.replace``, atomic within a file system):
    a crash or Ctrl-C while writing leaves the previous file (or none), never a truncated
    one, and a reader holding the previous file keeps it whole. The temporary file is
    removed when ``write`` fails.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the process id keeps two processes writing the same path off each other's file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write_synced(tmp, write)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
