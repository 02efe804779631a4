"""Both study modes, failed trials and the report, in-process with real (tiny) training."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

import applications.sparsify.train as train_mod
from applications.cli import main
from applications.errors import UserError
from applications.tune.report import pareto_front
from applications.tune.study import is_stale, resolve_storage

from .conftest import TINY, load


@pytest.fixture(scope="module")
def pareto_study(tmp_path_factory) -> dict:
    """A 3-trial Pareto study (shared by the tests that only read it)."""
    out = tmp_path_factory.mktemp("pareto")
    storage = f"journal:{out / 'study.log'}"
    rc = main(["tune", *TINY, "--trials", "3", "--storage", storage, "--study-name", "p",
               "--out", str(out), "--quiet"])
    assert rc == 0
    return {"out": out, "storage": storage, "name": "p"}


def test_pareto_mode(pareto_study):
    study = load(pareto_study["storage"], "p")
    assert len(study.directions) == 2
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == [0, 1, 2]
    assert all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        a = t.user_attrs
        # objective = validation error and FLOPs kept; the test error is only recorded
        assert t.values == [a["val_error"], a["flops_kept_fraction"]]
        assert 0 <= a["test_error"] <= 1 and 0 <= a["params_kept_fraction"] <= 1
        assert a["architecture"] and a["config"]["validation_fraction"] == 0.2
        run = Path(a["run_dir"])
        assert (run / "summary.json").exists() and (run / "metrics.jsonl").exists()
        assert run.parent == pareto_study["out"] / "trials"
    # the Pareto set is non-dominated and matches optuna's
    best = {t.number for t in study.best_trials}
    out = pareto_study["out"]
    data = json.loads((out / "best_trials.json").read_text())
    assert {r["number"] for r in data["pareto"]} == best
    assert len(json.loads((out / "trials.json").read_text())["trials"]) == 3
    assert (out / "pareto.png").stat().st_size > 1000
    assert "| trial | architecture |" in (out / "pareto.md").read_text()


def test_report_reprints_without_running(pareto_study, monkeypatch, capsys, tmp_path):
    def forbidden(*args, **kwargs):
        raise AssertionError("--report must not train")

    monkeypatch.setattr(train_mod, "train", forbidden)
    rc = main(["tune", "--report", "--storage", pareto_study["storage"], "--out",
               str(tmp_path), "--no-html"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "Pareto set" in text and "| trial | architecture |" in text
    for name in ("pareto.md", "pareto.png", "best_trials.json", "trials.json"):
        assert (tmp_path / name).exists()
    assert len(load(pareto_study["storage"], "p").trials) == 3


def test_report_errors(tmp_path, capsys):
    assert main(["tune", "--report", "--storage", str(tmp_path / "none.log")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no study storage" in err[0]


def test_resume_rejects_other_mode(pareto_study, capsys):
    rc = main(["tune", *TINY, "--trials", "3", "--storage", pareto_study["storage"],
               "--study-name", "p", "--mode", "target", "--out", str(pareto_study["out"])])
    assert rc == 2
    assert "directions" in capsys.readouterr().err


def test_resume_finished_study_runs_nothing(pareto_study, monkeypatch):
    monkeypatch.setattr(train_mod, "train", lambda *a, **k: pytest.fail("trained"))
    rc = main(["tune", *TINY, "--trials", "3", "--storage", pareto_study["storage"],
               "--study-name", "p", "--out", str(pareto_study["out"]), "--quiet"])
    assert rc == 0
    assert len(load(pareto_study["storage"], "p").trials) == 3


def _wrap_train(monkeypatch, hook):
    """Replace train by the real one with ``hook(trial_folder, epoch, metrics)`` per epoch."""
    real = train_mod.train

    def wrapped(config, *, epoch_callback=None):
        folder = Path(config.out).name

        def callback(epoch, metrics):
            metrics = hook(folder, epoch, dict(metrics)) or metrics
            if epoch_callback is not None:
                epoch_callback(epoch, metrics)

        return real(config, epoch_callback=callback)

    monkeypatch.setattr(train_mod, "train", wrapped)


def test_target_mode_reports_and_prunes(tmp_path, monkeypatch):
    # trials 1 and 2 look much worse than trial 0 after epoch 1: the median pruner stops them
    def hook(folder, epoch, metrics):
        if folder != "0000":
            metrics["val_error"] = 0.99
        return metrics

    _wrap_train(monkeypatch, hook)
    storage = f"journal:{tmp_path / 'study.log'}"
    rc = main(["tune", *TINY, "--epochs", "2", "--trials", "3", "--storage", storage,
               "--study-name", "t", "--out", str(tmp_path), "--mode", "target",
               "--budget", "1.0", "--pruner", "median", "--pruner-startup", "1",
               "--pruner-warmup", "0", "--quiet"])
    assert rc == 0
    study = load(storage, "t")
    assert len(study.directions) == 1
    states = {t.number: t.state for t in study.trials}
    assert states == {0: TrialState.COMPLETE, 1: TrialState.PRUNED, 2: TrialState.PRUNED}
    t0 = study.trials[0]
    assert sorted(t0.intermediate_values) == [1, 2]
    assert t0.value == pytest.approx(t0.user_attrs["val_error"])  # budget 100%: feasible
    for t in study.trials[1:]:
        assert t.user_attrs["pruned_at_epoch"] == 1 and list(t.intermediate_values) == [1]
        lines = (Path(t.user_attrs["run_dir"]) / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 1  # training stopped after the first epoch
    best = json.loads((tmp_path / "best_trials.json").read_text())["best"]
    assert best["number"] == 0


def test_target_value_budget_and_mix():
    from applications.tune.study import TuneSettings, target_value

    s = TuneSettings(storage="journal:/x", study_name="x", mode="target", budget=0.1)
    assert target_value(0.05, 0.08, s) == 0.05
    assert target_value(0.01, 0.3, s) == pytest.approx(1.2)  # infeasible loses to feasible
    s = TuneSettings(storage="journal:/x", study_name="x", mode="target", weight=0.5)
    assert target_value(0.05, 0.2, s) == pytest.approx(0.15)


def test_failed_trials_are_recorded_and_the_study_goes_on(tmp_path, monkeypatch):
    real = train_mod.train

    def flaky(config, *, epoch_callback=None):
        name = Path(config.out).name
        if name == "0000":
            raise RuntimeError("boom")
        summary = real(config, epoch_callback=epoch_callback)
        if name == "0001":
            summary["val_error"] = math.nan
        return summary

    monkeypatch.setattr(train_mod, "train", flaky)
    storage = f"journal:{tmp_path / 'study.log'}"
    rc = main(["tune", *TINY, "--trials", "3", "--storage", storage, "--study-name", "f",
               "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    trials = load(storage, "f").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]
    assert "RuntimeError: boom" in trials[0].user_attrs["error"]
    assert "val_error" in trials[1].user_attrs["error"]
    assert not any(t.user_attrs.get("binopt_interrupted") for t in trials)


@pytest.mark.parametrize("per_layer", [[], ["--lam-per-layer"]], ids=["global", "per-layer"])
@pytest.mark.parametrize("root_kind", ["missing", "file"])
def test_unloadable_data_stops_before_any_trial(tmp_path, monkeypatch, capsys, per_layer,
                                                root_kind):
    """A wrong --data-root used to fail every trial (exit 0, budget used up) or, with
    --lam-per-layer, end in a traceback."""
    monkeypatch.setattr(train_mod, "train", lambda *a, **k: pytest.fail("trained"))
    root = tmp_path / "data"
    if root_kind == "file":
        root.write_text("not a folder")
    log = tmp_path / "out" / "study.log"
    rc = main(["tune", *TINY, "--dataset", "mnist", "--data-root", str(root), "--trials", "3",
               "--storage", f"journal:{log}", "--study-name", "d", "--out",
               str(tmp_path / "out"), "--quiet", *per_layer])
    assert rc == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"binopt: error: cannot load the data of --dataset mnist "
                           f"--data-root {root}: MNIST files not found")
    problem = "is not a folder" if root_kind == "file" else "does not exist"
    assert f"({root} {problem})" in line
    assert not log.exists()  # no study, so no trial used up the budget


def _failing_train(monkeypatch, exc: Exception) -> list[str]:
    """Make every training raise ``exc``; returns the trial folders it was called for."""
    calls: list[str] = []

    def failing(config, *, epoch_callback=None):
        calls.append(Path(config.out).name)
        raise exc

    monkeypatch.setattr(train_mod, "train", failing)
    return calls


def test_no_complete_trial_exits_non_zero_and_says_how_to_go_on(tmp_path, monkeypatch,
                                                                   capsys):
    storage = f"journal:{tmp_path / 'study.log'}"
    args = ["tune", *TINY, "--trials", "2", "--storage", storage, "--study-name", "n",
            "--out", str(tmp_path), "--quiet"]
    real = train_mod.train
    calls = _failing_train(monkeypatch, RuntimeError("boom"))
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "(no complete trial)" in captured.out  # the report is still written
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("binopt: error: no trial of study 'n' completed (2 fail; first "
                           "error: RuntimeError: boom)")
    assert "(2 of 2 used)" in line and "raise --trials above 2" in line
    # the failed trials use up the budget: the same command trains nothing and fails again
    assert main(args) == 1 and calls == ["0000", "0001"]
    assert len(load(storage, "n").trials) == 2
    # as the message says, a larger --trials adds trials
    monkeypatch.setattr(train_mod, "train", real)
    args[args.index("--trials") + 1] = "3"
    assert main(args) == 0
    assert [t.state for t in load(storage, "n").trials] == [
        TrialState.FAIL, TrialState.FAIL, TrialState.COMPLETE]


def test_user_error_in_a_trial_stops_the_worker_and_keeps_the_budget(tmp_path, monkeypatch,
                                                                      capsys):
    storage = f"journal:{tmp_path / 'study.log'}"
    args = ["tune", *TINY, "--trials", "2", "--storage", storage, "--study-name", "u",
            "--out", str(tmp_path), "--quiet"]
    real = train_mod.train
    calls = _failing_train(monkeypatch, train_mod.ConfigError("cannot create output folder X"))
    assert main(args) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "binopt: error: cannot create output folder X"]
    assert calls == ["0000"]  # the second trial would fail alike: not tried
    (failed,) = load(storage, "u").trials
    assert failed.state == TrialState.FAIL and failed.user_attrs["binopt_user_error"]
    assert "cannot create output folder X" in failed.user_attrs["error"]
    # once the cause is fixed, the same command runs both trials
    monkeypatch.setattr(train_mod, "train", real)
    assert main(args) == 0
    trials = load(storage, "u").trials
    assert [t.state for t in trials] == [TrialState.FAIL, *[TrialState.COMPLETE] * 2]


def test_user_error_in_a_retry_queues_the_retry_again(tmp_path, monkeypatch):
    from applications.tune.study import open_storage

    storage = f"journal:{tmp_path / 'study.log'}"
    study = optuna.create_study(storage=open_storage(storage), study_name="r",
                                directions=["minimize", "minimize"])
    attrs = {"binopt_retry_of": 7, "binopt_run_dir": str(tmp_path / "trials" / "0007")}
    study.enqueue_trial({"lam": 0.1, "estimator": "arm"}, user_attrs=attrs)
    _failing_train(monkeypatch, train_mod.ConfigError("disk full"))
    rc = main(["tune", *TINY, "--trials", "1", "--storage", storage, "--study-name", "r",
               "--out", str(tmp_path), "--quiet"])
    assert rc == 2
    failed, queued = load(storage, "r").trials
    assert failed.state == TrialState.FAIL and failed.user_attrs["binopt_user_error"]
    assert queued.state == TrialState.WAITING
    assert {k: queued.user_attrs[k] for k in attrs} == attrs
    assert queued.system_attrs["fixed_params"] == failed.params


def test_missing_optuna_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optuna", None)
    assert main(["tune", "--trials", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # binopt is installed from a checkout, not from PyPI ('binopt[tune]')
    assert len(err) == 1 and "pip install -e '.[tune]'" in err[0]


def test_storage_specs(tmp_path):
    assert resolve_storage(None, tmp_path) == f"journal:{(tmp_path / 'study.log').resolve()}"
    assert resolve_storage(str(tmp_path / "a.jsonl"), tmp_path).startswith("journal:/")
    assert resolve_storage("sqlite:///s.db", tmp_path) == "sqlite:///s.db"
    assert resolve_storage("postgresql://u:p@h/db", tmp_path) == "postgresql://u:p@h/db"
    with pytest.raises(UserError):
        resolve_storage("study.db", tmp_path)


def test_sqlite_storage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["tune", *TINY, "--trials", "1", "--storage", "sqlite:///s.db",
               "--study-name", "q", "--out", str(tmp_path / "o"), "--quiet"])
    assert rc == 0
    assert len(optuna.load_study(study_name="q", storage="sqlite:///s.db").trials) == 1


def test_bad_arguments_are_user_errors(tmp_path, capsys):
    for extra in (["--lam", "2:1"], ["--estimator", "nope"], ["--validation-fraction", "0"],
                  ["--storage", "study.db"], ["--hidden", "a"]):
        rc = main(["tune", *TINY, "--trials", "1", "--out", str(tmp_path), *extra])
        assert rc == 2, extra
        assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_stale_detection():
    import datetime
    import os

    from optuna.trial import create_trial

    from applications.tune.study import PID_NAMESPACE

    def running(attrs):
        t = create_trial(state=TrialState.RUNNING, user_attrs=attrs)
        t.datetime_start = datetime.datetime.now()
        return t

    now = 1e9
    me = {"pid": os.getpid(), "ns": PID_NAMESPACE}
    assert not is_stale(running({"binopt_worker": me, "binopt_heartbeat": 0}), 5, now)
    dead = {"pid": 2**22 + 12345, "ns": PID_NAMESPACE}
    assert is_stale(running({"binopt_worker": dead, "binopt_heartbeat": now}), 5, now)
    # another machine (or container): only the heartbeat tells
    other = {"pid": 2**22 + 12345, "ns": "elsewhere"}
    assert not is_stale(running({"binopt_worker": other, "binopt_heartbeat": now - 4}), 5, now)
    assert is_stale(running({"binopt_worker": other, "binopt_heartbeat": now - 6}), 5, now)


def test_pareto_front_function():
    def r(n, e, k):
        return {"number": n, "state": "COMPLETE", "val_error": e, "flops_kept_fraction": k}

    recs = [r(0, 0.1, 0.5), r(1, 0.05, 0.6), r(2, 0.2, 0.6), r(3, 0.1, 0.5), r(4, 0.3, 0.01)]
    assert [x["number"] for x in pareto_front(recs)] == [4, 0, 3, 1]


def test_per_layer_lambda_study(tmp_path):
    storage = f"journal:{tmp_path / 'study.log'}"
    rc = main(["tune", *TINY, "--trials", "1", "--storage", storage, "--study-name", "l",
               "--out", str(tmp_path), "--lam-per-layer", "--estimator", "arm", "--quiet"])
    assert rc == 0
    (trial,) = load(storage, "l").trials
    assert trial.state == TrialState.COMPLETE
    assert {"lam[1]", "lam[3]"} <= set(trial.params)  # the gated layers of 784-16-10
    assert trial.user_attrs["config"]["lam"] == {
        "1": trial.params["lam[1]"], "3": trial.params["lam[3]"]}
