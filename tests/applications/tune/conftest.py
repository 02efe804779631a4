"""Shared helpers of the ``binopt tune`` tests: a tiny budget and subprocess workers.

Every study here trains the real network (``applications.sparsify.train``) on tiny data:
300 MNIST digits, a 784-16-10 MLP, one or two epochs. Worker subprocesses run
``applications.cli.main`` through a small driver script that can slow each epoch down
(so that a test can kill a worker in the middle of a trial) and can wait for a "go" file
(so that two workers start their first trial together after paying their import costs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("optuna")

ROOT = Path(__file__).resolve().parents[3]

#: CLI arguments of a tiny study (add --trials, --storage/--out, --study-name).
TINY = [
    "--model", "mlp", "--dataset", "mnist5k", "--limit", "300", "--hidden", "16",
    "--epochs", "1", "--startup-trials", "2", "--heartbeat", "1", "--no-html",
    "--threads", "1",
]

DRIVER = textwrap.dedent(
    """
    import os, signal, sys, time

    # Ctrl-C as in a terminal, even when the tests run where SIGINT is ignored (a
    # background job): Python keeps an inherited SIG_IGN
    signal.signal(signal.SIGINT, signal.default_int_handler)

    # Pay the import and data-loading costs before the study starts.
    import torch  # noqa: F401
    import optuna  # noqa: F401
    import applications.sparsify.train as train_mod
    from applications.sparsify.data import load_dataset
    load_dataset("mnist5k", limit=300)

    sleep = float(os.environ.get("TUNE_TEST_EPOCH_SLEEP", "0"))
    real_train = train_mod.train

    def slow_train(config, *, epoch_callback=None):
        def callback(epoch, metrics):
            time.sleep(sleep)
            if epoch_callback is not None:
                epoch_callback(epoch, metrics)
        return real_train(config, epoch_callback=callback)

    if sleep > 0:  # also in the --jobs workers, which import this script again
        train_mod.train = slow_train
    if __name__ == "__main__":
        ready, go = os.environ.get("TUNE_TEST_READY"), os.environ.get("TUNE_TEST_GO")
        if ready:
            open(ready, "w").close()
        while go and not os.path.exists(go):
            time.sleep(0.05)
        from applications.cli import main
        sys.exit(main(sys.argv[1:]))
    """
)


@pytest.fixture
def driver(tmp_path: Path) -> Path:
    path = tmp_path / "tune_driver.py"
    path.write_text(DRIVER)
    return path


def start_worker(driver: Path, args: list[str], log: Path, *, new_session: bool = False,
                 **env: str) -> subprocess.Popen:
    """Start ``binopt tune ARGS`` in a subprocess through the driver script (in a process
    group of its own with ``new_session``, so that a test can signal it as a terminal's
    Ctrl-C would: the process and its workers)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    full_env.update(env)
    return subprocess.Popen(
        [sys.executable, str(driver), "tune", *args],
        cwd=str(ROOT), env=full_env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
        start_new_session=new_session,
    )


def load(storage: str, name: str):
    """Load a study (fresh storage object, so it sees other processes' writes)."""
    import optuna

    from applications.tune.study import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(storage))


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
