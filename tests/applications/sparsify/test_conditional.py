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
from applications.sparsify.linear_chain import SlicedLinearChain
from applications.sparsify.models import WideResNet, lenet5_caffe, mlp
from applications.sparsify.network import GatedNetwork, _chain_plan, conditional_is_exact

RTOL = 1e-9


pytestmark = pytest.mark.usefixtures("float64", "one_thread", "chain_implementation")


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
        # one nn.ReLU() instance at two places: Sequential runs it at both (a sliced pass
        # that lists children by named_children() skips the second)
        "shared_relu": (_shared_relu_mlp, (6, 1, 4, 4), 3),
        # one gated layer applied twice (its gates shared): the masked path, one set of gates
        "reused_layer": (_reused_layer_mlp, (6, 7), 3),
    }


def _shared_relu_mlp() -> nn.Sequential:
    act = nn.ReLU()
    return nn.Sequential(nn.Flatten(), L0Linear(16, 12), act, L0Linear(12, 10), act,
                         L0Linear(10, 3))


def _reused_layer_mlp() -> nn.Sequential:
    twice = L0Linear(7, 7)
    return nn.Sequential(twice, nn.ReLU(), twice, nn.Tanh(), L0Linear(7, 3))


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
    # a module reused at two places is a step at both; a reused layer has no sliced pass
    plan = _chain_plan(MODELS["shared_relu"][0]())
    assert [kind for kind, *_ in plan] == ["flatten", "layer", "unit", "layer", "unit", "layer"]
    assert SlicedLinearChain.from_module(MODELS["shared_relu"][0]()) is not None
    assert _chain_plan(MODELS["reused_layer"][0]()) is None
    assert SlicedLinearChain.from_module(MODELS["reused_layer"][0]()) is None


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
    assert result["argv"][1:3] == ["--models", "mlp"] and result["args"]["rounds"] == 2
    assert result["args"]["out"] == str(out) and "torch" in result["environment"]


def test_train_step_benchmark_default_out(load_benchmark):
    bench = load_benchmark("train_step")
    parser = bench.build_parser()

    def default(*argv):
        return bench.default_out(parser.parse_args(list(argv)), parser)

    # only a run with every default setting writes the committed file
    assert default() == bench.RESULTS / "train_step_cpu.json"
    assert default("--threads", "2", "--models", "mlp") == (
        bench.RESULTS / "train_step_cpu_models-mlp_threads-2.json")
    assert default("--no-fused").name == "train_step_cpu_no_fused.json"
    assert default("--rounds", "2", "--warmup", "0").name == "train_step_cpu_rounds-2_warmup-0.json"


def test_gpu_benchmark_smoke_runs_on_cpu(tmp_path, load_benchmark):
    torch.set_default_dtype(torch.float32)
    bench = load_benchmark("gpu_wrn")
    out = tmp_path / "g.json"
    result = bench.main(["--smoke", "--device", "cpu", "--only", "L0-ARM init", "L0-HC open",
                         "--out", str(out)])
    assert out.exists()
    assert [r["variant"] for r in result["rows"]] == ["dense", "L0-ARM init", "L0-HC open"]
    assert result["macs_per_image"] > 0 and result["rows"][0]["ratio_to_dense"] == 1.0
    # the no-grad forward of the two-sample floor is timed in the same rounds
    assert len(result["dense_nograd_forward_ms_rounds"]) == result["settings"]["rounds"]
    assert result["two_sample_floor_ratio_paired"] > 1.0
    assert result["argv"][1:3] == ["--smoke", "--device"] and "torch" in result["environment"]


def test_gpu_benchmark_default_out(tmp_path, monkeypatch, load_benchmark):
    bench = load_benchmark("gpu_wrn")
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "print_table", lambda result: None)
    monkeypatch.setattr(bench, "run", lambda args: {"device_type": "cuda", "rows": []})
    for argv, name in [(["--smoke"], "gpu_wrn_smoke.json"), ([], "gpu_wrn.json"),
                       (["--profile", "3"], "gpu_wrn.json"),
                       (["--rounds", "20", "--only", "L0-ARM init"],
                        "gpu_wrn_only-L0-ARM_init_rounds-20.json")]:
        result = bench.main(argv)
        assert result["out"] == str(tmp_path / name) and (tmp_path / name).exists()


