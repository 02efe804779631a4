"""Shared test configuration: hypothesis profiles.

Hypothesis controls ``random`` and ``numpy.random`` only; tests that need torch randomness
draw a seed from the example and build a ``torch.Generator`` from it (DESIGN.md, 3b).

Profiles
--------
``ci`` (the default)
    ``derandomize=True`` makes every run draw the same examples (as numpy, scipy and
    pytorch do in their CI), so the statistical tests run with fixed seeds wherever they
    run: ``make test``, ``.ci/run``, a plain ``pytest``. ``database=None`` keeps no state
    between runs, ``deadline=None`` because timings on shared machines are noisy,
    ``print_blob=True`` prints a reproduction blob on failure.
``dev``
    Opt-in with ``HYPOTHESIS_PROFILE=dev``: fresh random examples each run (failures are
    saved in the local example database and replayed first), no deadline. Use it to hunt
    for new counterexamples; a statistical test may then fail at its family-wise rate.

``max_examples`` is kept modest in both so that the core suite runs in well under 90 s on
two CPU cores; statistical tests read ``settings().max_examples`` to size their
Bonferroni budget, so raising it (``--hypothesis-profile`` or ``HYPOTHESIS_MAX_EXAMPLES``)
keeps their family-wise error rate where it was.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

_MAX_EXAMPLES = int(os.environ.get("HYPOTHESIS_MAX_EXAMPLES", "20"))

settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    max_examples=_MAX_EXAMPLES,
)
settings.register_profile("dev", deadline=None, max_examples=_MAX_EXAMPLES)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


_CORE_TESTS = (Path(__file__).parent / "binopt", Path(__file__).parent / "test_docs.py")


@pytest.fixture(autouse=True)
def _single_torch_thread(request):
    """Core tests work on tiny tensors: run them on one intra-op thread.

    With two threads on a busy two-core machine, OpenMP's spinning made a (20000, 5)
    reduction ~15x slower; one thread is never slower at these sizes.
    """
    path = Path(str(request.node.path))
    if not any(path == p or p in path.parents for p in _CORE_TESTS):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread avoids OpenMP oversubscription on a busy 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def float64():
    """float64 as the default dtype, for comparisons to rounding (``1e-9``)."""
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture
def load_benchmark():
    """``load_benchmark(name)`` imports ``benchmarks/<name>.py`` (scripts, not a package)."""
    import importlib.util

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
