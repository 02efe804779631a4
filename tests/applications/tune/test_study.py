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
from applications.tune.space import SearchSpace
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
        # a pruned trial is not exported: its kept fraction is the per-epoch proxy, recorded
        # under its own name (it used to pass for the FLOPs kept)
        assert "flops_kept_fraction" not in t.user_attrs
        assert 0 <= t.user_attrs["gated_weights_kept_fraction"] <= 1
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


def test_stale_detection(monkeypatch):
    import datetime
    import os

    from optuna.trial import create_trial

    import applications.tune.study as study_mod
    from applications.tune.study import PID_NAMESPACE

    def running(attrs):
        t = create_trial(state=TrialState.RUNNING, user_attrs=attrs)
        t.datetime_start = datetime.datetime.now()
        return t

    now = 1e9
    # this process's own trial: alive while this process runs it, whatever its heartbeat
    me = {"pid": os.getpid(), "ns": PID_NAMESPACE, "token": "live"}
    monkeypatch.setattr(study_mod, "_LIVE_TRIALS", {"live"})
    assert not is_stale(running({"binopt_worker": me, "binopt_heartbeat": 0}), 5, now)
    # ... and gone once it no longer does (an earlier run in this process left it behind)
    left = {"pid": os.getpid(), "ns": PID_NAMESPACE, "token": "earlier"}
    assert is_stale(running({"binopt_worker": left, "binopt_heartbeat": now}), 5, now)
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


def _fake_train(calls: list | None = None):
    """A training stand-in that returns a fixed summary at once (and records its folders)."""

    def fake(config, *, epoch_callback=None):
        if calls is not None:
            calls.append(Path(config.out).name)
        if epoch_callback is not None:
            epoch_callback(1, {"val_error": 0.2, "gated_weights_kept_fraction": 0.5})
        return {"val_error": 0.2, "test_error": 0.25, "flops_kept_fraction": 0.4,
                "params_kept_fraction": 0.45, "architecture": "8-4", "out": config.out}

    return fake


def test_python_settings_get_the_documented_validation_fraction(tmp_path, monkeypatch):
    """``train`` without ``validation_fraction`` (as from Python) used to train without a
    validation split: every trial failed with ``val_error=None``."""
    from applications.tune.study import TuneSettings, run_study

    seen = []

    def fake(config, *, epoch_callback=None):
        seen.append(config.validation_fraction)
        return _fake_train()(config, epoch_callback=epoch_callback)

    monkeypatch.setattr(train_mod, "train", fake)
    settings = TuneSettings(
        storage=f"journal:{tmp_path / 'study.log'}", study_name="py", n_trials=1,
        out=str(tmp_path), train={"model": "mlp", "dataset": "mnist5k", "epochs": 1,
                                  "limit": 300}, verbose=False,
    )
    assert settings.train["validation_fraction"] == 0.2
    study = run_study(settings)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] and seen == [0.2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"space": {"lam": "0.1"}}, "space must be a SearchSpace; got dict"),
        ({"train": [("epochs", 1)]}, "train must be a dict of training settings"),
        ({"train": {"epoch": 1}}, "unknown training settings ['epoch']; the fixed settings "
                                  "of a study are model, dataset"),
        ({"train": {"validation_fraction": "0.2"}}, "--validation-fraction must lie"),
    ],
)
def test_python_settings_are_checked(kwargs, message):
    from applications.tune.study import TuneSettings

    with pytest.raises(UserError) as info:
        TuneSettings(storage="journal:/x", study_name="x", **kwargs)
    assert message in str(info.value)


