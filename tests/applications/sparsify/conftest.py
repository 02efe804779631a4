"""Fixtures of the sparsify tests."""

from __future__ import annotations

import pytest

from applications.sparsify import cpu_extension


@pytest.fixture(params=["compiled", "python"])
def chain_implementation(request, monkeypatch):
    """Run the test with the compiled kernel of the sliced linear chain, then with its
    Python implementation (both must give the masked computation's results).

    The compiled run is skipped where the kernel cannot be built (no C++ compiler or
    ninja); ``test_cpu_extension.py`` fails instead where a compiler is present and the
    build still fails.
    """
    if request.param == "compiled":
        if cpu_extension.load() is None:
            pytest.skip(f"compiled kernel unavailable: {cpu_extension.status()}")
    else:
        monkeypatch.setitem(cpu_extension._state, "tried", True)
        monkeypatch.setitem(cpu_extension._state, "module", None)
        monkeypatch.setitem(cpu_extension._state, "reason", "disabled by the test")
    return request.param
