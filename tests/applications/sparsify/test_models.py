"""Reference models: shapes, where the gates sit, group sizes, dense twins and to_l0."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from applications.sparsify.layers import (
    L0Conv2d,
    L0Linear,
    SampleBatchNorm1d,
    SampleBatchNorm2d,
)
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


def _bn_user_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3),
    )


def test_to_l0_keeps_float64_layers_gates_and_batchnorms():
    torch.manual_seed(0)
    original = _bn_user_net().double()
    with torch.no_grad():  # running statistics that differ from the fresh ones
        for m in original.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    converted = to_l0(original)
    tensors = dict(converted.named_parameters()) | dict(converted.named_buffers())
    floats = {n: t.dtype for n, t in tensors.items() if t.is_floating_point()}
    assert "0.gate.phi" in floats and "4.gate.phi" in floats
    assert set(floats.values()) == {torch.float64}, floats
    assert [type(m) for m in converted][:2] == [L0Conv2d, SampleBatchNorm2d]
    assert type(converted[5]) is SampleBatchNorm1d
    assert converted[1].num_batches_tracked.dtype == torch.int64
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    net = GatedNetwork(converted, "arm", lam=0.1)
    ones = {n: torch.ones(1, l.gate.num_units, dtype=torch.float64)
            for n, l in net.gated_layers().items()}
    original.eval(), converted.eval()
    with net.sampled(ones):  # all gates on: the original network, in float64
        assert torch.allclose(converted(x), original(x), rtol=1e-12, atol=1e-14)
    net.train()
    step = net.objective(x, torch.tensor([0, 1, 2, 0, 1]))
    assert step.loss.dtype == torch.float64
    step.loss.backward()
    assert converted[0].gate.phi.grad.dtype == torch.float64


def test_to_l0_keeps_the_device_of_each_layer():
    # the meta device stands in for an accelerator: nothing may land on the CPU
    original = nn.Sequential(
        nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)
    ).to("meta")
    converted = to_l0(original)
    tensors = dict(converted.named_parameters()) | dict(converted.named_buffers())
    assert {n for n, t in tensors.items() if t.device.type != "meta"} == set()
    assert "0.gate.phi" in tensors and "3.gate.phi" in tensors


def _capture(module: nn.Module) -> list:
    """(num_sample_groups, input, output) of every forward call of ``module``."""
    calls = []
    module.register_forward_hook(
        lambda m, args, out: calls.append(
            (getattr(m, "num_sample_groups", 1), args[0].detach(), out.detach())
        )
    )
    return calls


def test_to_l0_batchnorm1d_running_stats_once_per_arm_step():
    """ARM's antithetic pass (no gradient) gives only a loss value: it must leave the
    running statistics alone, so one step counts one batch."""
    torch.manual_seed(0)
    converted = to_l0(nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(),
                                    nn.Linear(6, 3)))
    net = GatedNetwork(converted, "arm", lam=0.0).train()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for step in range(1, 3):
        net.objective(x, y).loss.backward()
        assert int(converted[1].num_batches_tracked) == step


def test_to_l0_batchnorm1d_stacked_samples_have_their_own_statistics():
    """REINFORCE-LOO stacks its samples in one pass: each is normalised with its own batch
    statistics, the running statistics take one step with their average, and the gradient
    equals that of the samples run one at a time."""
    torch.manual_seed(0)
    original = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=0.3), nn.ReLU(),
                             nn.Linear(6, 3))
    converted = to_l0(original)
    net = GatedNetwork(converted, "reinforce_loo", lam=0.0).train()
    bn = converted[1]
    calls = _capture(bn)
    zs: dict[str, torch.Tensor] = {}

    def keep_gates(name):  # a pre-hook that returns nothing leaves the input alone
        def hook(m, args):
            zs.setdefault(name, m._z.clone())
        return hook

    for n, layer in net.gated_layers().items():  # the gate samples of the step
        layer.register_forward_pre_hook(keep_gates(n))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    start = {k: v.clone() for k, v in bn.state_dict().items()}  # state_dict shares storage
    reference = copy.deepcopy(converted)
    net.objective(x, y).loss.backward()
    assert len(calls) == 1
    groups, inp, out = calls[0]
    assert groups > 1 and inp.shape[0] == groups * 8
    refs = [nn.BatchNorm1d(6, momentum=0.3).train() for _ in range(groups)]
    for r in refs:
        r.load_state_dict(start)
    with torch.no_grad():
        expected = torch.cat([r(c) for r, c in zip(refs, inp.chunk(groups))])
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.allclose(bn.running_mean, torch.stack([r.running_mean for r in refs]).mean(0))
    assert torch.allclose(bn.running_var, torch.stack([r.running_var for r in refs]).mean(0))
    assert int(bn.num_batches_tracked) == 1
    # gradient reference: each sample alone, in a copy taken before the step (in training
    # mode the outputs use batch statistics only); the weights' surrogate is the mean loss
    ref_net = GatedNetwork(reference, "reinforce_loo", lam=0.0).train()
    losses = []
    for k in range(groups):
        with ref_net.sampled({n: v[k : k + 1] for n, v in zs.items()}):
            losses.append(F.cross_entropy(reference(x), y))
    torch.stack(losses).mean().backward()
    for name, p in converted.named_parameters():
        if not name.endswith("phi"):
            assert torch.allclose(p.grad, reference.get_parameter(name).grad, atol=1e-6), name


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


def test_to_l0_keeps_eval_mode():
    from torch import nn

    from applications.sparsify.models import to_l0

    src = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2)).eval()
    out = to_l0(src)
    assert not any(m.training for m in out.modules())
    assert all(m.training for m in to_l0(src.train()).modules())
