"""The training API: outputs, checkpoint/resume equivalence, divergence, callbacks, checks."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path

import pytest
import torch

from applications.errors import UserError
from applications.sparsify import train as train_mod
from applications.sparsify.train import (
    ConfigError,
    TrainConfig,
    TrainingDivergedError,
    load_checkpoint,
    train,
)

SUMMARY_KEYS = {
    "test_error", "architecture", "kept_units", "params_kept_fraction", "flops_kept_fraction",
    "expected_kept_fraction", "estimator", "lambda", "parameterization", "k", "model",
    "dataset", "epochs", "seed", "versions", "device", "wall_time_s", "out",
}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(tmp_path, name="run", **overrides) -> TrainConfig:
    base = dict(
        model="mlp", dataset="mnist5k", limit=200, epochs=2, batch_size=50, lam=0.05,
        model_options={"hidden": [20, 10]}, progress=False, out=str(tmp_path / name),
        device="cpu",
    )
    base.update(overrides)
    return TrainConfig(**base)


def test_train_writes_every_output(tmp_path):
    seen = []
    # lam = 0.01: some units of every layer survive, so the export is not a stub
    config = tiny(tmp_path, baseline="dense", validation_fraction=0.25, lam=0.01)
    summary = train(config, epoch_callback=lambda e, m: seen.append((e, m)))
    out = tmp_path / "run"
    assert SUMMARY_KEYS | {"val_error", "dense_test_error"} <= set(summary)
    assert summary["versions"].keys() == {"binopt", "torch", "python"}
    assert json.loads((out / "summary.json").read_text()) == summary
    assert (out / "summary.png").stat().st_size > 1000
    assert (out / "checkpoint.pt").exists() and (out / "dense" / "checkpoint.pt").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    assert len((out / "dense" / "metrics.jsonl").read_text().splitlines()) == 2
    # the callback sees every epoch with the tuning metrics
    assert [e for e, _ in seen] == [1, 2]
    assert {"val_error", "test_error", "expected_kept_fraction", "architecture"} <= set(seen[0][1])
    # architecture: kept units per gated layer in network order, the papers' notation
    assert summary["dense_architecture"] == "784-20-10"
    kept = summary["kept_units"]
    assert summary["architecture"] == "-".join(str(v) for v in kept.values())
    assert all(0 <= kept[n] <= summary["total_units"][n] for n in kept)
    _assert_export_counts(summary, out)
    assert summary["num_train"] == 150 and summary["num_val"] == 50
    assert 0.0 <= summary["test_error"] <= 1.0 and 0.0 <= summary["dense_test_error"] <= 1.0


def _mlp_counts(widths: list[int]) -> tuple[int, int]:
    """Parameters (weights and biases) and multiply-accumulates of an MLP, by hand."""
    pairs = list(zip(widths[:-1], widths[1:]))
    return sum(a * b + b for a, b in pairs), sum(a * b for a, b in pairs)


def _assert_export_counts(summary: dict, out) -> None:
    """The kept counts and fractions of the summary are those of ``OUT/exported`` against
    the dense twin of the 784-20-10-10 MLP of :func:`tiny`."""
    from applications.sparsify.export import load_exported
    from applications.sparsify.flops import count_flops, count_params
    from applications.sparsify.models import mlp

    assert summary["compression_method"] == "export"
    assert summary["exported"] == str(out / "exported")
    small = load_exported(out / "exported")
    params, flops = count_params(small), count_flops(small, (1, 28, 28))
    dense = mlp((784, 20, 10, 10), gated=False)
    params_dense, flops_dense = count_params(dense), count_flops(dense, (1, 28, 28))
    assert (params_dense, flops_dense) == _mlp_counts([784, 20, 10, 10]) == (16020, 15980)
    # the export keeps exactly the units whose test-time gate is on (inputs of each layer)
    kept = summary["kept_units"]
    assert min(kept.values()) > 0
    assert (params, flops) == _mlp_counts([kept["1"], kept["3"], kept["5"], 10])
    assert summary["params_kept"] == params and summary["params_dense"] == params_dense
    assert summary["flops_kept"] == flops and summary["flops_dense"] == flops_dense
    assert summary["params_kept_fraction"] == pytest.approx(params / params_dense, rel=1e-12)
    assert summary["flops_kept_fraction"] == pytest.approx(flops / flops_dense, rel=1e-12)
    assert params < params_dense and flops < flops_dense  # something was pruned


def _strip_times(rows):
    return [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in rows]


@pytest.mark.parametrize("estimator", ["arm", "hard_concrete"])
def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path, estimator):
    full = train(tiny(tmp_path, "full", estimator=estimator))
    first = train(tiny(tmp_path, "split", estimator=estimator, epochs=1))
    assert load_checkpoint(tmp_path / "split" / "checkpoint.pt")["epoch"] == 1
    resumed = train(tiny(tmp_path, "split", estimator=estimator, epochs=2, resume=True))
    assert first["epochs"] == 1
    for key in ("test_error", "kept_units", "architecture", "expected_kept_fraction",
                "params_kept_fraction"):
        assert resumed[key] == full[key], key
    assert "setting_changes" not in resumed
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert _strip_times(a["history"]) == _strip_times(b["history"])
    assert torch.equal(a["rng"]["estimator"], b["rng"]["estimator"])


def test_resume_with_dense_baseline(tmp_path):
    full = train(tiny(tmp_path, "full", baseline="dense"))
    train(tiny(tmp_path, "split", baseline="dense", epochs=1))
    resumed = train(tiny(tmp_path, "split", baseline="dense", epochs=2, resume=True))
    assert resumed["dense_test_error"] == full["dense_test_error"]
    assert resumed["test_error"] == full["test_error"]


def test_resume_refuses_other_settings(tmp_path):
    train(tiny(tmp_path, epochs=1))
    with pytest.raises(ConfigError, match=r"other settings \(k: 7.0 -> 3.0\)"):
        train(tiny(tmp_path, epochs=2, k=3.0, resume=True))
    # checkpoints of earlier versions fingerprinted the step sizes too; they still resume
    path = tmp_path / "run" / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    ckpt["fingerprint"].update(lr=1e-3, gate_lr=None, lam=0.05)
    torch.save(ckpt, path)
    assert train(tiny(tmp_path, epochs=2, lr=5e-4, resume=True))["setting_changes"][0]["lr"] \
        == [1e-3, 5e-4]


def test_resume_without_checkpoint_starts_afresh(tmp_path, capsys):
    summary = train(tiny(tmp_path, epochs=1, resume=True))
    assert summary["epochs"] == 1
    # a warning even without progress lines: a mistyped --out must not pass for a resume
    err = capsys.readouterr().err.splitlines()
    assert err == [f"binopt: warning: --resume: no checkpoint in {tmp_path / 'run'}; the L0 "
                   "phase starts from scratch"]


def test_output_folder_under_a_file_is_named_as_the_problem(tmp_path):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(UserError, match=re.escape(
                f"cannot create output folder {out}: {tmp_path / 'file'} is a file, not a "
                "folder")):
            train(tiny(tmp_path, out=str(out)))


def test_callback_exception_propagates_after_the_checkpoint(tmp_path):
    class Stop(Exception):
        pass

    def cb(epoch, metrics):
        raise Stop(epoch)

    with pytest.raises(Stop):
        train(tiny(tmp_path), epoch_callback=cb)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["epoch"] == 1
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    assert not (tmp_path / "run" / "summary.json").exists()


def _nan_after(monkeypatch, calls: int) -> None:
    original = train_mod.GatedNetwork.objective
    count = {"n": 0}

    def objective(self, x, y, *args, **kwargs):
        out = original(self, x, y, *args, **kwargs)
        count["n"] += 1
        if count["n"] > calls:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(train_mod.GatedNetwork, "objective", objective)


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    config = tiny(tmp_path, epochs=3)
    steps_per_epoch = math.ceil(200 / 50)
    _nan_after(monkeypatch, steps_per_epoch + 1)  # diverges at epoch 2, step 2
    path = tmp_path / "run" / "checkpoint.pt"
    with pytest.raises(TrainingDivergedError) as info:
        train(config)
    message = str(info.value)
    assert "diverged" in message and "epoch 2" in message and "step 2" in message
    assert str(path) in message and "\n" not in message
    assert "--resume and a smaller --lr or --lam" in message
    assert (info.value.epoch, info.value.step, info.value.checkpoint) == (2, 2, str(path))
    ckpt = load_checkpoint(path)  # intact and loadable
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not list(path.parent.glob(".*tmp"))
    # what the message advises works: continue from the checkpoint with a smaller step
    monkeypatch.undo()
    summary = train(dataclasses.replace(config, lr=5e-4, lam=0.02, resume=True))
    assert summary["epochs"] == 3
    assert summary["setting_changes"] == [
        {"epoch": 2, "lr": [1e-3, 5e-4], "gate_lr": [1e-3, 5e-4], "lam": [0.05, 0.02]}]


def test_nan_in_the_first_epoch_says_there_is_no_checkpoint(tmp_path, monkeypatch):
    _nan_after(monkeypatch, 0)
    with pytest.raises(TrainingDivergedError, match="no checkpoint") as info:
        train(tiny(tmp_path))
    assert info.value.checkpoint is None


def test_hard_concrete_parameterization_and_log_a_clamp(tmp_path):
    summary = train(tiny(tmp_path, estimator="hard_concrete", parameterization="scaled_sigmoid",
                         lam=5.0, epochs=2))
    assert summary["parameterization"] == "sigmoid"
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    phis = [v for k, v in ckpt["model"].items() if k.endswith("phi")]
    lo, hi = math.log(1e-2), math.log(1e2)
    assert all(((p >= lo - 1e-6) & (p <= hi + 1e-6)).all() for p in phis)


def test_per_layer_lambda(tmp_path):
    summary = train(tiny(tmp_path, lam={"1": 0.0, "3": 1.0}, epochs=1))
    assert summary["lambda"] == {"1": 0.0, "3": 1.0}
    with pytest.raises(ConfigError, match="unknown gated layers"):
        train(tiny(tmp_path, lam={"9": 0.1}, epochs=1))


def test_lenet5_and_sgd_one_epoch(tmp_path):
    summary = train(tiny(tmp_path, model="lenet5", model_options={}, limit=60, epochs=1,
                         optimizer="sgd", lr=0.01, lr_schedule="cosine"))
    assert summary["dense_architecture"] == "20-50-800-500"
    assert len(summary["kept_units"]) == 4


def test_same_seed_same_result_other_seed_differs(tmp_path):
    a = train(tiny(tmp_path, "a", epochs=1))
    b = train(tiny(tmp_path, "b", epochs=1))
    c = train(tiny(tmp_path, "c", epochs=1, seed=1))
    assert a["expected_kept_fraction"] == b["expected_kept_fraction"]
    assert a["expected_kept_fraction"] != c["expected_kept_fraction"]


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"model": "resnet"}, "unknown model 'resnet'; choose one of mlp, lenet5, wrn"),
        ({"dataset": "imagenet"}, "unknown dataset 'imagenet'; choose one of .*mnist5k"),
        ({"estimator": "magic"}, "unknown estimator 'magic'; choose one of .*arm"),
        ({"lam": -0.1}, "lam must be >= 0"),
        ({"lam": {"1": -1.0}}, "lam must be >= 0"),
        ({"lam": float("nan")}, "lam must be finite"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"init_drop_rate": 1.5}, "init_drop_rate must be in"),
        ({"optimizer": "rmsprop"}, "unknown optimizer"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"device": "tpu"}, "device"),
        ({"amp": True}, "amp"),
        ({"parameterization": "tanh"}, "unknown parameterization"),
        ({"baseline": "random"}, "unknown baseline"),
    ],
)
def test_bad_settings_raise_config_error(tmp_path, overrides, match):
    config = tiny(tmp_path, **overrides)
    with pytest.raises(ConfigError, match=match) as info:
        train(config)
    assert isinstance(info.value, UserError) and isinstance(info.value, ValueError)
    assert not (tmp_path / "run").exists()


def test_missing_data_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="t10k|train-images|MNIST"):
        train(tiny(tmp_path, dataset="mnist", data_root=str(tmp_path / "nowhere")))


def test_config_round_trip():
    config = TrainConfig(lam={"1": 0.1}, model_options={"hidden": [5]})
    assert TrainConfig.from_dict(config.to_dict()) == dataclasses.replace(config)
    with pytest.raises(ConfigError, match="unknown training setting"):
        TrainConfig.from_dict({"lamda": 0.1})


def _toy_data(n_train=120, n_test=60, features=6):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_test, features, generator=gen)
    y = (x[:, 0] > 0).long()
    return (torch.utils.data.TensorDataset(x[:n_train], y[:n_train]),
            torch.utils.data.TensorDataset(x[n_train:], y[n_train:]))


def test_own_module_and_data(tmp_path):
    from torch import nn

    torch.manual_seed(0)
    mine = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    before = [p.detach().clone() for p in mine.parameters()]
    summary = train(tiny(tmp_path, model="mine", dataset="toy", model_options={}, limit=None,
                         baseline="dense", batch_size=40, lam=0.5),
                    module=mine, data=_toy_data())
    assert all(torch.equal(a, b) for a, b in zip(before, mine.parameters()))  # not modified
    assert summary["dense_architecture"] == "6-8"
    assert summary["model"] == "mine" and summary["num_train"] == 120
    assert "dense_test_error" in summary
    with pytest.raises(ConfigError, match="TensorDataset"):
        train(tiny(tmp_path, dataset="toy"), module=mine, data=(1, 2))


def test_train_dense_only(tmp_path):
    summary = train_mod.train_dense(tiny(tmp_path, epochs=1))
    assert summary["estimator"] == "dense"
    assert summary["params_kept_fraction"] == 1.0
    assert summary["test_error"] == summary["dense_test_error"]
    assert summary["architecture"] == summary["dense_architecture"] == "784-20-10"
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["phase"] == "dense"


def test_params_fallback_without_export_module(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "applications.sparsify.export", None)
    summary = train(tiny(tmp_path, epochs=1))
    assert summary["compression_method"] == "estimate"
    assert "exported" not in summary and not (tmp_path / "run" / "exported").exists()
    # by hand: the weights (no biases) of the kept units of every gated layer; an input
    # unit of an L0Linear layer is a group of out_features weights, one MAC each per example
    kept, total = summary["kept_units"], summary["total_units"]
    out_features = {"1": 20, "3": 10, "5": 10}
    assert total == {"1": 784, "3": 20, "5": 10}
    assert any(kept[n] < total[n] for n in kept)  # some gates are off
    params = sum(kept[n] * out_features[n] for n in kept)
    params_dense = sum(total[n] * out_features[n] for n in total)
    assert params_dense == 784 * 20 + 20 * 10 + 10 * 10
    assert summary["params_kept"] == params and summary["params_dense"] == params_dense
    assert summary["flops_kept"] == params and summary["flops_dense"] == params_dense
    assert summary["params_kept_fraction"] == pytest.approx(params / params_dense, rel=1e-12)
    assert summary["flops_kept_fraction"] == pytest.approx(params / params_dense, rel=1e-12)
    assert summary["params_kept_fraction"] < 1.0


def test_export_failure_falls_back_with_a_warning(tmp_path, monkeypatch):
    pytest.importorskip("applications.sparsify.export")
    from applications.sparsify import export as export_mod

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(export_mod, "export", broken)
    with pytest.warns(RuntimeWarning, match="boom"):
        summary = train(tiny(tmp_path, epochs=1))
    assert summary["compression_method"] == "estimate"
    assert "boom" in summary["export_error"]


def test_export_is_written_and_reloads(tmp_path):
    pytest.importorskip("applications.sparsify.export")
    from applications.sparsify.export import load_exported

    summary = train(tiny(tmp_path, epochs=1, lam=0.01))
    assert summary["compression_method"] == "export"
    small = load_exported(tmp_path / "run" / "exported")
    assert small(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_tutorial_code_runs(tmp_path, monkeypatch):
    """Every python block of docs/sparsify/tutorial.md, in order, in one namespace."""
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[3] / "docs" / "sparsify" / "tutorial.md"
    blocks = re.findall(r"^```python\n(.*?)^```", page.read_text(), re.S | re.M)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)  # the examples write runs/ in the current folder
    namespace: dict = {"__name__": "docs_tutorial"}
    for k, code in enumerate(blocks):
        exec(compile(code, f"{page}:block{k}", "exec"), namespace)
    torch.set_num_threads(1)  # the tutorial sets threads itself; keep the fixture's value


def test_channels_last_is_chosen_for_convolutions_on_cuda_only():
    from applications.sparsify.models import lenet5_caffe, mlp

    conv, dense = lenet5_caffe(), mlp()
    assert train_mod._channels_last(conv, torch.device("cuda"))
    assert not train_mod._channels_last(conv, torch.device("cpu"))
    assert not train_mod._channels_last(dense, torch.device("cuda"))


def test_evaluate_gives_the_same_numbers_channels_last():
    from torch.utils.data import TensorDataset

    from applications.sparsify.models import lenet5_caffe
    from applications.sparsify.network import GatedNetwork

    torch.manual_seed(0)
    net = GatedNetwork(lenet5_caffe(), "arm")
    ds = TensorDataset(torch.randn(37, 1, 28, 28), torch.randint(0, 10, (37,)))
    plain = train_mod.evaluate(net, ds, batch_size=10)
    net_cl = net.to(memory_format=torch.channels_last)
    fast = train_mod.evaluate(net_cl, ds, batch_size=10, channels_last=True)
    assert fast["error"] == plain["error"]
    assert fast["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    # the reference: the whole set in one batch, by hand
    with torch.no_grad():
        net.eval()
        out = net(ds.tensors[0])
    assert plain["error"] == pytest.approx(float((out.argmax(1) != ds.tensors[1]).float().mean()))
    assert plain["loss"] == pytest.approx(
        float(torch.nn.functional.cross_entropy(out, ds.tensors[1])), rel=1e-5)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_optimizers_are_fused_where_supported(optimizer):
    from applications.sparsify.models import mlp
    from applications.sparsify.network import GatedNetwork

    net = GatedNetwork(mlp((12, 6, 3)), "arm")
    config = TrainConfig(optimizer=optimizer, gate_lr=0.5, lr=0.01, weight_decay=1e-4)
    opt = train_mod._make_optimizer(config, net)
    assert opt.defaults["fused"] is True
    weights, gates = opt.param_groups
    assert gates["lr"] == 0.5 and gates["weight_decay"] == 0.0
    assert weights["lr"] == 0.01 and weights["weight_decay"] == 1e-4
    assert {id(p) for p in gates["params"]} == {id(p) for p in net.gate_parameters()}


def test_resume_with_fewer_epochs_than_finished_is_refused(tmp_path):
    train(tiny(tmp_path, epochs=3))
    before = (tmp_path / "run" / "summary.json").read_text()
    with pytest.raises(ConfigError, match=r"has 3 finished epochs, more than --epochs 2; "
                                          r"resume with --epochs >= 3"):
        train(tiny(tmp_path, epochs=2, resume=True))
    assert (tmp_path / "run" / "summary.json").read_text() == before
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 3
    # as many epochs as finished: nothing left to train, the summary is the checkpoint's
    assert train(tiny(tmp_path, epochs=3, resume=True))["epochs"] == 3


def _record_step_lrs(monkeypatch) -> list[list[float]]:
    """The learning rate of every parameter group at every optimizer step."""
    seen: list[list[float]] = []
    original = train_mod._make_optimizer

    def make(config, net):
        opt = original(config, net)
        opt.register_step_pre_hook(
            lambda o, args, kwargs: seen.append([g["lr"] for g in o.param_groups]))
        return opt

    monkeypatch.setattr(train_mod, "_make_optimizer", make)
    return seen


def _record_lam(monkeypatch) -> list[dict]:
    """The network's lam at every training step."""
    seen: list[dict] = []
    original = train_mod.GatedNetwork.objective

    def objective(self, *args, **kwargs):
        seen.append(dict(self.lam))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(train_mod.GatedNetwork, "objective", objective)
    return seen


