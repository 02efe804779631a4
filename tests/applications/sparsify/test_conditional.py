"""Conditional computation and one-pass ARM give the gradients of the masked computation.

Every test compares a :class:`GatedNetwork` step with ``conditional=True`` (units gated off
in every sample are not computed; for Sequential chains the sliced, shared pass) against
the same step with ``conditional=False`` (the masked computation over all units), with
identical random numbers, in float64, for weights and gate parameters alike. The gate
probabilities mix units that are off in both ARM samples, units where the two samples
differ and units on in both, plus whole layers that are off, so that every branch of the
sliced pass is exercised. No wall-clock assertions.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from applications.sparsify.layers import L0Conv2d, L0Linear, SampleBatchNorm2d
from applications.sparsify.models import WideResNet, lenet5_caffe, mlp
from applications.sparsify.network import GatedNetwork, _chain_plan, conditional_is_exact

RTOL = 1e-9


pytestmark = pytest.mark.usefixtures("float64", "one_thread")


def _models() -> dict[str, tuple]:
    return {
        "mlp": (lambda: mlp((64, 24, 16, 5)), (8, 1, 8, 8), 5),
        "lenet5": (lambda: lenet5_caffe(input_size=16), (4, 1, 16, 16), 10),
        "wrn": (lambda: WideResNet(depth=10, width=1, num_classes=4), (3, 3, 8, 8), 4),
        "user": (
            lambda: nn.Sequential(
                L0Conv2d(2, 6, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
                L0Conv2d(6, 5, 3, bias=False, gated=False), nn.ReLU(), nn.Flatten(),
                L0Linear(5 * 2 * 2, 7), nn.GELU(), L0Linear(7, 6, gated=False), nn.ELU(),
                L0Linear(6, 3),
            ),
            (5, 2, 8, 8),
            3,
        ),
        # not a chain (Dropout): the layers slice with the active-unit index instead
        "generic": (
            lambda: nn.Sequential(
                L0Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Dropout(0.0), nn.Flatten(),
                L0Linear(6 * 8 * 8, 9), nn.ReLU(), L0Linear(9, 8, gate="weight"), nn.ReLU(),
                L0Linear(8, 3),
            ),
            (4, 2, 8, 8),
            3,
        ),
    }


MODELS = _models()


def _set_probs(net: GatedNetwork, seed: int, mode: str = "mixed") -> None:
    """Gate probabilities from {0.001, 0.3, 0.5, 0.7, 0.999}; ``mode='layer_off<i>'``
    also switches the i-th gated layer off (``pi = 1e-6``), ``'open'`` sets all to 0.999."""
    gen = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.001, 0.3, 0.5, 0.7, 0.999])
    with torch.no_grad():
        for i, layer in enumerate(net.gated_layers().values()):
            gate = layer.gate
            probs = levels[torch.randint(0, len(levels), (gate.num_units,), generator=gen)]
            if mode == f"layer_off{i}":
                probs = torch.full_like(probs, 1e-6)
            if mode == "open":
                probs = torch.full_like(probs, 0.999)
            gate.phi.copy_(gate.parameterization.inverse(probs).to(gate.phi))


def _step_grads(module, x, y, estimator, conditional, weight_grad, seed, **options):
    net = GatedNetwork(
        copy.deepcopy(module), estimator, lam=0.3, num_train=10, conditional=conditional,
        weight_grad=weight_grad, generator=torch.Generator().manual_seed(seed), **options,
    )
    out = net.objective(x, y)
    out.loss.backward()
    grads = {
        n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for n, p in net.named_parameters()
    }
    return out, grads, net


def _assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        scale = max(float(b[name].abs().max()), 1e-12)
        err = float((a[name] - b[name]).abs().max())
        assert err <= RTOL * scale + 1e-13, f"{name}: |diff| {err:.3g} (scale {scale:.3g})"


def _data(name: str, seed: int):
    _, shape, classes = MODELS[name]
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen), torch.randint(0, classes, (shape[0],), generator=gen)


CASES = [
    ("arm", "last"),
    ("arm", "mean"),
    ("disarm", "last"),
    ("hard_concrete", "mean"),
    ("reinforce_loo", "mean"),
]


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("estimator,weight_grad", CASES)
@pytest.mark.parametrize("mode", ["mixed", "layer_off0", "layer_off1", "open"])
def test_conditional_gradients_equal_masked(model, estimator, weight_grad, mode):
    torch.manual_seed(0)
    module = MODELS[model][0]()
    probe = GatedNetwork(module, estimator)
    _set_probs(probe, seed=1, mode=mode)
    x, y = _data(model, 2)
    for seed in (3, 4):
        out_m, masked, _ = _step_grads(module, x, y, estimator, False, weight_grad, seed)
        out_c, sliced, _ = _step_grads(module, x, y, estimator, True, weight_grad, seed)
        assert torch.allclose(out_c.loss, out_m.loss, rtol=RTOL)
        assert torch.allclose(out_c.logits, out_m.logits, rtol=RTOL, atol=1e-12)
        _assert_close(sliced, masked)


def test_penalty_from_flat_logits_matches_penalty():
    torch.manual_seed(0)
    module = MODELS["lenet5"][0]()
    for lam in (0.7, {"0": 0.2, "9": 0.0}, {"3": 0.0}):
        for est in ("arm", "hard_concrete"):
            net = GatedNetwork(module, est, lam=lam, num_train=13)
            _set_probs(net, seed=14)
            flat = torch.cat([v for v in net.logits().values()])
            fused = net._flat_penalty(flat, net.gated_layers())
            assert torch.allclose(fused, net.penalty(), rtol=1e-12, atol=1e-15)


def test_sequential_models_take_the_sliced_pass():
    assert _chain_plan(MODELS["mlp"][0]()) is not None
    assert _chain_plan(MODELS["lenet5"][0]()) is not None
    assert _chain_plan(MODELS["user"][0]()) is not None
    assert _chain_plan(MODELS["wrn"][0]()) is None
    assert _chain_plan(MODELS["generic"][0]()) is None
    assert _chain_plan(nn.Sequential(L0Linear(3, 2), nn.Dropout(0.1))) is None
    assert _chain_plan(nn.Sequential(L0Linear(3, 2), nn.ReLU(inplace=True))) is None
    assert _chain_plan(nn.Sequential(L0Linear(3, 4, gate="weight"), L0Linear(4, 2))) is None


def test_linear_look_ahead_skips_outputs_gated_off_next():
    plan = _chain_plan(mlp((10, 6, 4, 3)))
    looks = [step[3] for step in plan if step[0] == "layer"]
    assert looks == ["3", "5", None]


def _spy_samples(net: GatedNetwork) -> dict:
    """Record the gate samples (layer name -> ``(S, units)``) the estimator hands to ``f``."""
    seen = {}
    original = net.estimator._estimate
    layers = net.gated_layers()

    def spy(call_f, alphas):
        def call(samples):
            (flat,) = samples
            parts = flat.detach().clone().split([g.gate.num_units for g in layers.values()], 1)
            seen.update(zip(layers, parts))
            return call_f(samples)

        return original(call, alphas)

    net.estimator._estimate = spy
    return seen


@pytest.mark.parametrize("model", ["mlp", "lenet5", "wrn"])
def test_last_sample_weight_gradient(model):
    """``weight_grad='last'``: the weights get the gradient of the loss at the second
    (``z = 1[u < pi]``) sample alone, which the masked forward recomputes here."""
    torch.manual_seed(0)
    module = MODELS[model][0]()
    _set_probs(GatedNetwork(module), seed=5)
    x, y = _data(model, 6)
    net = GatedNetwork(copy.deepcopy(module), "arm", lam=0.0, conditional=True,
                       generator=torch.Generator().manual_seed(7))
    seen = _spy_samples(net)
    net.objective(x, y).loss.backward()
    assert seen
    got = {
        n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for n, p in net.module.named_parameters()
    }

    ref = copy.deepcopy(module)
    ref_net = GatedNetwork(ref, "arm", lam=0.0)
    with ref_net.sampled({k: v[1:] for k, v in seen.items()}):
        F.cross_entropy(ref(x), y).backward()
    for n, p in ref.named_parameters():
        if n.endswith("phi"):
            continue
        expected = torch.zeros_like(p) if p.grad is None else p.grad
        assert torch.allclose(got[n], expected, rtol=1e-9, atol=1e-12), n


@pytest.mark.parametrize("estimator", ["arm", "disarm"])
@pytest.mark.parametrize("model", ["mlp", "lenet5", "wrn"])
def test_mean_weight_gradient_averages_both_samples(model, estimator):
    """``weight_grad='mean'``: the weights get the gradient of the mean of the losses at
    both samples, each recomputed here by a masked forward pass; ``'last'`` (same samples)
    differs from it, and both hand the gates the same gradient."""
    torch.manual_seed(0)
    module = MODELS[model][0]()
    _set_probs(GatedNetwork(module), seed=8)
    x, y = _data(model, 9)
    got, seen = {}, {}
    for weight_grad in ("mean", "last"):
        net = GatedNetwork(copy.deepcopy(module), estimator, lam=0.0, conditional=True,
                           weight_grad=weight_grad,
                           generator=torch.Generator().manual_seed(10))
        seen[weight_grad] = _spy_samples(net)
        net.objective(x, y).loss.backward()
        got[weight_grad] = {
            n: torch.zeros_like(p) if p.grad is None else p.grad.clone()
            for n, p in net.module.named_parameters()
        }
    samples = seen["mean"]
    assert samples and all(v.shape[0] == 2 for v in samples.values())
    for name in samples:  # the same random numbers: the same two samples
        assert torch.equal(samples[name], seen["last"][name]), name
    # the two samples differ somewhere, so one-sample and two-sample gradients can differ
    assert any(not torch.equal(v[0], v[1]) for v in samples.values())

    ref = copy.deepcopy(module)
    ref_net = GatedNetwork(ref, estimator, lam=0.0)
    losses = []
    for s in range(2):  # each sample on its own, masked
        with ref_net.sampled({k: v[s : s + 1] for k, v in samples.items()}):
            losses.append(F.cross_entropy(ref(x), y))
    ((losses[0] + losses[1]) / 2).backward()
    expected = {
        n: torch.zeros_like(p) if p.grad is None else p.grad
        for n, p in ref.named_parameters() if not n.endswith("phi")
    }
    _assert_close({n: got["mean"][n] for n in expected}, expected)
    # ... which is not the last sample's gradient alone
    diff = max(float((got["mean"][n] - got["last"][n]).abs().max()) for n in expected)
    scale = max(float(g.abs().max()) for g in expected.values())
    assert diff > 1e-3 * scale, (diff, scale)
    phi = [n for n in got["mean"] if n.endswith("phi")]
    assert phi
    _assert_close({n: got["mean"][n] for n in phi}, {n: got["last"][n] for n in phi})


def test_running_stats_follow_the_gradient_sample_only():
    torch.manual_seed(0)
    module = MODELS["wrn"][0]()
    _set_probs(GatedNetwork(module), seed=11)
    x, y = _data("wrn", 12)
    nets = {}
    for cond in (False, True):
        _, _, nets[cond] = _step_grads(module, x, y, "arm", cond, "last", 13)
    bns = [[m for m in nets[c].modules() if isinstance(m, SampleBatchNorm2d)] for c in nets]
    for a, b in zip(*bns):
        assert torch.allclose(a.running_mean, b.running_mean, rtol=1e-9, atol=1e-12)
        assert torch.allclose(a.running_var, b.running_var, rtol=1e-9, atol=1e-12)
        assert int(a.num_batches_tracked) == 1 and not a.num_sample_groups > 1


def test_options_are_checked():
    module = mlp((8, 4, 3, 2))
    with pytest.raises(ValueError, match="not exact"):
        GatedNetwork(module, "straight_through", conditional=True)
    with pytest.raises(ValueError, match="weight_grad"):
        GatedNetwork(module, "exact", weight_grad="last")
    with pytest.raises(ValueError, match="conditional"):
        GatedNetwork(module, conditional="yes")
    assert GatedNetwork(module, "straight_through").uses_conditional("cpu") is False
    assert GatedNetwork(module, "arm").uses_conditional("cpu") is True
    assert GatedNetwork(module, "arm").uses_conditional("cuda") is False
    assert GatedNetwork(module, "arm", conditional=True).uses_conditional("cuda") is True
    assert GatedNetwork(module, "arm").weight_grad == "last"
    assert GatedNetwork(module, "hard_concrete").weight_grad == "mean"
    assert GatedNetwork(module, "arm").estimator.validate_args is False


@pytest.mark.parametrize("name", ["arm", "hard_concrete", "gumbel", "reinforce"])
def test_conditional_is_exact_for(name):
    from binopt import get_estimator

    assert conditional_is_exact(get_estimator(name))


@pytest.mark.parametrize("name,options", [("straight_through", {}), ("gumbel", {"hard": True})])
def test_conditional_is_not_exact_for(name, options):
    from binopt import get_estimator

    assert not conditional_is_exact(get_estimator(name, **options))


def test_train_step_benchmark_runs(tmp_path, load_benchmark):
    torch.set_default_dtype(torch.float32)
    bench = load_benchmark("train_step")
    out = tmp_path / "ts.json"
    result = bench.main(["--models", "mlp", "--rounds", "2", "--warmup", "0",
                         "--steady-steps", "8", "--out", str(out)])
    assert out.exists() and {r["variant"] for r in result["rows"]} >= {"dense", "L0-ARM open"}
    assert result["settings"]["torch_threads"] == 1
    steady = {(r["variant"], r["flush_denormals"]) for r in result["steady_state"]}
    assert steady == {(v, f) for v in ("dense", "L0-ARM sparse") for f in (False, True)}


def test_gpu_benchmark_smoke_runs_on_cpu(tmp_path, load_benchmark):
    torch.set_default_dtype(torch.float32)
    bench = load_benchmark("gpu_wrn")
    out = tmp_path / "g.json"
    result = bench.main(["--smoke", "--device", "cpu", "--only", "L0-ARM init", "L0-HC open",
                         "--out", str(out)])
    assert out.exists()
    assert [r["variant"] for r in result["rows"]] == ["dense", "L0-ARM init", "L0-HC open"]
    assert result["macs_per_image"] > 0 and result["rows"][0]["ratio_to_dense"] == 1.0