def test_changed_training_settings_are_refused(pareto_study, monkeypatch, capsys):
    """A resumed study with other training settings used to go on with a vague warning,
    mixing trials trained differently (e.g. for 1 and for 2 epochs) on one front."""
    monkeypatch.setattr(train_mod, "train", lambda *a, **k: pytest.fail("trained"))
    base = ["tune", *TINY, "--trials", "3", "--storage", pareto_study["storage"],
            "--study-name", "p", "--out", str(pareto_study["out"]), "--quiet"]
    assert main([*base, "--epochs", "2", "--limit", "200"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        "binopt: error: study 'p' was created with other training settings: --epochs 1 "
        "(given: 2); --limit 300 (given: 200). Its trials and new ones would not be "
        "comparable: resume it with the settings it was created with, or pick another "
        "--study-name")
    # the machine may change (device, data folder), and the search space with a warning
    # that says what changed
    assert main([*base, "--device", "cpu", "--lam", "0.01:0.1"]) == 0
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("binopt tune: warning: the search space differs from the one "
                           "study 'p' was created with (lam 0.001:1 (log), now 0.01:0.1 (log))")
    assert len(load(pareto_study["storage"], "p").trials) == 3


def test_train_differences_fill_in_defaults():
    """A study made from Python with a few settings and resumed from the command line (which
    gives them all) has the same settings."""
    from applications.tune.study import train_differences

    cli = {"model": "mlp", "dataset": "mnist5k", "data_root": None, "epochs": 10,
           "batch_size": 100, "optimizer": "adam", "weight_decay": 0.0, "seed": 0,
           "device": "auto", "amp": False, "limit": None, "model_options": {},
           "validation_fraction": 0.2}
    assert train_differences({"model": "mlp", "epochs": 10}, cli) == []
    assert train_differences({"model": "mlp", "epochs": 10, "device": "cuda"},
                             {**cli, "model_options": {"hidden": [16]}}) == [
        '--model-options {} (given: {"hidden": [16]})']


def test_trial_left_running_by_this_process_is_retried(tmp_path, monkeypatch):
    """A trial that an earlier run in this very process left RUNNING (a notebook cell
    stopped between two steps) was taken for a live one: the study waited for it forever
    (or, without waiting, never ran its retry)."""
    import os

    from applications.tune.study import HOST, PID_NAMESPACE, TuneSettings, open_study, run_worker

    monkeypatch.setattr(train_mod, "train", _fake_train())
    settings = TuneSettings(storage=f"journal:{tmp_path / 'study.log'}", study_name="nb",
                            n_trials=1, out=str(tmp_path), wait=False, verbose=False,
                            space=SearchSpace(estimator=("arm",)))
    study = open_study(settings)
    left = study.ask()
    left.set_user_attr("binopt_worker", {"host": HOST, "pid": os.getpid(), "worker": 0,
                                         "ns": PID_NAMESPACE, "token": "an earlier run"})
    assert run_worker(settings, 0, study) == 1
    trials = load(settings.storage, "nb").trials
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[0].user_attrs["binopt_interrupted"]
    assert trials[1].user_attrs["binopt_retry_of"] == 0


def test_progress_lines(tmp_path, monkeypatch, capsys):
    """Each trial says when it starts, and when it ends how many of --trials are done."""
    monkeypatch.setattr(train_mod, "train", _fake_train())
    rc = main(["tune", *TINY, "--trials", "2", "--storage", f"journal:{tmp_path / 's.log'}",
               "--study-name", "g", "--out", str(tmp_path)])
    assert rc == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[tune w0]")]
    assert lines[0] == "[tune w0] trial 0 started"
    assert lines[1].startswith("[tune w0] trial 0 complete (1/2 done): val 20.00% test "
                               "25.00% flops kept 40.00% arch 8-4 (")
    assert lines[3].startswith("[tune w0] trial 1 complete (2/2 done)")


def _retrain(storage: str, number: int, tmp_path: Path, capsys) -> tuple[list[str], dict]:
    """Run the command ``binopt tune --command`` prints; returns it and its summary."""
    import shlex

    assert main(["tune", "--command", str(number), "--storage", storage]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    args = shlex.split(line)
    assert args[:2] == ["binopt", "sparsify"]
    out = tmp_path / "again"
    args[args.index("--out") + 1] = str(out)
    assert main([*args[1:], "--no-progress"]) == 0
    return args, json.loads((out / "summary.json").read_text())


def _same_network(trial, summary) -> None:
    a = trial.user_attrs
    for key in ("val_error", "test_error", "flops_kept_fraction", "architecture"):
        assert summary[key] == a[key], key


def test_command_trains_the_trial_again(pareto_study, tmp_path, capsys):
    """There was no way to get the exact ``binopt sparsify`` command of a trial."""
    study = load(pareto_study["storage"], "p")
    trial = study.trials[1]
    # the printed command writes next to the study, not into the trial's own folder
    assert main(["tune", "--command", "1", "--storage", pareto_study["storage"]]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.endswith(f"--out {pareto_study['out'] / 'retrain' / '0001'}")
    args, summary = _retrain(pareto_study["storage"], 1, tmp_path, capsys)
    _same_network(trial, summary)
    # the JSON files hold the command of every trial
    data = json.loads((pareto_study["out"] / "trials.json").read_text())
    assert data["trials"][1]["command"] == printed


def test_command_of_a_per_layer_hard_concrete_trial(tmp_path, capsys):
    storage = f"journal:{tmp_path / 'study.log'}"
    rc = main(["tune", *TINY, "--trials", "1", "--storage", storage, "--study-name", "h",
               "--out", str(tmp_path), "--lam-per-layer", "--estimator", "hard_concrete",
               "--quiet"])
    assert rc == 0
    capsys.readouterr()
    args, summary = _retrain(storage, 0, tmp_path, capsys)
    assert args[args.index("--lam") + 1].startswith("1=")  # one lambda per gated layer
    # hard concrete has its own gate: no parameterization options that would do nothing
    assert "--parameterization" not in args and "--k" not in args
    _same_network(load(storage, "h").trials[0], summary)


def test_command_errors(pareto_study, capsys):
    assert main(["tune", "--command", "7", "--storage", pareto_study["storage"]]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == ("binopt: error: --command takes a trial number of study 'p' (0 to 2); "
                    "got 7")


def test_every_training_setting_has_a_sparsify_option():
    """A new TrainConfig field must be added to the command (else it is not exact)."""
    import dataclasses

    from applications.tune.report import SPARSIFY_OPTIONS

    fields = {f.name for f in dataclasses.fields(train_mod.TrainConfig)}
    assert fields <= set(SPARSIFY_OPTIONS), sorted(fields - set(SPARSIFY_OPTIONS))


def test_plot_labels_coinciding_trials_and_marks_budget_and_best(monkeypatch, tmp_path):
    """Trials with the same results were labelled on top of each other; in target mode the
    plot showed neither the budget nor the chosen trial."""
    import matplotlib.figure

    from applications.tune.report import StudyReport, plot_pareto

    def rec(n, e, k):
        return {"number": n, "state": "COMPLETE", "val_error": e, "test_error": e,
                "flops_kept_fraction": k}

    records = [rec(0, 0.9, 0.001), rec(1, 0.2, 0.5), rec(2, 0.9, 0.001), rec(3, 0.3, 0.05)]
    rep = StudyReport(study_name="s", mode="target", kept="flops",
                      settings={"budget": 0.1, "weight": None}, records=records,
                      front=pareto_front(records), best=records[3], reference=None)
    figures = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda self, *a, **k: (figures.append(self), real(self, *a, **k)))
    plot_pareto(rep, tmp_path / "p.png")
    (ax,) = figures[0].axes
    assert sorted(t.get_text() for t in ax.texts) == ["0,2", "1", "3"]
    labels = ax.get_legend_handles_labels()[1]
    assert "budget (10.0% FLOPs)" in labels and "best trial (3)" in labels
    assert ax.get_xlabel() == "FLOPs kept (%)" and ax.get_ylabel() == "error (%)"
