"""``binopt tune`` argument checks: one line and exit code 2, before any trial.

The negative counts and seeds below ended in a traceback from numpy or optuna (after the
study was created), ``--heartbeat inf`` in one from the heartbeat thread, and
``--startup-trials -1``, ``--threads 0`` and ``--weight inf`` were silently accepted.
"""

from __future__ import annotations

import pytest

from applications.cli import main

from .conftest import TINY


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--seed", "-1"], "--seed must be >= 0; got -1"),
        (["--worker-index", "-1"], "--worker-index must be >= 0; got -1"),
        (["--startup-trials", "-1"], "--startup-trials must be >= 0; got -1"),
        (["--mode", "target", "--pruner-warmup", "-1"], "--pruner-warmup must be >= 0; got -1"),
        (["--mode", "target", "--pruner-startup", "-1"], "--pruner-startup must be >= 0; got -1"),
        (["--threads", "0"], "--threads must be >= 1; got 0"),
        (["--heartbeat", "inf"], "--heartbeat must be a positive number of seconds"),
        (["--mode", "target", "--weight", "inf"], "--weight must be a finite number >= 0"),
        # the training seed is --train-seed here (--seed is the sampler's)
        (["--train-seed", "-1"], "--train-seed must be >= 0; got -1"),
        (["--batch-size", "0"], "--batch-size must be >= 1; got 0"),
        (["--limit", "1"], "--limit must be >= 2; got 1"),
        (["--model-options", "[1]"], "--model-options must be a JSON object; got '[1]'"),
    ],
)
def test_bad_arguments_are_one_line_before_any_trial(extra, message, tmp_path, capsys):
    rc = main(["tune", *TINY, "--trials", "1", "--out", str(tmp_path / "study"), "--quiet",
               *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("binopt: error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err, err
    assert not (tmp_path / "study" / "trials").exists()