def test_resume_with_a_smaller_lr_and_lam_trains_with_them(tmp_path, monkeypatch):
    train(tiny(tmp_path, epochs=1))
    lrs, lams = _record_step_lrs(monkeypatch), _record_lam(monkeypatch)
    summary = train(tiny(tmp_path, epochs=2, lr=5e-4, lam=0.02, resume=True))
    assert len(lrs) == math.ceil(200 / 50) and all(lr == [5e-4, 5e-4] for lr in lrs)
    assert lams and all(set(lam.values()) == {0.02} for lam in lams)
    change = {"lr": [1e-3, 5e-4], "gate_lr": [1e-3, 5e-4], "lam": [0.05, 0.02]}
    assert summary["setting_changes"] == [{"epoch": 2, **change}]
    assert summary["lr"] == 5e-4 and summary["lambda"] == 0.02
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    assert "setting_changes" not in rows[0] and rows[1]["setting_changes"] == change
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert [g["lr"] for g in ckpt["optimizer"]["param_groups"]] == [5e-4, 5e-4]
    # a later resume with the same values changes nothing and keeps the record
    lrs.clear()
    again = train(tiny(tmp_path, epochs=3, lr=5e-4, lam=0.02, resume=True))
    assert lrs and all(lr == [5e-4, 5e-4] for lr in lrs)
    assert again["setting_changes"] == summary["setting_changes"]