def test_ddp_benchmark_smoke_default_out(tmp_path, monkeypatch, load_benchmark):
    import json
    import socket

    torch.set_default_dtype(torch.float32)
    with socket.socket() as sock:  # a free port for the one-process gloo group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.chdir(tmp_path)  # the default output does not depend on the cwd
    bench = load_benchmark("ddp_wrn")
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results")
    assert bench.main(["--smoke"]) == 0
    result = json.loads((tmp_path / "results" / "ddp_wrn_smoke.json").read_text())
    assert result["argv"][1:] == ["--smoke"] and result["settings"]["rounds"] == 2
    assert result["round_orders"] == [["plain", "ddp"], ["ddp", "plain"]]
    assert result["ddp_over_plain_paired"] > 0 and "torch" in result["environment"]
    parser = bench.build_parser()
    cuda = torch.device("cuda")
    assert bench.default_out(parser.parse_args([]), parser, cuda).name == "ddp_wrn_gpu.json"
    assert bench.default_out(parser.parse_args([]), parser, cuda).parent == bench.RESULTS


def test_ddp_benchmark_default_out_names_the_settings(load_benchmark):
    bench = load_benchmark("ddp_wrn")
    parser = bench.build_parser()

    def default(device, *argv):
        return bench.default_out(parser.parse_args(list(argv)), parser, torch.device(device))

    assert default("cpu") == bench.RESULTS / "ddp_wrn_cpu.json"
    assert default("cpu", "--steps", "3") == bench.RESULTS / "ddp_wrn_cpu_steps-3.json"
    assert default("cuda", "--steps", "3", "--batch-size", "64").name == (
        "ddp_wrn_gpu_batch_size-64_steps-3.json")
    assert default("cuda", "--estimator", "hard_concrete").name == (
        "ddp_wrn_gpu_estimator-hard_concrete.json")
    # the documented command of the committed GPU result (docs/distributed.md) keeps its
    # name: bf16 autocast is the default; a float32 run must not overwrite it
    assert default("cuda", "--bf16").name == "ddp_wrn_gpu.json"
    assert default("cuda", "--no-bf16").name == "ddp_wrn_gpu_bf16-False.json"
    assert default("cpu", "--no-bf16").name == "ddp_wrn_cpu.json"  # no autocast on the CPU
    assert default("cpu", "--smoke", "--steps", "3").name == "ddp_wrn_smoke.json"


def test_export_speed_benchmark_default_out(load_benchmark):
    bench = load_benchmark("export_speed")
    parser = bench.build_parser()

    def default(*argv):
        return bench.default_out(parser.parse_args(list(argv)), parser)

    committed = bench.RESULTS / "export_speed.json"
    assert default() == committed
    assert default("--save-runs", "runs/x") == committed  # saving does not change timings
    assert default("--max-epochs", "1", "--models", "mlp") == (
        bench.RESULTS / "export_speed_max_epochs-1_models-mlp.json")
    for argv in (["--target", "0.5"], ["--seed", "1"], ["--batch", "8"], ["--repeats", "1"],
                 ["--threads", "1,2"], ["--run", "runs/mlp"]):
        assert default(*argv) != committed and default(*argv).parent == bench.RESULTS
    assert default("--threads", "1,2").name == "export_speed_threads-1_2.json"
    assert default("--run", "runs/mlp", "--run", "runs/lenet").name == (
        "export_speed_run-runs_mlp+runs_lenet.json")


def test_export_speed_benchmark_writes_settings_name(tmp_path, monkeypatch, load_benchmark):
    import json

    bench = load_benchmark("export_speed")
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    monkeypatch.setattr(bench, "train_pruned", lambda *a, **k: 1 / 0)  # must not train
    # "--models ,": no model to train, so main() writes its (empty) result straight away
    assert bench.main(["--models", ",", "--repeats", "1"]) == 1
    written = tmp_path / "export_speed_models-_repeats-1.json"
    assert [f.name for f in tmp_path.iterdir()] == [written.name]
    assert json.loads(written.read_text())["settings"]["out"] == str(written)


