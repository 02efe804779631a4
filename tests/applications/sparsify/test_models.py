"""Reference models: shapes, where the gates sit, group sizes, dense twins and to_l0."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from applications.sparsify.layers import L0Conv2d, L0Linear, SampleBatchNorm2d
from applications.sparsify.models import MODELS, WideResNet, build_model, lenet5_caffe, mlp, to_l0
from applications.sparsify.network import GatedNetwork

pytestmark = pytest.mark.usefixtures("one_thread")


def _gates(module: nn.Module) -> dict[str, tuple[int, int]]:
    net = GatedNetwork(module, "arm", lam=0.0)
    return {n: (l.gate.num_units, l.gate.group_size) for n, l in net.gated_layers().items()}


def test_mlp_reference_gates_on_inputs():
    net = mlp()
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    # one gate per input neuron of each layer, guarding a row of out_features weights
    assert list(_gates(net).values()) == [(784, 300), (300, 100), (100, 10)]
    probs = [l.gate.prob_nonzero() for l in net if isinstance(l, L0Linear)]
    assert torch.allclose(probs[0], torch.full((784,), 0.8), atol=1e-6)  # first layer 0.2
    assert torch.allclose(probs[1], torch.full((300,), 0.5), atol=1e-6)


def test_mlp_dense_twin_has_same_init_and_no_gates():
    torch.manual_seed(0)
    gated = mlp((6, 4, 3), init_drop_rate=0.5)
    torch.manual_seed(0)
    dense = mlp((6, 4, 3), gated=False, init_drop_rate=0.5)
    assert _gates(dense) == {}
    dense_w = [p for n, p in dense.named_parameters()]
    gated_w = [p for n, p in gated.named_parameters() if not n.endswith("phi")]
    assert all(torch.equal(a, b) for a, b in zip(dense_w, gated_w))


def test_lenet5_caffe_shapes_and_groups():
    net = lenet5_caffe()
    assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    # conv: output channels guard in_channels * 5 * 5 weights; FC: inputs guard out rows
    assert list(_gates(net).values()) == [(20, 25), (50, 500), (800, 500), (500, 10)]
    n_params = sum(p.numel() for n, p in net.named_parameters() if not n.endswith("phi"))
    assert n_params == 431_080  # the LeNet-5-Caffe parameter count


def test_wide_resnet_gates_first_conv_of_each_block():
    torch.manual_seed(0)
    net = WideResNet(depth=10, width=2, num_classes=7)
    out = net(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    gates = _gates(net)
    assert len(gates) == 3  # one block per stage for depth 10
    assert [u for u, _ in gates.values()] == [32, 64, 128]
    assert all(name.endswith("conv1") for name in gates)
    assert any(isinstance(m, SampleBatchNorm2d) for m in net.modules())
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet(depth=11)


def test_gated_network_sampled_all_ones_equals_plain_forward_for_wrn():
    torch.manual_seed(0)
    net = GatedNetwork(WideResNet(depth=10, width=1), "arm", lam=0.0)
    net.train()
    x = torch.randn(4, 3, 32, 32)
    ones = {n: torch.ones(1, l.gate.num_units) for n, l in net.gated_layers().items()}
    with net.sampled(ones):
        a = net.module(x)
    plain = to_l0(net.module, gate_linear=False, gate_conv=False)
    plain.train()
    b = plain(x)
    assert torch.allclose(a, b, atol=1e-5)


def test_to_l0_copies_weights_and_matches_original_with_all_gates_on():
    torch.manual_seed(0)
    original = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    ).eval()
    converted = to_l0(original).eval()
    kinds = [type(m) for m in converted]
    assert kinds[:2] == [L0Conv2d, SampleBatchNorm2d] and kinds[-1] is L0Linear
    assert isinstance(original[0], nn.Conv2d)  # the original is untouched (deep copy)
    x = torch.randn(2, 1, 8, 8)
    net = GatedNetwork(converted, "arm", lam=0.0)
    ones = {n: torch.ones(1, l.gate.num_units) for n, l in net.gated_layers().items()}
    with net.sampled(ones):
        assert torch.allclose(converted(x), original(x), atol=1e-5)


def test_to_l0_rejects_grouped_convolutions():
    with pytest.raises(ValueError, match="groups=1"):
        to_l0(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)))


@pytest.mark.parametrize("name", ["mlp", "lenet5"])
def test_build_model_by_name(name):
    net = build_model(name, input_shape=(1, 28, 28), num_classes=10)
    assert net(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_build_model_mnist1d_mlp_and_errors():
    net = build_model("mlp", input_shape=(1, 40), num_classes=10, hidden=(30, 20))
    assert net(torch.zeros(2, 1, 40)).shape == (2, 10)
    assert set(MODELS) == {"mlp", "lenet5", "wrn"}
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet", input_shape=(1, 28, 28), num_classes=10)
    with pytest.raises(ValueError, match="square image"):
        build_model("lenet5", input_shape=(1, 40), num_classes=10)