def test_resume_with_a_new_lr_continues_the_schedule_from_the_new_base(tmp_path, monkeypatch):
    class Stop(Exception):
        pass

    def stop(epoch, metrics):
        raise Stop

    config = tiny(tmp_path, epochs=3, lr_schedule="cosine", lr=1e-3, gate_lr=4e-3)
    with pytest.raises(Stop):  # interrupted after epoch 1 of 3
        train(config, epoch_callback=stop)
    lrs = _record_step_lrs(monkeypatch)
    train(dataclasses.replace(config, lr=5e-4, gate_lr=1e-3, resume=True))
    steps = math.ceil(200 / 50)
    for epoch in (2, 3):  # cosine over 3 epochs: base * (1 + cos(pi (epoch - 1) / 3)) / 2
        factor = (1 + math.cos(math.pi * (epoch - 1) / 3)) / 2
        for lr in lrs[(epoch - 2) * steps:(epoch - 1) * steps]:
            assert lr == pytest.approx([5e-4 * factor, 1e-3 * factor], rel=1e-12)
    assert len(lrs) == 2 * steps
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["scheduler"]["base_lrs"] == [5e-4, 1e-3]


def test_dense_only_resume_ignores_gate_settings(tmp_path):
    full = train_mod.train_dense(tiny(tmp_path, "full"))
    train_mod.train_dense(tiny(tmp_path, "split", epochs=1))
    resumed = train_mod.train_dense(tiny(tmp_path, "split", resume=True, lam=0.3, k=3.0,
                                         estimator="disarm", init_drop_rate=0.1))
    assert resumed["test_error"] == full["test_error"]
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert "setting_changes" not in resumed
    with pytest.raises(ConfigError, match="other settings.*batch_size"):
        train_mod.train_dense(tiny(tmp_path, "split", resume=True, batch_size=40))
    # the dense network has no gates: only its lr counts as a change
    again = train_mod.train_dense(tiny(tmp_path, "split", epochs=3, resume=True, lr=5e-4,
                                       lam=0.3, gate_lr=0.1))
    assert again["setting_changes"] == [{"epoch": 3, "lr": [1e-3, 5e-4]}]


