"""The compiled CPU kernel of the sliced linear chain: optional, built on first use.

:class:`~applications.sparsify.linear_chain.SlicedLinearChain` runs the L0-ARM step of a
thinned MLP as some forty small tensor operations. On a CPU most of their cost is the
Python interpreter, the binding layer and the allocations around each call, not the
arithmetic, so ``csrc/linear_chain.cpp`` does the same computation in C++: the gathers,
the scatters into zero gradients, the cross-entropy and the index bookkeeping as plain
loops, the matrix products with ATen's BLAS. Its results agree with the Python
implementation's to float rounding (the cross-entropy accumulates in double precision),
and the tests check both against the masked computation.

It is compiled with :func:`torch.utils.cpp_extension.load` the first time a chain runs,
which takes about 30 seconds once; later processes load the cached build (under
``$TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) in well under a
second.

Everything works without it, only slower: when there is no C++ compiler or ``ninja``,
when the build fails, or when the environment variable ``BINOPT_CPU_EXTENSION`` is ``0``,
the chain runs its Python implementation. A failed build is reported once per process
with a warning; a missing compiler or ``ninja`` is not an error (see :func:`status`).

``python -m applications.sparsify.cpu_extension`` builds it (if needed) and prints its
status; ``scripts/setup.sh`` does so after installing.

Why a build at run time rather than a compiled wheel: binopt installs as pure Python
(editable, from a checkout), and the kernel must match the ABI of whichever torch the user
has, CPU or CUDA build; torch's JIT extension loader handles both and caches the result.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["ENV_VAR", "SOURCE", "disabled", "load", "status"]

#: Set to ``0`` (or ``off``, ``false``, ``no``) to never build or load the kernel.
ENV_VAR = "BINOPT_CPU_EXTENSION"

#: The C++ source.
SOURCE = Path(__file__).resolve().parent / "csrc" / "linear_chain.cpp"

#: Seconds after which a build in progress says so on stderr (a cached load is faster).
NOTICE_AFTER_S = 2.0

_lock = threading.Lock()
_state: dict[str, object] = {"tried": False, "module": None, "reason": "not loaded yet"}


def _disabled() -> bool:
    return os.environ.get(ENV_VAR, "").strip().lower() in {"0", "off", "false", "no"}


def _ninja_dir() -> str | None:
    """The folder of a ``ninja`` executable: on PATH, or the ``ninja`` package's (a venv's
    ``bin`` is not on PATH unless the venv is activated)."""
    found = shutil.which("ninja")
    if found:
        return str(Path(found).parent)
    try:
        import ninja  # the PyPI package (a dependency of binopt)
    except ImportError:
        return None
    bin_dir = getattr(ninja, "BIN_DIR", None)
    if bin_dir and Path(bin_dir, "ninja").exists():
        return str(bin_dir)
    return None


def _module_name() -> str:
    """The build's name, per torch version: a build for another torch's ABI is never
    loaded."""
    version = re.sub(r"[^0-9A-Za-z]+", "_", torch.__version__)
    return f"binopt_linear_chain_torch{version}"


def _build() -> tuple[ModuleType | None, str]:
    if _disabled():
        return None, f"disabled by {ENV_VAR}={os.environ.get(ENV_VAR)}"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return None, f"no C++ compiler ({compiler!r} not found)"
    ninja_dir = _ninja_dir()
    if ninja_dir is None:
        return None, "ninja not found (pip install ninja)"
    if not SOURCE.exists():
        return None, f"source {SOURCE} missing"
    from torch.utils import cpp_extension

    notice = threading.Timer(NOTICE_AFTER_S, lambda: print(
        "binopt: compiling the CPU kernel of the sliced linear chain (once, about 30 s; "
        f"{ENV_VAR}=0 skips it)", file=sys.stderr, flush=True))
    notice.daemon = True
    old_path = os.environ.get("PATH", "")
    os.environ["PATH"] = ninja_dir + os.pathsep + old_path
    notice.start()
    try:
        module = cpp_extension.load(
            name=_module_name(), sources=[str(SOURCE)], extra_cflags=["-O2"], verbose=False
        )
    except Exception as err:  # noqa: BLE001 - any failure means: use the Python path
        lines = [line for line in str(err).strip().splitlines() if line.strip()]
        return None, "build failed: " + (lines[-1] if lines else type(err).__name__)
    finally:
        notice.cancel()
        os.environ["PATH"] = old_path
    return module, "compiled"


def load() -> ModuleType | None:
    """The compiled kernel, or ``None`` when it is unavailable (see :func:`status`).

    The first call builds or loads it; later calls return the same result at once.
    """
    if _state["tried"]:
        return _state["module"]  # type: ignore[return-value]
    with _lock:
        if not _state["tried"]:
            module, reason = _build()
            _state.update(tried=True, module=module, reason=reason)
            if reason.startswith("build failed"):
                warnings.warn(
                    f"binopt: the CPU kernel of the sliced linear chain could not be built "
                    f"({reason}); using the Python implementation (same results, slower). "
                    f"Set {ENV_VAR}=0 to skip the attempt.",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _state["module"]  # type: ignore[return-value]


def status() -> str:
    """``"compiled"``, or why the Python implementation is used (``"not loaded yet"``
    before the first :func:`load`)."""
    return str(_state["reason"])


@contextmanager
def disabled() -> Iterator[None]:
    """Inside the block, chains that start there use the Python implementation (to compare
    the two, or to rule the kernel out while debugging). Not thread-safe: it switches the
    kernel off for the whole process."""
    module = load()
    _state["module"] = None
    try:
        yield
    finally:
        _state["module"] = module


def main(argv: list[str] | None = None) -> int:
    """Build or load the kernel and print its status; exit status 0 either way (the
    Python implementation is a complete fallback)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m applications.sparsify.cpu_extension",
        description="Build (once) and load binopt's compiled CPU kernel of the sliced "
        "linear chain, and print whether it is used.",
    )
    parser.parse_args(argv)
    load()
    reason = status()
    if reason == "compiled":
        print("binopt CPU kernel: compiled (used by L0-ARM training of MLPs on the CPU)")
    else:
        print(f"binopt CPU kernel: not used, {reason}; L0-ARM training of MLPs on the CPU "
              "runs the Python implementation (same results, slower)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
