"""The fused sliced pass of linear chains gives the masked computation's values and gradients.

Each test runs one :class:`GatedNetwork` step twice with identical random numbers: with
conditional computation (CPU, binary gate samples, weight gradient from the last sample:
the fused :class:`SlicedLinearChain` path) and with ``conditional=False`` (every unit
computed, gates multiplied in). In float64 the losses and every gradient (weights, biases,
gate parameters) agree to rounding. Gate probabilities mix units off in all samples,
units where the samples differ and units on in all, so that every branch is taken.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from applications.sparsify import linear_chain
from applications.sparsify.layers import L0Conv2d, L0Linear
from applications.sparsify.linear_chain import SlicedLinearChain
from applications.sparsify.models import lenet5_caffe, mlp
from applications.sparsify.network import GatedNetwork

RTOL, ATOL = 1e-9, 1e-12


pytestmark = pytest.mark.usefixtures("float64", "chain_implementation")


def _set_probs(net: GatedNetwork, probs_for) -> None:
    for layer in net.gated_layers().values():
        gate = layer.gate
        with torch.no_grad():
            gate.phi.copy_(gate.parameterization.inverse(probs_for(gate.num_units)))


def _mixed(seed: int):
    """Probabilities: about a third nearly off, a third uncertain, a third nearly on."""
    gen = torch.Generator().manual_seed(seed)

    def probs(n: int) -> torch.Tensor:
        kind = torch.randint(0, 3, (n,), generator=gen)
        p = torch.rand(n, generator=gen) * 0.8 + 0.1
        p[kind == 0] = 0.002
        p[kind == 2] = 0.998
        return p

    return probs


def _step(module, x, y, estimator="arm", conditional=True, seed=3, loss_fn=F.cross_entropy,
          **options):
    net = GatedNetwork(copy.deepcopy(module), estimator, lam=0.3, num_train=50,
                       conditional=conditional, generator=torch.Generator().manual_seed(seed),
                       **options)
    out = net.objective(x, y, loss_fn)
    out.loss.backward()
    grads = {n: (torch.zeros_like(p) if p.grad is None else p.grad.clone())
             for n, p in net.named_parameters()}
    return out, grads


@contextlib.contextmanager
def _counting_fused_calls():
    """Count the calls of the fused pass (``SlicedLinearChain.flat_losses``, which
    :class:`GatedNetwork` calls) inside the block."""
    calls = {"n": 0}
    original = SlicedLinearChain.flat_losses

    def counting(self, *a, **k):
        calls["n"] += 1
        return original(self, *a, **k)

    SlicedLinearChain.flat_losses = counting
    try:
        yield calls
    finally:
        SlicedLinearChain.flat_losses = original


def _assert_same_step(module, x, y, *, calls_expected=True, **kwargs):
    with _counting_fused_calls() as calls:
        fused, g_fused = _step(module, x, y, conditional=True, **kwargs)
    assert (calls["n"] > 0) == calls_expected
    masked, g_masked = _step(module, x, y, conditional=False, **kwargs)
    torch.testing.assert_close(fused.loss, masked.loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(fused.data_loss, masked.data_loss, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(fused.logits, masked.logits, rtol=RTOL, atol=ATOL)
    assert g_fused.keys() == g_masked.keys()
    for name in g_fused:
        torch.testing.assert_close(g_fused[name], g_masked[name], rtol=RTOL, atol=ATOL,
                                   msg=lambda m, name=name: f"{name}: {m}")


def _data(batch: int, shape, classes: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn((batch, *shape), generator=gen),
            torch.randint(0, classes, (batch,), generator=gen))


# ------------------------------------------------------------------ which modules
def test_mlp_is_a_chain_and_others_are_not():
    chain = SlicedLinearChain.from_module(mlp((20, 8, 6, 3)))
    assert chain is not None and chain.flatten and chain.names == ["1", "3", "5"]
    assert SlicedLinearChain.from_module(lenet5_caffe()) is None
    assert SlicedLinearChain.from_module(
        nn.Sequential(L0Linear(4, 3), nn.Tanh(), L0Linear(3, 2))) is None  # not ReLU
    assert SlicedLinearChain.from_module(
        nn.Sequential(L0Linear(4, 3), nn.ReLU(), L0Linear(3, 2, gate="weight"))) is None
    assert SlicedLinearChain.from_module(
        nn.Sequential(L0Linear(4, 3, gated=False), nn.ReLU(), L0Linear(3, 2, gated=False))
    ) is None  # nothing gated
    assert SlicedLinearChain.from_module(nn.Sequential(nn.Flatten(0), L0Linear(4, 3))) is None
    assert SlicedLinearChain.from_module(L0Linear(4, 3)) is None  # not a Sequential
    assert SlicedLinearChain.from_module(
        nn.Sequential(L0Linear(4, 3), nn.ReLU(), nn.ReLU(), L0Linear(3, 2))) is None
    conv = nn.Sequential(L0Conv2d(1, 2, 3), nn.ReLU(), L0Linear(2, 2))
    assert SlicedLinearChain.from_module(conv) is None


# ------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("state", ["sparse", "open", "mixed"])
@pytest.mark.parametrize("estimator", ["arm", "disarm"])
def test_step_equals_the_masked_step(state, estimator):
    torch.manual_seed(0)
    module = mlp((40, 24, 12, 5))
    probs = {"sparse": lambda n: torch.where(torch.arange(n) % 5 == 0, 0.998, 0.002),
             "open": lambda n: torch.full((n,), 0.998), "mixed": _mixed(1)}[state]
    _set_probs(GatedNetwork(module), probs)
    x, y = _data(9, (1, 8, 5), 5)
    for seed in range(4):  # several gate samples: the samples differ in different places
        _assert_same_step(module, x, y, estimator=estimator, seed=seed)


@pytest.mark.parametrize("macs, flat", [(0, 0), (0, 10**9), (10**9, 0), (10**9, 10**9)])
def test_every_first_layer_and_indexing_strategy(monkeypatch, macs, flat):
    """Split or stacked first layer; flat or two-step weight blocks."""
    monkeypatch.setattr(linear_chain, "SHARED_FIRST_LAYER_MACS", macs)
    monkeypatch.setattr(linear_chain, "FLAT_INDEX_LIMIT", flat)
    torch.manual_seed(1)
    module = mlp((30, 20, 10, 4))
    _set_probs(GatedNetwork(module), _mixed(2))
    x, y = _data(7, (30,), 4)
    for seed in range(3):
        _assert_same_step(module, x, y, seed=seed)


def test_dense_fraction_boundary(monkeypatch):
    """Stored columns: the union gathered (fraction 1.01) or all of them (fraction 0)."""
    torch.manual_seed(2)
    module = mlp((30, 20, 10, 4))
    _set_probs(GatedNetwork(module), _mixed(3))
    x, y = _data(6, (30,), 4)
    for fraction in (0.0, 1.01):
        monkeypatch.setattr(linear_chain, "DENSE_FRACTION", fraction)
        _assert_same_step(module, x, y, seed=5)


def test_whole_layers_off_and_ungated_layers():
    torch.manual_seed(3)
    module = nn.Sequential(
        L0Linear(12, 9), nn.ReLU(), L0Linear(9, 7, gated=False), nn.ReLU(),
        L0Linear(7, 6), nn.ReLU(), L0Linear(6, 3, bias=False),
    )
    net = GatedNetwork(module)
    _set_probs(net, _mixed(4))
    with torch.no_grad():  # the third linear layer: every unit off
        net.gated_layers()["4"].gate.phi.fill_(-10.0)
    x, y = _data(5, (12,), 3)
    for seed in range(3):
        _assert_same_step(module, x, y, seed=seed)


def test_other_losses_and_ignored_labels_take_the_autograd_path():
    torch.manual_seed(4)
    module = mlp((16, 10, 4))
    _set_probs(GatedNetwork(module), _mixed(5))
    x, y = _data(8, (16,), 4)

    def smoothed(out, target, reduction="none"):
        return F.cross_entropy(out, target, reduction=reduction, label_smoothing=0.1)

    _assert_same_step(module, x, y, loss_fn=smoothed)
    y_ignored = y.clone()
    y_ignored[::3] = -100  # F.cross_entropy's ignore_index
    _assert_same_step(module, x, y_ignored)


def test_labels_out_of_range_fail_as_cross_entropy_does():
    torch.manual_seed(4)
    module = mlp((16, 10, 4))
    _set_probs(GatedNetwork(module), _mixed(5))
    x, y = _data(8, (16,), 4)
    y[2] = 4  # four classes: 0..3
    errors = []
    for conditional in (True, False):
        with pytest.raises((IndexError, RuntimeError)) as info:
            _step(module, x, y, conditional=conditional)
        errors.append(type(info.value))
    assert errors[0] is errors[1]


def test_masks_in_other_dtypes():
    chain = SlicedLinearChain.from_module(mlp((6, 4, 3)))
    masks = {"1": np.array([[1, 0, 1, 1, 1, 1], [1, 1, 0, 1, 1, 1]], dtype=bool),
             "3": np.ones((2, 4), dtype=bool)}
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        plan = chain.plan(masks, dtype)
        assert plan.masks[0].dtype == dtype and plan.masks[1] is None
        torch.testing.assert_close(plan.masks[0].squeeze(1).float(),
                                   torch.from_numpy(masks["1"]).float())


def test_single_sample_and_many_sample_estimators():
    torch.manual_seed(5)
    module = mlp((16, 10, 4))
    _set_probs(GatedNetwork(module), _mixed(6))
    x, y = _data(8, (16,), 4)
    _assert_same_step(module, x, y, estimator="reinforce")  # S = 1
    _assert_same_step(module, x, y, estimator="reinforce_loo", num_samples=3,
                      weight_grad="last")


def test_not_used_where_it_does_not_apply():
    torch.manual_seed(6)
    module = mlp((16, 10, 4))
    _set_probs(GatedNetwork(module), _mixed(7))
    x, y = _data(8, (16,), 4)
    # hard concrete: relaxed gates; weight_grad="mean": every sample's gradient
    _assert_same_step(module, x, y, estimator="hard_concrete", calls_expected=False)
    _assert_same_step(module, x, y, weight_grad="mean", calls_expected=False)


def test_gradients_only_where_asked():
    """Frozen weights get no gradient; the others are unchanged."""
    torch.manual_seed(7)
    module = mlp((16, 10, 4))
    _set_probs(GatedNetwork(module), _mixed(8))
    x, y = _data(8, (16,), 4)
    net = GatedNetwork(copy.deepcopy(module), "arm", generator=torch.Generator().manual_seed(1))
    net.module[1].weight.requires_grad_(False)
    net.objective(x, y).loss.backward()
    assert net.module[1].weight.grad is None and net.module[1].bias.grad is not None
    _, ref = _step(module, x, y, seed=1, conditional=False)
    torch.testing.assert_close(net.module[3].weight.grad, ref["module.3.weight"],
                               rtol=RTOL, atol=ATOL)


@given(
    sizes=st.lists(st.integers(1, 12), min_size=2, max_size=4),
    batch=st.integers(1, 6),
    p_off=st.floats(0.0, 1.0),
    p_on=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
    samples=st.integers(2, 4),
)
def test_property_losses_and_gradients_match_the_masked_chain(sizes, batch, p_off, p_on,
                                                              seed, samples):
    """Random chains, masks and sample counts straight through :meth:`losses`, against a
    per-sample masked forward with autograd on the last sample."""
    torch.set_default_dtype(torch.float64)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    module = mlp(sizes)
    chain = SlicedLinearChain.from_module(module)
    rng = np.random.default_rng(seed)
    masks = {}
    for name, layer in zip(chain.names, chain.layers):
        n = layer.in_features
        kind = rng.choice(3, size=n, p=_kinds(p_off, p_on))
        m = np.stack([rng.random(n) < 0.5 for _ in range(samples)])
        m[:, kind == 0], m[:, kind == 2] = False, True
        masks[name] = m
    x = torch.randn(batch, sizes[0], generator=gen)
    y = torch.randint(0, sizes[-1], (batch,), generator=gen)

    values, logits = chain.losses(x, y, masks, F.cross_entropy)
    weights = torch.rand(samples, generator=gen)
    (values * weights).sum().backward()
    params = [p for layer in chain.layers for p in (layer.weight, layer.bias)]
    got = [p.grad.clone() for p in params]
    module.zero_grad()

    expected = []
    for s in range(samples):
        h = x.flatten(1)
        for i, layer in enumerate(chain.layers):
            z = torch.from_numpy(masks[chain.names[i]][s].astype(np.float64))
            h = F.linear(h * z, layer.weight, layer.bias)
            if i < len(chain.layers) - 1:
                h = torch.relu(h)
        loss = F.cross_entropy(h, y)
        expected.append(loss.detach())
        if s == samples - 1:
            (loss * weights.sum()).backward()
            torch.testing.assert_close(logits, h.detach(), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(values, torch.stack(expected), rtol=RTOL, atol=ATOL)
    for g, p in zip(got, params):
        torch.testing.assert_close(g, p.grad, rtol=RTOL, atol=ATOL)


def _kinds(p_off: float, p_on: float) -> list[float]:
    off = p_off / 2
    on = (1 - off) * p_on / 2
    return [off, 1 - off - on, on]


def test_cpu_autocast_falls_back_to_the_generic_pass():
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(8)
    module = mlp((16, 10, 4))
    _set_probs(GatedNetwork(module), _mixed(9))
    x, y = _data(8, (16,), 4)
    x = x.float()
    net = GatedNetwork(module, "arm", generator=torch.Generator().manual_seed(0))
    with _counting_fused_calls() as calls:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net.objective(x, y)
        out.loss.backward()
        assert calls["n"] == 0 and torch.isfinite(out.loss)
        net.objective(x, y)
        assert calls["n"] == 1
