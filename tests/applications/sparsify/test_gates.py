"""Gates, gated layers and the GatedNetwork objective against hand computations.

The statistical tests fix their seeds (torch generators built from constants) and compare
Monte Carlo means with exact values using their own standard errors, so they are
deterministic and fail only on a real bias.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import binopt
from applications.sparsify.layers import L0Conv2d, L0Gate, L0Linear, SampleBatchNorm2d
from applications.sparsify.models import mlp
from applications.sparsify.network import GatedNetwork

BETA, GAMMA, ZETA = 2.0 / 3.0, -0.1, 1.1


pytestmark = pytest.mark.usefixtures("one_thread")


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------- L0Gate
@pytest.mark.parametrize("drop", [0.2, 0.5, 0.9])
def test_gate_init_matches_drop_rate(drop):
    gate = L0Gate(5, 3, parameterization="scaled_sigmoid", init_drop_rate=drop, k=7.0)
    phi0 = math.log((1 - drop) / drop) / 7.0  # sigmoid(7 phi0) = 1 - drop
    assert torch.allclose(gate.phi, torch.full((5,), phi0), atol=1e-6)
    assert torch.allclose(gate.prob_nonzero(), torch.full((5,), 1 - drop), atol=1e-6)


def test_gate_rejects_bad_drop_rate():
    with pytest.raises(ValueError, match="init_drop_rate"):
        L0Gate(3, 1, init_drop_rate=1.0)


def test_deterministic_gate_bernoulli_by_hand():
    gate = L0Gate(4, 1, parameterization="sigmoid")
    with torch.no_grad():
        gate.phi.copy_(torch.tensor([-2.0, -0.01, 0.0, 1.5]))
    expected = [0.0, 0.0, 0.5, _sigmoid(1.5)]  # keep pi >= 1/2, carrying pi
    assert torch.allclose(gate.deterministic(), torch.tensor(expected), atol=1e-6)


def test_hard_concrete_gate_by_hand():
    gate = L0Gate(3, 2, parameterization="sigmoid")
    gate.estimator = binopt.HardConcrete()
    log_a = [-3.0, 0.0, 2.5]
    with torch.no_grad():
        gate.phi.copy_(torch.tensor(log_a))
    p_nonzero = [_sigmoid(a - BETA * math.log(-GAMMA / ZETA)) for a in log_a]
    det = [min(1.0, max(0.0, _sigmoid(a) * (ZETA - GAMMA) + GAMMA)) for a in log_a]
    assert torch.allclose(gate.prob_nonzero(), torch.tensor(p_nonzero), atol=1e-6)
    assert torch.allclose(gate.deterministic(), torch.tensor(det), atol=1e-6)


# ----------------------------------------------------------------------------- penalty
def _set_phi(net: GatedNetwork, values: dict[str, list[float]]) -> None:
    with torch.no_grad():
        for name, layer in net.gated_layers().items():
            layer.gate.phi.copy_(torch.tensor(values[name]))


def test_penalty_and_kept_by_hand_scaled_sigmoid():
    torch.manual_seed(0)
    k, n = 7.0, 50
    net = GatedNetwork(
        mlp((4, 3, 2), init_drop_rate=0.5, k=k), "arm", lam={"1": 0.2, "3": 0.5}, num_train=n
    )
    phis = {"1": [0.3, -0.2, 0.0, 0.1], "3": [-0.5, 0.05, 0.2]}
    _set_phi(net, phis)
    groups = {"1": 3, "3": 2}  # input gates guard out_features weights each
    lam = {"1": 0.2, "3": 0.5}
    expected = sum(lam[l] / n * groups[l] * sum(_sigmoid(k * p) for p in phis[l]) for l in phis)
    assert net.penalty().item() == pytest.approx(expected, rel=1e-6)

    kept_w = sum(groups[l] * sum(_sigmoid(k * p) for p in phis[l]) for l in phis)
    total_w = 4 * 3 + 3 * 2
    assert net.expected_kept_fraction() == pytest.approx(kept_w / total_w, rel=1e-6)
    # test-time gate: pi >= 1/2 <=> phi >= 0
    assert net.kept_units() == {"1": 3, "3": 2}


def test_penalty_missing_layer_lambda_is_zero_and_global_lambda():
    torch.manual_seed(0)
    net = GatedNetwork(mlp((4, 3, 2), init_drop_rate=0.5), "arm", lam={"3": 1.0}, num_train=10)
    expected = 1.0 / 10 * 2 * net.gated_layers()["3"].gate.prob_nonzero().sum().item()
    assert net.penalty().item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="unknown gated layers"):
        GatedNetwork(mlp((4, 3, 2), init_drop_rate=0.5), "arm", lam={"7": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        GatedNetwork(mlp((4, 3, 2), init_drop_rate=0.5), "arm", lam=-1.0)


def test_penalty_hard_concrete_uses_prob_nonzero():
    torch.manual_seed(0)
    net = GatedNetwork(
        mlp((3, 2), init_drop_rate=0.5, parameterization="sigmoid"),
        "hard_concrete",
        lam=0.3,
        num_train=7,
    )
    log_a = [-1.0, 0.5, 2.0]
    _set_phi(net, {"1": log_a})
    expected = 0.3 / 7 * 2 * sum(_sigmoid(a - BETA * math.log(-GAMMA / ZETA)) for a in log_a)
    assert net.penalty().item() == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- layers
def test_linear_input_gates_apply_per_sample_group():
    torch.manual_seed(0)
    layer = L0Linear(4, 3)
    x = torch.randn(5, 4)
    z = torch.tensor([[1.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]])
    layer.set_gate_values(z)
    out = layer(torch.cat([x, x]))
    layer.set_gate_values(None)
    for s in range(2):
        expected = F.linear(x * z[s], layer.weight, layer.bias)
        assert torch.allclose(out[5 * s : 5 * (s + 1)], expected, atol=1e-6)


def test_linear_weight_gates_by_hand():
    torch.manual_seed(0)
    layer = L0Linear(3, 2, gate="weight")
    x = torch.randn(4, 3)
    z = (torch.rand(1, 6) > 0.5).float()
    layer.set_gate_values(z)
    out = layer(x)
    expected = F.linear(x, layer.weight * z.reshape(2, 3), layer.bias)
    assert torch.allclose(out, expected, atol=1e-6)


def test_conv_output_channel_gates_by_hand():
    torch.manual_seed(0)
    layer = L0Conv2d(2, 3, 3, padding=1)
    x = torch.randn(2, 2, 5, 5)
    z = torch.tensor([[1.0, 0.0, 1.0]])
    layer.set_gate_values(z)
    out = layer(x)
    expected = layer.conv(x) * z.reshape(1, 3, 1, 1)
    assert torch.allclose(out, expected, atol=1e-6)
    assert (out[:, 1] == 0).all()
    assert layer.gate.group_size == 2 * 3 * 3


def test_sample_batchnorm_normalises_each_group_alone():
    torch.manual_seed(0)
    bn = SampleBatchNorm2d(3)
    ref = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    ref.load_state_dict(bn.state_dict())
    a, b = torch.randn(4, 3, 2, 2), 3 * torch.randn(4, 3, 2, 2) + 1
    bn.num_sample_groups = 2
    out = bn(torch.cat([a, b]))
    assert torch.allclose(
        out[:4], F.batch_norm(a, None, None, ref.weight, ref.bias, True), atol=1e-5
    )
    assert torch.allclose(
        out[4:], F.batch_norm(b, None, None, ref.weight, ref.bias, True), atol=1e-5
    )


# ----------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("name", ["arm", "disarm", "reinforce"])
def test_gate_samples_are_bernoulli_pi(name):
    """Every sample an estimator feeds the network is marginally Bernoulli(pi)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(123)
    net = GatedNetwork(
        mlp((3, 2), init_drop_rate=0.5, k=7.0), binopt.get_estimator(name, generator=gen), lam=0.0
    )
    _set_phi(net, {"1": [-0.2, 0.05, 0.3]})
    pi = torch.sigmoid(7.0 * torch.tensor([-0.2, 0.05, 0.3]))
    seen = []

    def f(z):
        seen.append(z["1"].detach().clone())
        return z["1"].sum(-1)

    net.estimator.surrogate(f, net.logits(), num_samples=20000)
    samples = torch.cat(seen)
    mean = samples.mean(0)
    se = (pi * (1 - pi) / samples.shape[0]).sqrt()
    # antithetic pairs are negatively correlated: the iid standard error is conservative
    assert ((mean - pi).abs() < 4.5 * se).all(), (mean, pi)
    assert set(samples.unique().tolist()) <= {0.0, 1.0}


