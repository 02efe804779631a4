"""End-to-end tests of ``binopt variance`` and ``binopt toy`` through the dispatcher."""

from __future__ import annotations

import json
import re

import pytest
import torch

import binopt
from applications.cli import main

Z_BOUND = 4.0


def _row(text: str, setting: str, estimator: str) -> list[str]:
    block = text.split(f"at {setting}:")[1]
    for line in block.splitlines():
        if line.split() and line.split()[0] == estimator:
            return line.split()
    raise AssertionError(f"no row for {estimator} at {setting}")


def test_variance_toy_bar_agrees_with_exact_variance(tmp_path, capsys):
    """The issue's bar at a test-sized budget: phi = 0 and 2, p0 = 0.49, D = 1."""
    rc = main(
        [
            "variance",
            "--problem",
            "toy",
            "--p0",
            "0.49",
            "--dim",
            "1",
            "--phi",
            "0",
            "2",
            "--estimators",
            "reinforce,arm,disarm",
            "--num-samples",
            "20000",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "variance_toy.json").read_text())
    assert (tmp_path / "variance_toy.png").stat().st_size > 10_000
    assert data["command"].startswith("binopt variance --problem toy")
    assert [s["label"] for s in data["settings"]] == ["phi=0", "phi=2"]
    for setting in data["settings"]:
        logits = torch.tensor(setting["info"]["logits"], dtype=torch.float64)
        rows = {r["estimator"]: r for r in setting["rows"]}
        for name in ("reinforce", "arm", "disarm"):
            r = rows[name]
            f = lambda z: -((z - 0.49) ** 2).sum(-1)  # noqa: E731  (maximised)
            exact = float(binopt.diagnostics.exact_variance(name, f, logits)["variance"][0])
            assert r["exact_variance"] == pytest.approx(exact, rel=1e-12, abs=1e-15)
            assert abs(r["variance_z"]) < Z_BOUND
            assert abs(r["bias_z"]) < Z_BOUND
            # printed numbers are the JSON numbers
            printed = _row(out, setting["label"], name)
            assert float(printed[6]) == pytest.approx(r["variance"], rel=1e-3, abs=1e-12)
        assert (
            rows["disarm"]["variance"] <= rows["arm"]["variance"] <= rows["reinforce"]["variance"]
        )
    assert re.search(r"variance: +disarm \(0\) <= arm .* <= reinforce", out)


def test_variance_maxcut_after_training_with_coord(tmp_path, capsys):
    rc = main(
        [
            "variance",
            "--problem",
            "maxcut",
            "--nodes",
            "6",
            "--step",
            "20",
            "--estimators",
            "disarm,exact,straight_through",
            "--num-samples",
            "500",
            "--coord",
            "2",
            "--out",
            str(tmp_path),
            "--name",
            "mc",
            "--no-plot",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "unit 2 of 6" in out and "random init, step 20" in out
    data = json.loads((tmp_path / "mc.json").read_text())
    assert not (tmp_path / "mc.png").exists()
    rows = {r["estimator"]: r for r in data["settings"][0]["rows"]}
    assert rows["exact"]["variance"] == 0 and rows["exact"]["bias"] == pytest.approx(0, abs=1e-12)
    assert rows["exact"]["evaluations"] == 64
    assert abs(rows["disarm"]["bias_z"]) < Z_BOUND
    assert rows["disarm"]["exact_variance"] is not None
    assert abs(rows["disarm"]["variance_z"]) < Z_BOUND


def test_variance_vae_tiny(tmp_path, capsys):
    pytest.importorskip("mlxtend")
    rc = main(
        [
            "variance",
            "--problem",
            "vae",
            "--step",
            "2",
            "--batch-size",
            "4",
            "--latent-dim",
            "8",
            "--estimators",
            "reinforce,disarm",
            "--num-samples",
            "6",
            "--out",
            str(tmp_path),
            "--no-plot",
        ]
    )
    assert rc == 0
    data = json.loads((tmp_path / "variance_vae.json").read_text())
    rows = {r["estimator"]: r for r in data["settings"][0]["rows"]}
    assert rows["reinforce"]["exact"] is None and rows["disarm"]["evaluations"] == 2
    assert rows["disarm"]["variance"] > 0
    assert "step 2 (disarm)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["variance", "--estimators", "nope"], "unknown estimator"),
        (["variance", "--problem", "vae", "--phi", "1"], "do not apply"),
        (["variance", "--p0", "0.5"], "p0"),
        (["variance", "--num-samples", "1"], "num-samples"),
        (["variance", "--dim", "2", "--logits", "1"], "units"),
        (["variance", "--coord", "3"], "coord"),
        (
            [
                "variance",
                "--problem",
                "maxcut",
                "--nodes",
                "25",
                "--estimators",
                "exact",
                "--num-samples",
                "2",
            ],
            "exact enumeration",
        ),
        (["toy", "--p0", "0.5"], "p0"),
        (["toy", "--steps", "0"], "steps"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, message, capsys, tmp_path):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("binopt: error:") and message in err and len(err.splitlines()) == 1


def test_toy_command_writes_curves(tmp_path, capsys):
    rc = main(
        [
            "toy",
            "--p0",
            "0.49",
            "0.51",
            "--dim",
            "2",
            "--estimators",
            "disarm,reinforce",
            "--steps",
            "40",
            "--seeds",
            "2",
            "--eval-every",
            "20",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    data = json.loads((tmp_path / "toy_curves.json").read_text())
    assert (tmp_path / "toy_curves.png").stat().st_size > 10_000
    assert data["command"].startswith("binopt toy --p0 0.49 0.51 --dim 2")
    assert [r["problem"]["p0"] for r in data["runs"]] == [0.49, 0.51]
    curve = data["runs"][0]["estimators"]["disarm"]
    assert curve["variance_steps"] == [0, 20, 40] and len(curve["variance_mean"]) == 3
    line = next(x for x in out.splitlines() if x.startswith("0.49") and "disarm" in x)
    assert f"{curve['final_prob_right']:.3f}" in line