def test_benchmark_output_slug_rules(load_benchmark):
    import argparse
    from pathlib import Path

    load_benchmark("train_step")  # puts the repository root on sys.path, as the scripts do
    from benchmarks._output import RESULTS, settings_path, settings_slug

    assert settings_slug({}) == ""
    # sorted by key; lists joined by "+"; True as the bare key; False spelled out
    assert settings_slug({"z": 1, "models": ["mlp", "lenet5"], "fast": True, "cl": False}) == (
        "cl-False_fast_models-mlp+lenet5_z-1")
    # characters outside [A-Za-z0-9.+-] become "_" (runs of them one "_", none at the ends)
    assert settings_slug({"only": ["L0-ARM init"], "run": ["/a b/"]}) == (
        "only-L0-ARM_init_run-_a_b")
    assert settings_slug({"lr": 0.5, "name": "a,b"}) == "lr-0.5_name-a_b"
    assert len(settings_slug({"k": "x" * 200})) == 80

    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--flag", action="store_true")
    parser.add_argument("--noise", default="a")
    parser.add_argument("--out", default=None)

    def path(*argv, **kw):
        return settings_path("stem", parser.parse_args(list(argv)), parser, **kw)

    assert path() == RESULTS / "stem.json" and RESULTS.name == "results"
    assert path("--n", "3", "--out", "x.json") == RESULTS / "stem.json"  # default value, out
    assert path("--flag", "--n", "4").name == "stem_flag_n-4.json"
    assert path("--noise", "b", ignore={"noise"}).name == "stem.json"
    assert path("--n", "5", defaults={"n": 5}).name == "stem.json"
    assert path(defaults={"n": 5}).name == "stem_n-3.json"
    assert path("--n", "4", results="/tmp/r") == Path("/tmp/r/stem_n-4.json")
    # a mapping works as well as a namespace; keys the parser does not define are left out
    assert settings_path("s", {"n": 4, "extra": 1}, parser).name == "s_n-4.json"

    # the name part alone (scripts that write several files or take a folder), and the
    # defaults of a parser with a positional argument (base_argv)
    from benchmarks._output import settings_stem

    assert settings_stem("stem", parser.parse_args([]), parser) == "stem"
    assert settings_stem("stem", parser.parse_args(["--n", "4"]), parser) == "stem_n-4"
    positional = argparse.ArgumentParser()
    positional.add_argument("experiment")
    positional.add_argument("--n", type=int, default=3)
    assert settings_stem("e", positional.parse_args(["a"]), positional,
                         base_argv=["a"]) == "e"
    assert settings_stem("e", positional.parse_args(["a", "--n", "1"]), positional,
                         base_argv=["a"]) == "e_n-1"


def test_sparsify_benchmark_reuse_across_revisions(tmp_path, monkeypatch, load_benchmark):
    import json

    from applications.sparsify import train as train_mod

    bench = load_benchmark("sparsify_mnist5k")
    calls = []

    def fake_train(config):
        calls.append(config.resume)
        summary = {"config": config.to_dict(), "test_error": 0.1, "params_kept_fraction": 0.5,
                   "flops_kept_fraction": 0.5, "expected_kept_fraction": 0.5,
                   "architecture": "1-1", "dense_architecture": "2-2", "train_time_s": 1.0,
                   "wall_time_s": 1.0}
        (tmp_path / "run" / "summary.json").write_text(json.dumps(summary))
        return summary

    monkeypatch.setattr(train_mod, "train", fake_train)
    spec = dict(model="mlp", kind="arm", lam=0.1, seed=0, epochs=1, limit=10,
                gated={"gate_lr": 7e-3}, out=str(tmp_path / "run"))

    def run(revision, reuse="same-revision"):
        return bench.run_one({**spec, "git_revision": revision, "reuse": reuse})

    first = run("aaa")
    assert calls == [False] and not first["reused"] and first["git_revision"] == "aaa"
    again = run("aaa")  # same revision: read back, marked as reused with its revision
    assert calls == [False] and again["reused"] and again["git_revision"] == "aaa"
    other = run("bbb")  # another revision: trained again from scratch by default
    assert calls == [False, False] and not other["reused"] and other["git_revision"] == "bbb"
    assert "revision aaa" in other["rerun_note"]
    anyrev = run("ccc", reuse="any")
    assert calls == [False, False] and anyrev["reused"] and anyrev["git_revision"] == "bbb"
    assert not run("ccc", reuse="never")["reused"] and calls == [False, False, False]
    assert not run(None)["reused"]  # no git: the revision cannot be checked, so re-run
    assert bench.git_revision(tmp_path) is None  # not a repository: tolerated
    assert bench._may_reuse("same-revision", None, None) is False


def test_sparsify_benchmark_output_names(load_benchmark):
    """The default settings (and the documented command) write the committed
    sparsify_mnist5k.{json,md,png}; other seeds or models write names that spell them out."""
    bench = load_benchmark("sparsify_mnist5k")
    parser = bench.build_parser()

    def stem(*argv):
        return bench.output_stem(parser.parse_args(list(argv)), parser)

    committed = "sparsify_mnist5k"
    assert stem() == committed
    # options that do not change what is measured, and the defaults spelled out or reordered
    assert stem("--workers", "4", "--runs", "/tmp/r", "--results", "/tmp/x",
                "--reuse", "never") == committed
    assert stem("--seeds", "4", "3", "2", "1", "0", "--models", "lenet5", "mlp") == committed
    assert stem("--replot") == committed
    assert stem("--models", "mlp", "--seeds", "0") == "sparsify_mnist5k_models-mlp_seeds-0"
    assert stem("--seeds", "0", "1") == "sparsify_mnist5k_seeds-0+1"
    assert stem("--models", "lenet5") == "sparsify_mnist5k_models-lenet5"
    assert stem("--quick") == stem("--quick", "--seeds", "3") == "sparsify_mnist5k_quick"


