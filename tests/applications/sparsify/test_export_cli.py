"""``binopt export --run DIR --out model.pt`` and the ``exported/`` folder of a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from applications.cli import main
from applications.sparsify.export import export, load_exported
from applications.sparsify.export_cli import UnfinishedRunWarning, load_run
from applications.sparsify.models import build_model
from applications.sparsify.network import GatedNetwork
from applications.sparsify.train import TrainConfig

REPO = Path(__file__).resolve().parents[3]


def _fake_run(folder, model="lenet5", estimator="arm", seed=0, *, phase="l0", epoch=None,
              epochs=10):
    """A run folder as ``binopt sparsify`` writes it, with random non-trivial gates.

    ``phase="dense"``: the dense baseline's ``OUT/dense`` (no gates); ``epoch`` below
    ``epochs``: a run stopped before its last epoch.
    """
    config = TrainConfig(model=model, dataset="mnist5k", estimator=estimator, epochs=epochs)
    param = config.effective_parameterization
    options = {"parameterization": param}
    if param == "scaled_sigmoid":
        options["k"] = config.k
    torch.manual_seed(seed)
    gated = phase == "l0"
    module = build_model(model, input_shape=(1, 28, 28), num_classes=10, gated=gated, **options)
    net = GatedNetwork(module, estimator)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in net.gated_layers().values():
            n = layer.gate.num_units
            probs = torch.where(torch.rand(n, generator=gen) < 0.4, torch.full((n,), 0.05),
                                0.55 + 0.44 * torch.rand(n, generator=gen))
            layer.gate.phi.copy_(layer.gate.parameterization.inverse(probs))
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"format": 2, "phase": phase, "config": config.to_dict(),
                "model": net.state_dict(), "epoch": epochs if epoch is None else epoch},
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
    err = capsys.readouterr().err
    # the cause, not only load_state_dict's "Error(s) in loading state_dict for ...:"
    assert "does not match" in err and ("Missing key" in err or "size mismatch" in err)
    assert "user module" in err and err.count("\n") == 1


def test_run_naming_the_checkpoint_file_and_empty_out(tmp_path, capsys):
    """``--run DIR/checkpoint.pt`` said "run folder ... does not exist" (it exists, as a
    file); ``--out ''`` silently wrote DIR/exported.pt."""
    _fake_run(tmp_path / "run", model="mlp")
    assert main(["export", "--run", str(tmp_path / "run" / "checkpoint.pt")]) == 2
    err = _one_line_error(capsys)
    assert "expected the run folder that holds checkpoint.pt; got the file" in err
    assert f"(its folder is {tmp_path / 'run'})" in err
    assert main(["export", "--run", str(tmp_path / "run"), "--out", ""]) == 2
    assert "--out must be a .pt/.pth file or a folder; got ''" in _one_line_error(capsys)
    assert not (tmp_path / "run" / "exported.pt").exists()


def _one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.err.startswith("binopt: error: ") and captured.err.count("\n") == 1
    assert "Traceback" not in captured.err
    return captured.err


def test_out_naming_an_existing_folder_writes_the_folder_format(tmp_path, capsys):
    """An existing folder is a folder target whatever its name, like ``--out folder/``."""
    net = _fake_run(tmp_path / "run", model="mlp")
    (tmp_path / "dir.pt").mkdir()
    for out in (str(tmp_path / "dir.pt"), str(tmp_path / "new.pt") + os.sep):
        assert main(["export", "--run", str(tmp_path / "run"), "--out", out]) == 0
        assert sorted(p.name for p in Path(out).iterdir()) == ["spec.json", "state_dict.pt"]
        x = torch.randn(4, 1, 28, 28)
        with torch.no_grad():
            assert _max_diff(load_exported(out)(x), net(x)) <= 1e-5
    capsys.readouterr()
    (tmp_path / "plain").write_text("not a folder")
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "plain")]) == 2
    assert "existing file; expected a folder or a path ending in .pt/.pth" in \
        _one_line_error(capsys)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "mine")]) == 2
    assert "holds files other than an export (notes.txt)" in _one_line_error(capsys)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("model", ["mlp", "lenet5"])
def test_dense_baseline_folder_exports_the_dense_network(tmp_path, capsys, model):
    dense = _fake_run(tmp_path / "run" / "dense", model=model, phase="dense")
    assert not dense.gated_layers()
    out = tmp_path / "dense.pt"
    assert main(["export", "--run", str(tmp_path / "run" / "dense"), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "dense baseline" in captured.out and "full width" in captured.out
    assert captured.err == ""
    model_out = load_exported(out)
    assert sum(p.numel() for p in model_out.parameters()) == sum(
        p.numel() for p in dense.parameters())
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert _max_diff(model_out(x), dense(x)) <= 1e-5


def test_unknown_checkpoint_phase_is_one_line(tmp_path, capsys):
    _fake_run(tmp_path / "run", model="mlp", phase="finetune")
    assert main(["export", "--run", str(tmp_path / "run")]) == 2
    assert "phase 'finetune'; expected 'l0' (a gated run) or 'dense'" in _one_line_error(capsys)


def test_unfinished_run_is_exported_with_a_one_line_warning(tmp_path, capsys):
    _fake_run(tmp_path / "run", model="mlp", epoch=1, epochs=4)
    assert main(["export", "--run", str(tmp_path / "run"), "--out",
                 str(tmp_path / "m.pt")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("binopt: warning: ") and err.count("\n") == 1
    assert "holds epoch 1 of 4: the run did not finish" in err
    with pytest.warns(UnfinishedRunWarning, match="epoch 1 of 4"):
        load_run(tmp_path / "run")
    _fake_run(tmp_path / "done", model="mlp", epoch=4, epochs=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_run(tmp_path / "done")
    assert main(["export", "--run", str(tmp_path / "done")]) == 0
    assert capsys.readouterr().err == ""


def _user_run(folder, label="my_net", dataset="mnist5k"):
    """A run of ``train(config, module=my_net)``: the folder does not hold my_net's code."""
    from applications.sparsify.models import to_l0

    def my_net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 12), nn.ReLU(), nn.Linear(12, 10))

    net = GatedNetwork(to_l0(my_net(), parameterization="scaled_sigmoid", k=7.0), "arm")
    with torch.no_grad():
        for layer in net.gated_layers().values():
            layer.gate.phi.uniform_(-1.0, 1.0)
    config = TrainConfig(model=label, dataset=dataset, epochs=2)
    folder.mkdir(parents=True)
    torch.save({"format": 2, "phase": "l0", "config": config.to_dict(),
                "model": net.state_dict(), "epoch": 2}, folder / "checkpoint.pt")
    return net.eval(), my_net()