# ----------------------------------------------------------------------------- gradients
def _tiny_network(estimator: binopt.Estimator, lam: float = 0.0):
    torch.manual_seed(3)
    module = nn.Sequential(
        L0Linear(3, 2, init_drop_rate=0.4), nn.ReLU(), L0Linear(2, 2, init_drop_rate=0.6)
    )
    net = GatedNetwork(module, estimator, lam=lam, num_train=20)
    with torch.no_grad():  # gates that matter, probabilities spread over (0, 1)
        net.module[0].weight.copy_(torch.tensor([[2.0, -1.5, 1.0], [-1.0, 2.5, 1.5]]))
        net.module[2].weight.copy_(torch.tensor([[2.0, -2.0], [-1.5, 2.5]]))
        net.module[0].gate.phi.copy_(torch.tensor([0.1, -0.15, 0.2]))
        net.module[2].gate.phi.copy_(torch.tensor([-0.05, 0.12]))
    x = torch.randn(6, 3)
    y = torch.tensor([0, 1, 1, 0, 1, 0])
    return net, x, y


def _objective_f(net: GatedNetwork, x, y):
    """f(z) as GatedNetwork.objective builds it: per-sample mean minibatch loss."""

    def f(z):
        with net.sampled(z) as s:
            out = net.module(x.repeat(s, 1))
        return F.cross_entropy(out, y.repeat(s), reduction="none").reshape(s, -1).mean(1)

    return f


