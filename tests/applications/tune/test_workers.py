"""Several workers on one journal file, and resuming after a killed worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from optuna.trial import TrialState

from applications.cli import main

from .conftest import ROOT, TINY, load, start_worker, wait_until


def _check_exact(study, n: int) -> None:
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)), "duplicated trial numbers"
    counted = [t for t in trials if not t.user_attrs.get("binopt_interrupted")]
    assert [t.state for t in counted] == [TrialState.COMPLETE] * n
    assert not any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials)
    run_dirs = [t.user_attrs["run_dir"] for t in counted]
    assert len(set(run_dirs)) == n, "two trials trained into one folder"


def test_two_worker_processes_share_a_journal_file(tmp_path):
    """``--jobs 2``: two spawned processes, one journal file, exactly N trials."""
    storage = f"journal:{tmp_path / 'study.log'}"
    rc = main(["tune", *TINY, "--trials", "4", "--jobs", "2", "--storage", storage,
               "--study-name", "j", "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    study = load(storage, "j")
    _check_exact(study, 4)
    assert len(study.trials) == 4
    workers = {t.user_attrs["binopt_worker"]["worker"] for t in study.trials}
    pids = {t.user_attrs["binopt_worker"]["pid"] for t in study.trials}
    assert workers == {0, 1} and len(pids) == 2
    assert (tmp_path / "pareto.png").exists()


def test_killed_worker_resumes(tmp_path, driver):
    """Kill a worker in the middle of its second trial; a restart finishes exactly N."""
    storage = f"journal:{tmp_path / 'study.log'}"
    args = [*TINY, "--epochs", "2", "--trials", "3", "--storage", storage,
            "--study-name", "k", "--out", str(tmp_path)]
    proc = start_worker(driver, args, tmp_path / "w1.log", TUNE_TEST_EPOCH_SLEEP="1.0")
    try:
        def second_trial_after_one_epoch() -> bool:
            if proc.poll() is not None:
                raise AssertionError("worker exited early: " + (tmp_path / "w1.log").read_text())
            if not Path(storage[len("journal:"):]).exists():
                return False
            trials = load(storage, "k").trials
            done = [t for t in trials if t.state == TrialState.COMPLETE]
            running = [t for t in trials if t.state == TrialState.RUNNING]
            return bool(done and running
                        and (Path(running[0].user_attrs.get("run_dir", "/nonexistent"))
                             / "checkpoint.pt").exists())

        wait_until(second_trial_after_one_epoch, 60, "a completed trial and a running one")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = load(storage, "k").trials
    killed = [t for t in before if t.state == TrialState.RUNNING]
    assert len(killed) == 1 and len(before) == 2

    # restart the same command: the dead worker's trial is retried, the study completes
    rc = main(["tune", *args, "--quiet"])
    assert rc == 0
    study = load(storage, "k")
    _check_exact(study, 3)
    trials = {t.number: t for t in study.trials}
    dead = trials[killed[0].number]
    assert dead.state == TrialState.FAIL and dead.user_attrs["binopt_interrupted"]
    retry = [t for t in study.trials if t.user_attrs.get("binopt_retry_of") == dead.number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params == dead.params
    # same folder; training resumes from the checkpoint of the finished epoch (or, when the
    # checkpoint cannot be read, starts that folder afresh and says why)
    assert retry[0].user_attrs["run_dir"] == dead.user_attrs["run_dir"]
    a = retry[0].user_attrs
    assert a.get("resumed_after_epoch") == 1 or "resume_error" in a
    assert len(study.trials) == 4


def test_check_workers_warns_on_some_and_raises_on_all(capsys):
    from applications.errors import UserError
    from applications.tune.study import check_workers

    check_workers([("w0", 0), ("w1", 0)])
    assert capsys.readouterr().err == ""
    check_workers([("w0", 0), ("w1", 1)])
    assert "worker(s) exited with errors: [('w1', 1)]" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"all 2 worker processes failed"):
        check_workers([("w0", 2), ("w1", 2)])
    with pytest.raises(RuntimeError, match=r'if __name__ == "__main__"'):
        check_workers([("w0", 1), ("w1", 2)])


def test_run_study_from_an_unguarded_script_fails_loudly(tmp_path):
    """The Python example of docs/tune.md without its ``__main__`` guard: every spawned
    worker fails while bootstrapping. That used to return an empty study with exit code 0."""
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""
        from applications.tune import SearchSpace, TuneSettings, run_study
        settings = TuneSettings(
            storage="journal:{tmp_path / 'study.log'}", study_name="s", n_trials=2,
            out="{tmp_path / 'runs'}", space=SearchSpace(estimator=("arm",)),
            train={{"model": "mlp", "dataset": "mnist5k", "epochs": 1, "limit": 300}},
            jobs=2, threads=1,
        )
        run_study(settings)
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    assert "all 2 worker processes failed" in proc.stderr
    assert 'if __name__ == "__main__"' in proc.stderr


@pytest.mark.parametrize(
    ("jobs", "how"), [("2", "ctrl-c"), ("1", "sigterm")], ids=["ctrl-c-2-workers", "sigterm"]
)
def test_interrupt_records_running_trials_and_says_how_to_go_on(tmp_path, driver, jobs, how):
    """Ctrl-C at the terminal (SIGINT to the command and its workers) used to leave the
    workers' trials RUNNING, because the command killed its workers at once; SIGTERM (a
    scheduler's time limit) killed a single worker outright, with the same effect."""
    storage = f"journal:{tmp_path / 'study.log'}"
    args = [*TINY, "--epochs", "30", "--trials", "4", "--jobs", jobs, "--storage", storage,
            "--study-name", "i", "--out", str(tmp_path), "--quiet"]
    log = tmp_path / "run.log"
    proc = start_worker(driver, args, log, new_session=True, TUNE_TEST_EPOCH_SLEEP="0.5")
    try:
        def running() -> bool:
            if proc.poll() is not None:
                raise AssertionError("exited early: " + log.read_text())
            if not Path(storage[len("journal:"):]).exists():
                return False
            trials = load(storage, "i").trials
            return sum(t.state == TrialState.RUNNING for t in trials) == int(jobs)

        wait_until(running, 90, f"{jobs} running trial(s)")
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.terminate()
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = log.read_text()
    assert "Traceback" not in out, out
    assert "run the same command again to continue" in out
    trials = load(storage, "i").trials
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    interrupted = [t for t in trials if t.user_attrs.get("binopt_interrupted")]
    assert len(interrupted) == int(jobs)
    assert all(t.state == TrialState.FAIL for t in interrupted)
    retries = [t for t in trials if t.state == TrialState.WAITING]
    assert sorted(t.user_attrs["binopt_retry_of"] for t in retries) == sorted(
        t.number for t in interrupted)
