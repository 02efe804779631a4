"""The compiled CPU kernel of the sliced linear chain: building, fallback, bookkeeping.

That the kernel gives the masked computation's losses and gradients is tested with every
chain test (``test_linear_chain.py``, ``test_conditional.py``), which run once with the
kernel and once with the Python implementation (the ``chain_implementation`` fixture).
"""

from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pytest
import torch

from applications.sparsify import cpu_extension, linear_chain
from applications.sparsify.linear_chain import SlicedLinearChain, _KernelPlan
from applications.sparsify.models import mlp


@pytest.fixture
def fresh_state(monkeypatch):
    """Let a test call ``load()`` as if for the first time; the real state is restored."""
    monkeypatch.setattr(cpu_extension, "_state",
                        {"tried": False, "module": None, "reason": "not loaded yet"})


def _kernel():
    ext = cpu_extension.load()
    if ext is None:
        pytest.skip(f"compiled kernel unavailable: {cpu_extension.status()}")
    return ext


def test_builds_where_a_compiler_and_ninja_exist():
    """CI machines have g++ and the ninja package: a build failure there is a failure."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None or cpu_extension._ninja_dir() is None:
        pytest.skip("no C++ compiler or ninja here: the Python implementation is used")
    if cpu_extension._disabled():
        pytest.skip(f"{cpu_extension.ENV_VAR} disables the kernel")
    assert cpu_extension.load() is not None, cpu_extension.status()
    assert cpu_extension.status() == "compiled"


@pytest.mark.parametrize("value", ["0", "off", "False", " no "])
def test_environment_variable_disables_it(fresh_state, monkeypatch, value):
    monkeypatch.setenv(cpu_extension.ENV_VAR, value)
    assert cpu_extension.load() is None
    assert cpu_extension.status().startswith("disabled by BINOPT_CPU_EXTENSION")


def test_missing_compiler_is_a_silent_fallback(fresh_state, monkeypatch, recwarn):
    monkeypatch.delenv(cpu_extension.ENV_VAR, raising=False)
    monkeypatch.setenv("CXX", "no-such-compiler-binopt")
    assert cpu_extension.load() is None
    assert cpu_extension.status() == "no C++ compiler ('no-such-compiler-binopt' not found)"
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_a_failed_build_warns_once_and_falls_back(fresh_state, monkeypatch):
    monkeypatch.delenv(cpu_extension.ENV_VAR, raising=False)
    if shutil.which(os.environ.get("CXX", "c++")) is None or cpu_extension._ninja_dir() is None:
        pytest.skip("no C++ compiler or ninja here")
    from torch.utils import cpp_extension

    def failing_load(**kwargs):
        raise RuntimeError("Error building extension\nlinear_chain.cpp:1: error: boom")

    monkeypatch.setattr(cpp_extension, "load", failing_load)
    with pytest.warns(RuntimeWarning, match="could not be built .*boom.*Python implementation"):
        assert cpu_extension.load() is None
    assert cpu_extension.status() == "build failed: linear_chain.cpp:1: error: boom"
    with warnings.catch_warnings():  # a second call: no second warning
        warnings.simplefilter("error")
        assert cpu_extension.load() is None


def test_path_is_restored_after_a_build(fresh_state, monkeypatch):
    monkeypatch.delenv(cpu_extension.ENV_VAR, raising=False)
    if shutil.which(os.environ.get("CXX", "c++")) is None or cpu_extension._ninja_dir() is None:
        pytest.skip("no C++ compiler or ninja here")
    from torch.utils import cpp_extension

    seen = {}

    def recording_load(**kwargs):
        seen["path"] = os.environ["PATH"]
        raise RuntimeError("stop")

    monkeypatch.setattr(cpp_extension, "load", recording_load)
    before = os.environ["PATH"]
    with pytest.warns(RuntimeWarning):
        cpu_extension.load()
    assert os.environ["PATH"] == before
    assert seen["path"].split(os.pathsep)[0] == cpu_extension._ninja_dir()


def test_disabled_switches_to_python_and_back(monkeypatch):
    ext = _kernel()
    calls = []
    monkeypatch.setattr(linear_chain._ChainLosses, "apply", lambda *a: calls.append(
        cpu_extension.load()) or (torch.zeros(2), torch.zeros(1)))
    chain = _chain()
    z = torch.ones(2, sum(layer.in_features for layer in chain.layers))
    starts, _ = _starts(chain)
    x, y = torch.randn(3, 20), torch.randint(0, 3, (3,))
    with cpu_extension.disabled():
        assert cpu_extension.load() is None
        chain.flat_losses(x, y, z, starts, torch.nn.functional.cross_entropy)
    assert cpu_extension.load() is ext
    assert calls == [None]


def test_module_name_carries_the_torch_version():
    name = cpu_extension._module_name()
    assert name.startswith("binopt_linear_chain_torch")
    assert name.replace("_", "").isalnum()
    assert torch.__version__.split("+")[0].replace(".", "_") in name


def test_main_prints_the_status(capsys):
    assert cpu_extension.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("binopt CPU kernel: ")
    assert ("compiled" in out) == (cpu_extension.status() == "compiled")


# ----------------------------------------------------------------------------- the kernel
def _chain():
    return SlicedLinearChain.from_module(mlp((20, 8, 6, 3)))


def _starts(chain):
    starts, offset = {}, 0
    for name, layer in zip(chain.names, chain.layers):
        if name is not None:
            starts[name] = offset
            offset += layer.in_features
    return starts, offset


@pytest.mark.parametrize("macs", [0, 10**9])
@pytest.mark.parametrize("dense_fraction", [0.75, 0.3, 1.0])
def test_kernel_plan_equals_the_python_plan(monkeypatch, macs, dense_fraction):
    """The kernel's bookkeeping from the flat sample equals :meth:`SlicedLinearChain.plan`
    (converted), over random masks, sample counts, whole layers off and both thresholds."""
    ext = _kernel()
    chain = _chain()
    starts, total = _starts(chain)
    rng = np.random.default_rng(0)
    x = torch.zeros(1, dtype=torch.float64)
    for trial in range(300):
        samples = int(rng.integers(1, 5))
        probs = rng.choice([0.0, 0.02, 0.5, 0.98, 1.0], size=3)
        z = np.zeros((samples, total))
        for (name, layer), p in zip(zip(chain.names, chain.layers), probs):
            s = starts[name]
            z[:, s:s + layer.in_features] = rng.uniform(size=(samples, layer.in_features)) < p
        masks = {n: z[:, starts[n]:starts[n] + layer.in_features] != 0
                 for n, layer in zip(chain.names, chain.layers)}
        monkeypatch.setattr(linear_chain, "DENSE_FRACTION", dense_fraction)
        monkeypatch.setattr(linear_chain, "SHARED_FIRST_LAYER_MACS", macs)
        expected = _KernelPlan.from_plan(chain.plan(masks, torch.float64))
        cols, mk, shared_off, extra, first_off = ext.plan(
            torch.from_numpy(z), [starts[n] for n in chain.names],
            [layer.in_features for layer in chain.layers],
            [layer.out_features for layer in chain.layers], x, dense_fraction, macs)

        def same(a, b):
            if a is None or b is None:
                return a is None and b is None
            return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)

        msg = f"trial {trial}: samples {samples}, probabilities {probs}"
        assert all(same(a, b) for a, b in zip(cols, expected.cols)), msg
        assert all(same(a, b) for a, b in zip(mk, expected.masks)), msg
        assert same(shared_off, expected.shared_off), msg
        assert len(extra) == len(expected.extra), msg
        assert all(same(a, b) for a, b in zip(extra, expected.extra)), msg
        assert same(first_off, expected.first_off), msg


def test_kernel_checks_its_indices():
    """An out-of-range index is an error, never a write out of bounds."""
    ext = _kernel()
    w = torch.randn(4, 5)
    x = torch.randn(3, 5)
    bad = torch.tensor([0, 5])
    with pytest.raises(RuntimeError, match="out of range"):
        ext.chain_forward(x, [w], [None], [bad], [None], None, [], False)
    with pytest.raises(RuntimeError, match="int64"):
        ext.chain_forward(x, [w], [None], [torch.tensor([0, 1], dtype=torch.int32)], [None],
                          None, [], False)


def test_kernel_cross_entropy_matches_torch():
    """ce_forward: per-sample mean losses and (softmax - onehot) of the last sample; a label
    out of range says so instead of failing."""
    ext = _kernel()
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(2 * 7, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (7,), generator=gen)
    values, g, ok = ext.ce_forward(out.t().contiguous(), y, 2, True)
    assert ok
    expected = torch.nn.functional.cross_entropy(
        out, torch.cat([y, y]), reduction="none").view(2, 7).mean(1)
    torch.testing.assert_close(values, expected, rtol=1e-12, atol=0)
    last = out[7:]
    grad = torch.softmax(last, 1) - torch.nn.functional.one_hot(y, 5)
    torch.testing.assert_close(g, grad.t(), rtol=1e-12, atol=1e-15)
    values, g, ok = ext.ce_forward(out[:7].t().contiguous(), y, 3, False)
    assert ok and values.shape == (3,) and torch.equal(values, values[:1].expand(3))
    assert ext.ce_forward(out[:7].t().contiguous(), torch.full((7,), -100), 1, False)[2] is False