def test_sparsify_benchmark_writes_settings_names(tmp_path, monkeypatch, load_benchmark):
    """main() (training faked) writes a partial run under its settings name, the .md links
    that name's figure, and --replot re-renders the same files; the committed names stay
    untouched."""
    import json

    bench = load_benchmark("sparsify_mnist5k")

    def fake_run(spec):
        return {"git_revision": None, "git_revisions": [None], "reused": False,
                "rerun_note": None, "model": spec["model"], "method": spec["kind"],
                "lambda": spec["lam"], "seed": spec["seed"], "epochs": spec["epochs"],
                "test_error": 0.05, "params_kept_fraction": 0.1, "flops_kept_fraction": 0.1,
                "expected_kept_fraction": 0.1, "architecture": "1-1-1",
                "dense_architecture": "784-300-100", "train_time_s": 1.0,
                "wall_time_s": 1.0, "num_train": 4000, "num_test": 1000, "out": spec["out"]}

    monkeypatch.setattr(bench, "run_one", fake_run)
    monkeypatch.setattr(bench, "plot", lambda payload, path: path.write_text("png"))
    argv = ["--models", "mlp", "--seeds", "0", "--workers", "1", "--results", str(tmp_path),
            "--runs", str(tmp_path / "runs")]
    assert bench.main(argv) == 0
    stem = "sparsify_mnist5k_models-mlp_seeds-0"
    assert sorted(f.name for f in tmp_path.iterdir() if f.is_file()) == [
        f"{stem}.json", f"{stem}.md", f"{stem}.png"]
    payload = json.loads((tmp_path / f"{stem}.json").read_text())
    assert payload["benchmark"] == stem and payload["argv"][1:] == argv
    assert f"]({stem}.png)" in (tmp_path / f"{stem}.md").read_text()
    (tmp_path / f"{stem}.md").unlink()
    assert bench.main([*argv, "--replot"]) == 0
    assert (tmp_path / f"{stem}.md").exists()
    assert not (tmp_path / "sparsify_mnist5k.json").exists()


def test_export_speed_bar_not_evaluated_without_pruned_rows(tmp_path, load_benchmark):
    import json

    torch.set_default_dtype(torch.float32)
    bench = load_benchmark("export_speed")
    assert bench.evaluate_bar([])["status"] == "not evaluated"
    few = [{"weights_pruned": 0.003, "speedup": 1.0}]
    assert bench.evaluate_bar(few) == {**bench.evaluate_bar([]), "rows_evaluated": 0}
    assert not bench.evaluate_bar(few)["met"]
    rows = few + [{"weights_pruned": 0.95, "speedup": 4.0}]
    assert bench.evaluate_bar(rows)["status"] == "met" and bench.evaluate_bar(rows)["met"]
    rows.append({"weights_pruned": 0.92, "speedup": 2.0})
    assert bench.evaluate_bar(rows)["status"] == "NOT met"

    out = tmp_path / "es.json"
    argv = ["--models", "mlp", "--max-epochs", "1", "--repeats", "1", "--batch", "8",
            "--out", str(out)]
    assert bench.main(argv) == 1  # one epoch prunes far less than 90%: no pass
    result = json.loads(out.read_text())
    assert result["bar"]["status"] == "not evaluated" and result["bar_met"] is False
    assert result["argv"][1:] == argv and result["settings"]["max_epochs"] == 1
    assert "torch" in result["environment"]


def test_estimators_benchmark_quick_default_out(tmp_path, monkeypatch, load_benchmark):
    import json

    torch.set_default_dtype(torch.float32)
    bench = load_benchmark("estimators")
    monkeypatch.setattr(bench, "RESULTS", tmp_path)
    parser = bench.build_parser()

    def out(*argv):
        return bench.default_out(parser.parse_args(list(argv)), parser)

    assert out() == out("--strict") == tmp_path / "estimators_cpu.json"
    assert out("--threads", "1") == tmp_path / "estimators_cpu.json"  # the default
    assert out("--threads", "2") == tmp_path / "estimators_cpu_threads-2.json"
    assert out("--device", "cuda:1", "--num-samples", "10").name == (
        "estimators_cuda_num_samples-10.json")
    assert out("--quick", "--threads", "2").name == "estimators_cpu_quick.json"
    assert bench.main(["--quick", "--num-samples", "20", "--threads", "1"]) == 0
    result = json.loads((tmp_path / "estimators_cpu_quick.json").read_text())
    assert not (tmp_path / "estimators_cpu.json").exists()
    assert result["argv"][1:] == ["--quick", "--num-samples", "20", "--threads", "1"]
    assert result["settings"]["quick"] and "torch" in result["environment"]