def _break(monkeypatch, module, name):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(module, name, broken)


def test_fresh_run_removes_the_previous_runs_outputs(tmp_path, monkeypatch):
    pytest.importorskip("applications.sparsify.export")
    from applications.sparsify import export as export_mod
    from applications.sparsify import results as results_mod

    out = tmp_path / "run"
    train(tiny(tmp_path, epochs=1, baseline="dense"))
    assert (out / "exported" / "spec.json").exists() and (out / "summary.png").exists()
    (out / "dense" / "notes.txt").write_text("mine")
    # a new run whose export and plot fail: nothing of the earlier run may pass for its own
    _break(monkeypatch, export_mod, "export")
    _break(monkeypatch, results_mod, "plot_run")
    with pytest.warns(RuntimeWarning, match="boom"):
        summary = train(tiny(tmp_path, epochs=1, lam=0.01))
    assert "exported" not in summary
    assert not (out / "exported").exists() and not (out / "summary.png").exists()
    assert sorted(p.name for p in (out / "dense").iterdir()) == ["notes.txt"]  # not ours
    assert json.loads((out / "summary.json").read_text()) == summary
    # a resume replaces the export at the end; a failed one must not leave the old one
    monkeypatch.undo()
    train(tiny(tmp_path, epochs=1))
    assert (out / "exported" / "spec.json").exists()
    _break(monkeypatch, export_mod, "export")
    with pytest.warns(RuntimeWarning, match="boom"):
        train(tiny(tmp_path, epochs=2, resume=True))
    assert not (out / "exported").exists()