def _close(draws: torch.Tensor, target: torch.Tensor, z: float = 4.5) -> tuple[bool, str]:
    mean = draws.mean(0)
    se = draws.std(0) / math.sqrt(draws.shape[0])
    ok = bool(((mean - target).abs() < z * se + 1e-7).all())
    return ok, f"mean {mean.tolist()}\nexact {target.tolist()}\nse {se.tolist()}"


@pytest.mark.parametrize("name", ["arm", "disarm"])
def test_gate_gradient_of_tiny_network_matches_exact(name):
    """E[estimate] of d E[loss] / d logits equals binopt.exact_grad (5 gates, 2 layers)."""
    gen = torch.Generator().manual_seed(2024)
    net, x, y = _tiny_network(binopt.get_estimator(name, generator=gen))
    f = _objective_f(net, x, y)
    logits = {k: v.detach() for k, v in net.logits().items()}
    exact = binopt.exact_grad(f, logits)
    est = net.estimator.grad(f, logits, num_samples=40000)
    for key in logits:
        ok, msg = _close(est[key], exact[key])
        assert ok, msg
    assert max(float(e.abs().max()) for e in exact.values()) > 0.01  # a non-trivial oracle


def test_objective_phi_gradient_is_unbiased():
    """loss.backward() of GatedNetwork.objective gives d/dphi (E[loss] + penalty) on average,
    including the chain rule through the scaled sigmoid (k = 7)."""
    gen = torch.Generator().manual_seed(7)
    net, x, y = _tiny_network(
        binopt.get_estimator("arm", generator=gen, validate_args=False), lam=0.5
    )
    phis = list(net.gate_parameters())
    f = _objective_f(net, x, y)
    exact_obj = binopt.exact_expectation(f, net.logits()) + net.penalty()
    target = torch.cat([e.detach() for e in torch.autograd.grad(exact_obj, phis)])
    draws = []
    for _ in range(400):
        net.zero_grad(set_to_none=True)
        net.objective(x, y).loss.backward()
        draws.append(torch.cat([p.grad.detach().clone() for p in phis]))
    ok, msg = _close(torch.stack(draws), target)
    assert ok, msg


def test_weight_gradient_is_unbiased():
    """The weights get the Monte Carlo gradient of E[loss] (average over both ARM samples)."""
    gen = torch.Generator().manual_seed(11)
    net, x, y = _tiny_network(binopt.get_estimator("arm", generator=gen, validate_args=False))
    weights = [net.module[0].weight, net.module[2].weight]
    f = _objective_f(net, x, y)
    exact = torch.autograd.grad(binopt.exact_expectation(f, net.logits()), weights)
    target = torch.cat([e.flatten() for e in exact])
    draws = []
    for _ in range(40):  # each draw averages 500 independent estimates in one call
        logits = {k: v.detach() for k, v in net.logits().items()}
        grads = torch.autograd.grad(net.estimator.surrogate(f, logits, num_samples=500), weights)
        draws.append(torch.cat([g.flatten() for g in grads]))
    ok, msg = _close(torch.stack(draws), target)
    assert ok, msg
