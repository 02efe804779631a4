"""Parameter and multiply-accumulate counts (applications.sparsify.flops)."""

from __future__ import annotations

import torch
from torch import nn

from applications.sparsify.flops import count_flops, count_params
from applications.sparsify.models import WideResNet, lenet5_caffe, mlp, to_l0
from applications.sparsify.network import GatedNetwork


def test_count_params_excludes_gates():
    gated, dense = mlp(), mlp(gated=False)
    expected = 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    assert count_params(dense) == expected
    assert count_params(gated) == expected
    assert count_params(GatedNetwork(gated)) == expected
    assert sum(p.numel() for p in gated.parameters()) == expected + 784 + 300 + 100


def test_count_params_lenet_and_shared_parameters():
    assert count_params(lenet5_caffe()) == (
        20 * 25 + 20 + 50 * 20 * 25 + 50 + 800 * 500 + 500 + 500 * 10 + 10)
    lin = nn.Linear(3, 3)
    assert count_params(nn.Sequential(lin, nn.ReLU(), lin)) == 12


def test_count_flops_reference_models():
    assert count_flops(mlp(), (1, 28, 28)) == 784 * 300 + 300 * 100 + 100 * 10
    assert count_flops(mlp(gated=False), (784,)) == 784 * 300 + 300 * 100 + 100 * 10
    lenet = 20 * 24 * 24 * 25 + 50 * 8 * 8 * 20 * 25 + 800 * 500 + 500 * 10
    assert count_flops(lenet5_caffe(), (1, 28, 28)) == lenet
    assert count_flops(GatedNetwork(lenet5_caffe()), (1, 28, 28)) == lenet


def test_count_flops_conv_stride_groups_and_padding():
    m = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),            # 4 * 8 * 8 * 3 * 9
        nn.Conv2d(4, 8, 3, stride=2, groups=2),   # 8 * 3 * 3 * 2 * 9
        nn.Flatten(), nn.Linear(72, 5),           # 72 * 5
    )
    assert count_flops(m, (3, 8, 8)) == 4 * 64 * 27 + 8 * 9 * 18 + 72 * 5
    assert count_flops(to_l0(m[:1]), (3, 8, 8)) == 4 * 64 * 27


def test_count_flops_restores_training_mode_and_handles_batchnorm1d():
    m = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    m.train()
    assert count_flops(m, (4,)) == 4 * 6 + 6 * 2  # batch of one: BN needs eval mode
    assert all(mod.training for mod in m.modules())
    net = WideResNet(depth=10, width=1, num_classes=3).eval()
    assert count_flops(net, (3, 8, 8)) > 0
    assert not any(mod.training for mod in net.modules())


def test_count_flops_linear_on_sequences():
    m = nn.Linear(5, 7)
    assert count_flops(m, (3, 5)) == 3 * 5 * 7
    assert count_flops(m.to(torch.float64), (5,)) == 35