def test_config_error_leaves_the_previous_run_alone(tmp_path):
    out = tmp_path / "run"
    train(tiny(tmp_path, epochs=1, baseline="dense"))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for bad in ({"lam": {"2": 0.1}}, {"model_options": {"hidden": [0]}}):
        with pytest.raises(ConfigError):
            train(tiny(tmp_path, epochs=1, **bad))
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_estimator_options_override_the_defaults(tmp_path):
    train(tiny(tmp_path, epochs=1, estimator_options={"validate_args": True}))
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["estimator_state"]
    assert state["_validate_args"] is True
    with pytest.raises(ConfigError, match="estimator_options cannot set 'generator'"):
        train(tiny(tmp_path, "other", estimator_options={"generator": None}))
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"x": torch.float64}, r"inputs must have the model's dtype torch.float32; "
                               r"got torch.float64"),
        ({"y": 4}, r"labels must be class indices 0 \.\. 1 for a model with 2 outputs; "
                   r"got labels up to 4"),
        ({"features": 5}, r"cannot take the data's inputs of shape \(5,\)"),
    ],
)
def test_own_data_that_does_not_fit_the_model_is_a_config_error(tmp_path, change, match):
    from torch import nn
    from torch.utils.data import TensorDataset

    torch.manual_seed(0)
    mine = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
    train_ds, test_ds = _toy_data(features=change.get("features", 6))
    x, y = train_ds.tensors
    if "x" in change:
        x = x.to(change["x"])
    if "y" in change:
        y = y.clone()
        y[0] = change["y"]
    config = tiny(tmp_path, model="mine", dataset="toy", model_options={}, limit=None)
    with pytest.raises(ConfigError, match=match):
        train(config, module=mine, data=(TensorDataset(x, y), test_ds))


