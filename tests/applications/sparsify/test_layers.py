"""Gated layers: conditional forward passes against the masked computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from applications.sparsify.layers import (
    Branch,
    L0Conv2d,
    L0Linear,
    PassInfo,
    SampleBatchNorm,
    SampleBatchNorm1d,
    SampleBatchNorm2d,
    apply_module,
    flatten_branch,
)

pytestmark = pytest.mark.usefixtures("float64", "one_thread")


def _gates(s: int, units: int, seed: int, binary: bool = True) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    z = (torch.rand(s, units, generator=gen) < 0.5).double()
    if not binary:
        z = z * torch.rand(s, units, generator=gen)
    z[:, 0] = 0.0  # a unit off in every sample
    return z


def _active(z: torch.Tensor) -> torch.Tensor:
    return (z != 0).any(0).nonzero().squeeze(1)


def _grads(layer: nn.Module, x: torch.Tensor, z: torch.Tensor, active):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    z = z.clone().requires_grad_()
    layer.set_gate_values(z, active)
    out = layer(x)
    layer.set_gate_values(None)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    # the gradient for a zero gate is what conditional computation drops: estimators that
    # may skip units never use it (their gates carry no gradient or are clamped at 0)
    grads = [x.grad, z.grad * (z != 0)] + [
        torch.zeros_like(p) if p.grad is None else p.grad for p in layer.parameters()
    ]
    return out.detach(), grads


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("s", [1, 2])
def test_linear_active_index_equals_masked(binary, s):
    torch.manual_seed(0)
    layer = L0Linear(7, 4)
    x, z = torch.randn(s * 3, 7), _gates(s, 7, 1, binary)
    out_m, g_m = _grads(layer, x, z, None)
    out_c, g_c = _grads(layer, x, z, _active(z))
    assert torch.allclose(out_c, out_m, rtol=1e-12)
    for a, b in zip(g_c, g_m):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("s", [1, 2])
def test_conv_active_index_equals_masked(channels_last, bias, s):
    torch.manual_seed(0)
    layer = L0Conv2d(3, 5, 3, padding=1, bias=bias)
    x, z = torch.randn(s * 2, 3, 6, 6), _gates(s, 5, 2, binary=False)
    if channels_last:
        layer = layer.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    out_m, g_m = _grads(layer, x, z, None)
    out_c, g_c = _grads(layer, x, z, _active(z))
    assert torch.allclose(out_c, out_m, rtol=1e-12)
    if channels_last:
        assert out_c.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(g_c, g_m):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_conv_with_every_gate_off_gives_zeros():
    layer = L0Conv2d(3, 4, 3, stride=2, padding=1)
    z = torch.zeros(2, 4)
    layer.set_gate_values(z, _active(z))
    out = layer(torch.randn(4, 3, 7, 7))
    assert out.shape == (4, 4, 4, 4) and not out.any()


@pytest.mark.parametrize("padding", [0, 2, "same", "valid"])
def test_conv_empty_channel_sets(padding):
    """Sliced convolutions with no input or no output channel: shapes and bias as torch."""
    conv = L0Conv2d(3, 4, 3, padding=padding, bias=True)
    x = torch.randn(2, 3, 6, 6)
    ref = conv.conv(x)
    no_in = conv._conv(x[:, :0], conv.weight[:, :0], conv.bias)
    assert no_in.shape == ref.shape
    assert torch.allclose(no_in, conv.bias.reshape(1, -1, 1, 1).expand_as(ref))
    no_out = conv._conv(x, conv.weight[:0], conv.bias[:0])
    assert no_out.shape == (2, 0) + tuple(ref.shape[2:])


def test_sample_batchnorm_without_running_stats_update():
    bn = SampleBatchNorm2d(3).train()
    x = torch.randn(8, 3, 4, 4)
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    for groups in (1, 2):
        bn.num_sample_groups, bn.update_running_stats = groups, False
        out = bn(x)
        ref = torch.cat(
            [F.batch_norm(c, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
             for c in x.chunk(groups)]
        )
        assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]


def test_branch_dense_flatten_and_modules():
    t = torch.randn(2, 2, 3, 3)
    br = Branch(t, np.array([1, 3]), 4)
    dense = br.dense()
    assert dense.shape == (2, 4, 3, 3)
    assert torch.equal(dense[:, [1, 3]], t) and not dense[:, [0, 2]].any()
    flat = flatten_branch(br)
    assert torch.equal(flat.dense(), dense.flatten(1))
    pooled = apply_module(nn.MaxPool2d(2), br)
    assert torch.equal(pooled.dense(), F.max_pool2d(dense, 2))
    empty = apply_module(nn.MaxPool2d(2), Branch(t[:, :0], np.array([], dtype=np.int64), 4))
    assert empty.t.shape == (2, 0, 1, 1) and not empty.dense().any()
    # pooling a (B, features) tensor pools across features: the branch is densified first
    feats = Branch(torch.randn(3, 2), np.array([0, 2]), 4)
    pooled = apply_module(nn.MaxPool1d(2), feats)
    assert pooled.idx is None and torch.equal(pooled.t, F.max_pool1d(feats.dense(), 2))


def test_linear_sliced_pass_look_ahead_and_shared_input():
    """One shared input, two samples, look-ahead rows: the sliced pass equals the masked
    product for every sample on the outputs the next layer reads."""
    torch.manual_seed(0)
    layer = L0Linear(9, 6)
    x = torch.randn(5, 9)
    zn = np.array([[1, 1, 0, 1, 0, 1, 1, 1, 1], [1, 0, 0, 1, 1, 1, 1, 1, 1]], dtype=float)
    z = torch.from_numpy(zn)
    needed = np.array([[1, 0, 1, 1, 0, 0], [1, 0, 1, 0, 0, 1]], dtype=bool)
    for last_only in (False, True):
        info = PassInfo(2, last_only, binary=True)
        out = layer._forward_branches([Branch(x, None, 9)], z, zn, info, needed)
        assert len(out) == 2
        for s, br in enumerate(out):
            ref = F.linear(x * z[s], layer.weight, layer.bias)
            rows = br.idx if br.idx is not None else np.arange(6)
            assert needed.any(0)[rows].all() or br.idx is None
            assert torch.allclose(br.t, ref[:, rows], rtol=1e-12)
        assert out[0].t.requires_grad is (not last_only)
        assert out[1].t.requires_grad


@pytest.mark.parametrize("channels_last", [False, True])
def test_sample_batchnorm_groups_match_separate_batchnorms(channels_last):
    torch.manual_seed(0)
    bn = SampleBatchNorm2d(3, momentum=0.2).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    ref = [nn.BatchNorm2d(3, momentum=0.2).train() for _ in range(2)]
    for r in ref:
        r.load_state_dict({k: v for k, v in bn.state_dict().items()})
    x = torch.randn(8, 3, 4, 4) * 2 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bn.num_sample_groups = 2
    out = bn(x)
    expected = torch.cat([r(c) for r, c in zip(ref, x.chunk(2))])
    assert torch.allclose(out, expected, rtol=1e-10, atol=1e-12)
    mean = (ref[0].running_mean + ref[1].running_mean) / 2
    var = (ref[0].running_var + ref[1].running_var) / 2
    assert torch.allclose(bn.running_mean, mean) and torch.allclose(bn.running_var, var)
    assert int(bn.num_batches_tracked) == 1


# (class, torch reference, input shape): (N, C) and (N, C, L) for 1d, (N, C, H, W) for 2d
_BATCHNORMS = [
    (SampleBatchNorm1d, nn.BatchNorm1d, (8, 3)),
    (SampleBatchNorm1d, nn.BatchNorm1d, (8, 3, 5)),
    (SampleBatchNorm2d, nn.BatchNorm2d, (8, 3, 4, 4)),
]


def _batchnorm_pair(cls, ref_cls, momentum, groups):
    """A sample-aware BatchNorm with random affine parameters and running statistics, and
    one plain BatchNorm per sample group starting from the same state."""
    bn = cls(3, momentum=momentum).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.num_batches_tracked.fill_(4)
    refs = [ref_cls(3, momentum=momentum).train() for _ in range(groups)]
    for r in refs:
        r.load_state_dict(bn.state_dict())
    bn.num_sample_groups = groups
    return bn, refs


@pytest.mark.parametrize("momentum", [None, 0.0, 0.3])
@pytest.mark.parametrize(("cls", "ref_cls", "shape"), _BATCHNORMS)
def test_sample_batchnorm_momentum_follows_torch(cls, ref_cls, shape, momentum):
    """Over several steps, stacked groups update the running statistics like one
    nn.BatchNorm per group, averaged: None is the cumulative average, 0 freezes them."""
    torch.manual_seed(0)
    bn, refs = _batchnorm_pair(cls, ref_cls, momentum, groups=2)
    start = bn.running_mean.clone(), bn.running_var.clone()
    for _ in range(3):
        x = torch.randn(shape) * 2 + 1
        out = bn(x)
        expected = torch.cat([r(c) for r, c in zip(refs, x.chunk(2))])
        assert torch.allclose(out, expected, rtol=1e-10, atol=1e-12)
        mean = torch.stack([r.running_mean for r in refs]).mean(0)
        var = torch.stack([r.running_var for r in refs]).mean(0)
        assert torch.allclose(bn.running_mean, mean, rtol=1e-12, atol=1e-14)
        assert torch.allclose(bn.running_var, var, rtol=1e-12, atol=1e-14)
        assert int(bn.num_batches_tracked) == int(refs[0].num_batches_tracked)
    assert int(bn.num_batches_tracked) == 4 + 3  # once per forward pass, not per group
    if momentum == 0.0:
        assert torch.equal(bn.running_mean, start[0]) and torch.equal(bn.running_var, start[1])
    else:
        assert not torch.allclose(bn.running_mean, start[0])


@pytest.mark.parametrize(("cls", "ref_cls", "shape"), _BATCHNORMS)
def test_sample_batchnorm_groups_gradients_match_separate_batchnorms(cls, ref_cls, shape):
    """Each group is normalised with its own batch statistics: outputs and the gradients
    of input, weight and bias equal those of one nn.BatchNorm per group."""
    torch.manual_seed(0)
    bn, refs = _batchnorm_pair(cls, ref_cls, 0.1, groups=2)
    assert isinstance(bn, ref_cls) and isinstance(bn, SampleBatchNorm)
    x = torch.randn(shape) * 2 + 1
    w = torch.linspace(-1, 1, x.numel()).reshape(shape)
    xa = x.clone().requires_grad_()
    (bn(xa) * w).sum().backward()
    xb = x.clone().requires_grad_()
    # the references share ONE weight and bias, as the stacked groups do
    for r in refs[1:]:
        r.weight, r.bias = refs[0].weight, refs[0].bias
    out = torch.cat([r(c) for r, c in zip(refs, xb.chunk(2))])
    (out * w).sum().backward()
    for a, b in [(xa.grad, xb.grad), (bn.weight.grad, refs[0].weight.grad),
                 (bn.bias.grad, refs[0].bias.grad)]:
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    # one group, or statistics not updated: still the batch statistics of each group
    bn.update_running_stats = False
    mean = bn.running_mean.clone()
    single = F.batch_norm(x[: shape[0] // 2], None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    assert torch.allclose(bn(x)[: shape[0] // 2], single, rtol=1e-10, atol=1e-12)
    assert torch.equal(bn.running_mean, mean)


def test_sample_batchnorm_checks_its_input():
    bn = SampleBatchNorm1d(3).train()
    bn.num_sample_groups = 2
    with pytest.raises(ValueError, match="2D or 3D"):
        bn(torch.randn(4, 3, 2, 2))
    with pytest.raises(ValueError, match="2 equal sample groups; got 5 rows"):
        bn(torch.randn(5, 3))
    bn.update_running_stats = False
    with pytest.raises(ValueError, match="2D or 3D"):
        bn(torch.randn(4, 3, 2, 2))


@pytest.mark.parametrize(("cls", "ref_cls", "shape"), _BATCHNORMS)
def test_sample_batchnorm_cumulative_momentum_without_host_reads(cls, ref_cls, shape):
    """One sample group with ``momentum=None`` (the cumulative average): the same running
    statistics as nn.BatchNorm, but computed on the device. nn.BatchNorm reads
    ``num_batches_tracked`` on the host for it (a sync per layer and step on CUDA), which
    the meta device, having no values, refuses."""
    torch.manual_seed(0)
    bn, (ref,) = _batchnorm_pair(cls, ref_cls, None, groups=1)
    for _ in range(3):
        x = torch.randn(shape) * 2 + 1
        assert torch.allclose(bn(x), ref(x), rtol=1e-10, atol=1e-12)
        assert torch.allclose(bn.running_mean, ref.running_mean, rtol=1e-12, atol=1e-14)
        assert torch.allclose(bn.running_var, ref.running_var, rtol=1e-12, atol=1e-14)
        assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked)
    meta = cls(3, momentum=None).to("meta").train()
    out = meta(torch.empty(shape, device="meta"))
    assert out.shape == shape and meta.running_mean.device.type == "meta"
    with pytest.raises((NotImplementedError, RuntimeError)):
        ref_cls(3, momentum=None).to("meta").train()(torch.empty(shape, device="meta"))
