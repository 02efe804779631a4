"""Fixtures for the toys tests (this directory only)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def single_torch_thread():
    """Run each test with one intra-op thread, then restore the previous setting.

    The tensors here are tiny; on a busy two-core machine OpenMP workers spinning between
    parallel regions made single tests 20-50x slower (26 s instead of 0.5 s) without
    changing any result.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