def test_cli_errors_are_one_line_and_keep_the_previous_run(tmp_path, capsys):
    from applications.cli import main

    args = ["sparsify", "--limit", "100", "--batch-size", "50", "--model-options",
            '{"hidden": [12]}', "--no-progress", "--device", "cpu", "--out",
            str(tmp_path / "run"), "--estimator-options", '{"validate_args": true}']
    assert main([*args, "--epochs", "2"]) == 0
    summary = (tmp_path / "run" / "summary.json").read_text()
    capsys.readouterr()
    for extra, needle in (
        (["--epochs", "1", "--resume"], "has 2 finished epochs, more than --epochs 1"),
        (["--lam", "2=0.1"], "lam names unknown gated layers ['2']"),
        (["--estimator-options", '{"generator": 1}'], "cannot set 'generator'"),
    ):
        assert main([*args, *extra]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("binopt: error: "), err
        assert needle in err[0]
        assert (tmp_path / "run" / "summary.json").read_text() == summary


# ------------------------------------------------------------------ data on the device
def _numbered_data(n: int = 23):
    from torch.utils.data import TensorDataset

    x = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3)  # row i holds 3i .. 3i+2
    return TensorDataset(x, torch.arange(n) * 7)


def _batches(loader, sampler, epoch):
    sampler.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_device_batches_are_the_data_loaders(monkeypatch, world):
    from applications.sparsify.distributed import DistributedContext

    ds = _numbered_data()
    for rank in range(world):
        monkeypatch.setattr(train_mod, "_CTX", DistributedContext(rank=rank, world_size=world))
        ref_loader, ref_sampler = train_mod._loader(ds, 7, seed=5)
        assert isinstance(ref_loader, torch.utils.data.DataLoader)  # CPU data: unchanged
        with monkeypatch.context() as m:
            m.setattr(train_mod, "_on_accelerator", lambda ds: True)
            loader, sampler = train_mod._loader(ds, 7, seed=5)
        assert isinstance(loader, train_mod._DeviceBatches)
        assert len(loader) == len(ref_loader) == 4
        for epoch in (1, 2, 3, 4):
            got, want = _batches(loader, sampler, epoch), _batches(ref_loader, ref_sampler, epoch)
            assert len(got) == len(want)
            for (x, y), (x0, y0) in zip(got, want):
                assert torch.equal(x, x0) and torch.equal(y, y0)
                assert torch.equal(x[:, 0] / 3 * 7, y.float())  # rows stay paired
        assert got != []