def test_user_module_run_says_to_export_from_python(tmp_path, capsys):
    net, my_net = _user_run(tmp_path / "run")
    assert main(["export", "--run", str(tmp_path / "run")]) == 2
    err = _one_line_error(capsys)
    assert "was trained on a user module (model 'my_net')" in err
    assert "input shape" not in err  # the shape is not what is wrong
    assert f'load_run("{tmp_path / "run"}", module=my_net)' in err
    # the call the message shows works
    loaded, shape, _ = load_run(tmp_path / "run", module=my_net)
    assert shape == (1, 28, 28)
    exported = export(loaded, input_shape=shape)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert _max_diff(exported.module(x), net(x)) <= 1e-5
    assert [p.shape for p in my_net.parameters()] == [(12, 784), (12,), (10, 12), (10,)]


def test_user_module_on_user_data_and_explicit_input_shape(tmp_path):
    net, my_net = _user_run(tmp_path / "run", dataset="my_pixels")
    loaded, shape, _ = load_run(tmp_path / "run", module=my_net)
    assert shape is None  # export infers it: the chain starts with Flatten + Linear
    loaded, shape, _ = load_run(tmp_path / "run", module=my_net, input_shape=(1, 28, 28))
    assert shape == (1, 28, 28)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert _max_diff(loaded(x), net(x)) == 0.0


def test_closed_stdout_pipe_ends_quietly(tmp_path):
    """``binopt export ... | head -1``: no BrokenPipeError traceback, exit status 141."""
    _fake_run(tmp_path / "run", model="mlp")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the first line is written
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "binopt", "export", "--run", str(tmp_path / "run"),
             "--out", str(tmp_path / "m.pt")],
            stdout=write_end, stderr=subprocess.PIPE, text=True, env=env, timeout=300)
    finally:
        os.close(write_end)
    assert proc.stderr == ""
    assert proc.returncode == 141
    assert load_exported(tmp_path / "m.pt") is not None


def test_broken_pipe_of_the_command_itself_is_not_hidden(monkeypatch, capfd):
    """Only a closed stdout ends quietly; a BrokenPipeError from elsewhere is a real error."""
    from applications.sparsify import export_cli

    def run(args):
        print("some output")
        raise BrokenPipeError(32, "Broken pipe (a worker's pipe)")

    monkeypatch.setattr(export_cli, "run", run)
    with pytest.raises(BrokenPipeError, match="worker"):
        main(["export", "--run", "x"])


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
