"""``binopt export --run DIR --out model.pt`` and the ``exported/`` folder of a run."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from applications.cli import main
from applications.sparsify.export import load_exported
from applications.sparsify.export_cli import load_run
from applications.sparsify.models import build_model
from applications.sparsify.network import GatedNetwork
from applications.sparsify.train import TrainConfig


def _fake_run(folder, model="lenet5", estimator="arm", seed=0):
    """A run folder as ``binopt sparsify`` writes it, with random non-trivial gates."""
    config = TrainConfig(model=model, dataset="mnist5k", estimator=estimator)
    param = config.effective_parameterization
    options = {"parameterization": param}
    if param == "scaled_sigmoid":
        options["k"] = config.k
    torch.manual_seed(seed)
    module = build_model(model, input_shape=(1, 28, 28), num_classes=10, gated=True, **options)
    net = GatedNetwork(module, estimator)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in net.gated_layers().values():
            n = layer.gate.num_units
            probs = torch.where(torch.rand(n, generator=gen) < 0.4, torch.full((n,), 0.05),
                                0.55 + 0.44 * torch.rand(n, generator=gen))
            layer.gate.phi.copy_(layer.gate.parameterization.inverse(probs))
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"config": config.to_dict(), "model": net.state_dict(), "epoch": 1},
               folder / "checkpoint.pt")
    return net.eval()


def _max_diff(a, b):
    return float((a - b).abs().max())


@pytest.mark.parametrize("estimator", ["arm", "hard_concrete"])
def test_export_command_writes_a_loadable_file(tmp_path, capsys, estimator):
    net = _fake_run(tmp_path / "run", estimator=estimator)
    out = tmp_path / "model.pt"
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "parameters" in text and "MACs" in text and str(out) in text
    blob = torch.load(out, weights_only=True)
    assert set(blob) == {"spec", "state_dict"}
    json.dumps(blob["spec"])
    model = load_exported(out)
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert _max_diff(model(x), net(x)) <= 1e-5
    assert sum(p.numel() for p in model.parameters()) < sum(
        p.numel() for n, p in net.named_parameters() if not n.endswith("phi"))


def test_export_command_folder_and_default_output(tmp_path):
    net = _fake_run(tmp_path / "run", model="mlp")
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "dir")]) == 0
    assert (tmp_path / "dir" / "spec.json").is_file()
    assert main(["export", "--run", str(tmp_path / "run")]) == 0
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        for path in (tmp_path / "dir", tmp_path / "run" / "exported.pt"):
            assert _max_diff(load_exported(path)(x), net(x)) <= 1e-5


def test_load_run_rebuilds_the_gated_network(tmp_path):
    net = _fake_run(tmp_path / "run")
    loaded, input_shape, config = load_run(tmp_path / "run")
    assert input_shape == (1, 28, 28) and config["model"] == "lenet5"
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert _max_diff(loaded(x), net(x)) == 0.0


def test_export_command_errors(tmp_path, capsys):
    assert main(["export", "--run", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["export", "--run", str(tmp_path / "empty")]) == 2
    assert "no checkpoint.pt" in capsys.readouterr().err
    _fake_run(tmp_path / "bad")
    ckpt = torch.load(tmp_path / "bad" / "checkpoint.pt", weights_only=True)
    ckpt["config"]["model"] = "mlp"  # settings that do not match the weights
    torch.save(ckpt, tmp_path / "bad" / "checkpoint.pt")
    assert main(["export", "--run", str(tmp_path / "bad")]) == 2
    assert "does not match" in capsys.readouterr().err


@pytest.mark.slow
def test_sparsify_run_writes_exported_folder_and_export_command_agrees(tmp_path):
    from applications.sparsify.train import train

    out = tmp_path / "run"
    summary = train(TrainConfig(model="mlp", dataset="mnist5k", epochs=1, limit=200,
                                batch_size=50, out=str(out), progress=False, device="cpu",
                                model_options={"hidden": [32, 16]}))
    assert summary.get("compression_method") == "export", summary.get("export_error")
    assert (out / "exported" / "spec.json").is_file()
    net, input_shape, _ = load_run(out)
    x = torch.randn(16, *input_shape)
    assert main(["export", "--run", str(out), "--out", str(tmp_path / "m.pt")]) == 0
    with torch.no_grad():
        ref = net(x)
        for path in (out / "exported", tmp_path / "m.pt"):
            model = load_exported(path)
            assert isinstance(model, nn.Module)
            assert _max_diff(model(x), ref) <= 1e-5