class _RecordingTensor(torch.Tensor):
    """Records the index types of ``__getitem__`` and ``index_select`` on the data."""

    calls: list[tuple[str, type]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.__getitem__:
            cls.calls.append(("getitem", type(args[1])))
        elif func in (torch.Tensor.index_select, torch.index_select):
            index = args[2] if len(args) > 2 else kwargs["index"]
            cls.calls.append(("index_select", type(index)))
        return super().__torch_function__(func, types, args, kwargs)


def test_device_batches_index_with_device_tensor_slices_not_lists(monkeypatch):
    from torch.utils.data import TensorDataset

    base = _numbered_data(20)
    ds = TensorDataset(*(t.as_subclass(_RecordingTensor) for t in base.tensors))
    _RecordingTensor.calls = []
    loader, sampler = train_mod._loader(ds, 6, seed=1)
    _batches(loader, sampler, 1)
    # the recorder sees what a DataLoader does: one list index per step and tensor
    assert _RecordingTensor.calls == [("getitem", list)] * 8
    monkeypatch.setattr(train_mod, "_on_accelerator", lambda ds: True)
    _RecordingTensor.calls = []
    loader, sampler = train_mod._loader(ds, 6, seed=1)
    for epoch in (1, 2):
        _batches(loader, sampler, epoch)
    assert _RecordingTensor.calls == [("index_select", torch.Tensor)] * 16


def test_device_batches_read_no_value_from_the_device():
    """On the meta device any read of a value (``tolist``, ``item``, a copy to the host)
    raises, so a full pass shows that no step reads the device."""
    from torch.utils.data import TensorDataset

    from applications.sparsify.distributed import ShardedBatchSampler

    ds = TensorDataset(torch.empty(23, 1, 4, 4, device="meta"),
                       torch.empty(23, dtype=torch.long, device="meta"))
    assert train_mod._on_accelerator(ds)
    sampler = ShardedBatchSampler(23, 7, seed=0, rank=1, world_size=2)
    sampler.set_epoch(1)
    sizes = [(x.shape, y.shape, x.device.type) for x, y in train_mod._DeviceBatches(
        ds.tensors, sampler)]
    assert sizes == [((n, 1, 4, 4), (n,), "meta") for n in (3, 3, 3, 1)]


def test_training_on_device_batches_gives_the_same_result(tmp_path, monkeypatch):
    ref = train(tiny(tmp_path, "loader"))
    monkeypatch.setattr(train_mod, "_on_accelerator", lambda ds: True)
    got = train(tiny(tmp_path, "device"))
    a = load_checkpoint(tmp_path / "loader" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "device" / "checkpoint.pt")
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    assert _strip_times(a["history"]) == _strip_times(b["history"])
    assert got["test_error"] == ref["test_error"]


# ------------------------------------------------------- resume on another device type
def _fake_other_device(path, *, stored: str | None) -> None:
    """Give the checkpoint at ``path`` a 16-byte gate generator state, as a CUDA run writes
    (``stored``: its recorded device type; ``None``: a checkpoint of an earlier version)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    rng = ckpt["rng"]
    if rng["estimator"] is not None:
        rng["estimator"] = torch.arange(16, dtype=torch.uint8)
    if stored is None:
        rng.pop("device")
        rng.pop("estimator_device")
    else:
        rng["device"] = stored
        rng["estimator_device"] = stored if rng["estimator"] is not None else None
    torch.save(ckpt, path)


@pytest.mark.parametrize("stored", ["cuda", None])
def test_resume_on_another_device_type_warns_and_reseeds(tmp_path, capsys, stored):
    import shutil

    train(tiny(tmp_path, "cuda", baseline="dense", epochs=1))
    for ckpt in ("checkpoint.pt", "dense/checkpoint.pt"):
        _fake_other_device(tmp_path / "cuda" / ckpt, stored=stored)
    shutil.copytree(tmp_path / "cuda", tmp_path / "again")
    shutil.copytree(tmp_path / "cuda", tmp_path / "finished")
    capsys.readouterr()
    runs = [train(tiny(tmp_path, name, baseline="dense", epochs=2, resume=True))
            for name in ("cuda", "again")]
    lines = capsys.readouterr().err.splitlines()
    # once per run, although both phases moved
    assert len(lines) == 2 and lines[0].startswith("binopt: warning: ")
    assert "written on cuda" in lines[0] and "continues on cpu" in lines[0]
    assert "differ from those of an uninterrupted run" in lines[0]
    assert runs[0]["setting_changes"] == [{"epoch": 2, "device": ["cuda", "cpu"]}]
    # an earlier version's dense checkpoint has no gate generator to tell its device type:
    # its (CPU) global state loads, so it resumes as on the same device type
    dense_moved = [{"epoch": 2, "device": ["cuda", "cpu"]}] if stored else None
    assert runs[0].get("dense_setting_changes") == dense_moved
    # deterministic: the same checkpoint resumed twice gives the same run
    for ckpt in ("checkpoint.pt", "dense/checkpoint.pt"):
        a = load_checkpoint(tmp_path / "cuda" / ckpt)
        b = load_checkpoint(tmp_path / "again" / ckpt)
        for name in a["model"]:
            assert torch.equal(a["model"][name], b["model"][name]), name
        assert a["rng"]["device"] == "cpu"
    # nothing left to train: nothing random happens, no warning
    train(tiny(tmp_path, "finished", baseline="dense", epochs=1, resume=True))
    assert capsys.readouterr().err == ""


def test_resume_reseeding_follows_the_seed_and_epoch(tmp_path):
    """The reseeded gate generator is ``_resume_seed(seed, finished epochs)``: resuming with
    the generator moved to that state by hand gives the same run."""
    import shutil

    train(tiny(tmp_path, "a", epochs=1))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    _fake_other_device(tmp_path / "a" / "checkpoint.pt", stored="cuda")
    ckpt = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    seeds = {s: train_mod._resume_seed(0, 1, s) for s in ("estimator", "torch")}
    assert len(set(seeds.values())) == 2 and all(0 <= v < 2**64 for v in seeds.values())
    ckpt["rng"]["estimator"] = torch.Generator().manual_seed(seeds["estimator"]).get_state()
    ckpt["rng"]["torch"] = torch.Generator().manual_seed(seeds["torch"]).get_state()
    torch.save(ckpt, tmp_path / "b" / "checkpoint.pt")
    train(tiny(tmp_path, "a", epochs=2, resume=True))
    train(tiny(tmp_path, "b", epochs=2, resume=True))
    a, b = (load_checkpoint(tmp_path / n / "checkpoint.pt") for n in ("a", "b"))
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def test_unloadable_random_state_on_the_same_device_type_warns(tmp_path, capsys):
    train(tiny(tmp_path, epochs=1))
    _fake_other_device(tmp_path / "run" / "checkpoint.pt", stored="cpu")
    capsys.readouterr()
    summary = train(tiny(tmp_path, epochs=2, resume=True))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "cannot restore the random state" in err[0]
    assert "setting_changes" not in summary


def test_checkpoint_of_an_earlier_version_resumes_exactly(tmp_path):
    """Without the stored device type a CPU state is recognised by its size and restored."""
    full = train(tiny(tmp_path, "full"))
    train(tiny(tmp_path, "split", epochs=1))
    path = tmp_path / "split" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["rng"]["device"] == ckpt["rng"]["estimator_device"] == "cpu"
    del ckpt["rng"]["device"], ckpt["rng"]["estimator_device"]
    torch.save(ckpt, path)
    resumed = train(tiny(tmp_path, "split", epochs=2, resume=True))
    assert resumed["test_error"] == full["test_error"] and "setting_changes" not in resumed
    a, b = (load_checkpoint(tmp_path / n / "checkpoint.pt") for n in ("full", "split"))
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name


def test_cuda_random_state_is_the_run_devices_own(monkeypatch):
    """A checkpoint keeps the CUDA state of the run's device and a resumed run puts it on
    ITS device: under torchrun rank 0 saves and every rank restores, so rank 3 must get rank
    0's own-device state, not the untouched state rank 0's process has for device 3.
    (``torch.cuda`` is faked: the logic is what is tested, on machines without a GPU.)"""
    states = {i: torch.full((16,), i, dtype=torch.uint8) for i in range(4)}
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        lambda device="cuda": states[torch.device(device).index].clone())
    monkeypatch.setattr(torch.cuda, "get_rng_state_all",
                        lambda: [s.clone() for s in states.values()])

    def set_state(state, device="cuda"):
        restored[torch.device(device).index] = state.clone()

    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all",
                        lambda all_: restored.update(enumerate(all_)))
    saved = train_mod._rng_state(None, torch.device("cuda", 0))
    assert torch.equal(saved["cuda"], states[0])
    for rank in (0, 3):  # every rank restores the same file on its own device
        restored.clear()
        train_mod._restore_rng(saved, None, torch.device("cuda", rank), 0, 1, None, Path("."))
        assert list(restored) == [rank] and torch.equal(restored[rank], states[0])
    # a CPU run stores no CUDA state and leaves the GPUs' generators alone
    assert train_mod._rng_state(None, torch.device("cpu"))["cuda"] is None
    restored.clear()
    on_cpu = dict(saved, device="cpu")  # (a CUDA checkpoint would reseed: tested above)
    train_mod._restore_rng(on_cpu, None, torch.device("cpu"), 0, 1, None, Path("."))
    assert restored == {}
    # an older checkpoint (every device's state) still restores as before
    old = dict(saved, cuda=[s.clone() for s in states.values()])
    train_mod._restore_rng(old, None, torch.device("cuda", 2), 0, 1, None, Path("."))
    assert sorted(restored) == [0, 1, 2, 3] and torch.equal(restored[2], states[2])
