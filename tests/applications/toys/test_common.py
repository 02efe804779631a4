"""Tests for the shared helpers of applications.toys."""

from __future__ import annotations

import argparse
import json
import math
import os
from statistics import NormalDist

import numpy as np
import pytest
import torch

import binopt
from applications.errors import UserError
from applications.toys._common import (
    MomentAccumulator,
    command_line,
    fmt,
    format_table,
    parse_estimator_list,
    parse_estimator_spec,
    to_jsonable,
    z_score,
)


def test_parse_spec_with_options_builds_the_estimator():
    spec = parse_estimator_spec("reinforce_loo:num_samples=4")
    est = spec.build()
    assert isinstance(est, binopt.REINFORCELOO) and est.num_samples == 4
    assert spec.label == "reinforce_loo:num_samples=4"
    gumbel = parse_estimator_spec("gumbel:temperature=0.5:hard=True").build()
    assert gumbel.temperature == 0.5 and gumbel.hard is True


@pytest.mark.parametrize(
    "text", ["nope", "reinforce_loo:num_samples=1", "arm:bogus=3", "arm:novalue", " "]
)
def test_bad_specs_are_user_errors(text):
    with pytest.raises(UserError):
        parse_estimator_spec(text)


def test_estimator_list_rejects_duplicates_and_empty():
    assert [s.label for s in parse_estimator_list("arm, disarm")] == ["arm", "disarm"]
    with pytest.raises(UserError, match="twice"):
        parse_estimator_list("arm,arm")
    with pytest.raises(UserError):
        parse_estimator_list(",")


def test_moments_match_numpy_across_chunks():
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, 3.0, size=(5000, 3)) + 100.0  # large offset: tests the shift
    acc = MomentAccumulator()
    for chunk in np.array_split(x, 7):
        acc.update(torch.from_numpy(chunk))
    r = acc.result()
    np.testing.assert_allclose(r["mean"].numpy(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(r["variance"].numpy(), x.var(0, ddof=1), rtol=1e-9)
    n = len(x)
    m4 = ((x - x.mean(0)) ** 4).mean(0)
    s2 = x.var(0, ddof=1)
    np.testing.assert_allclose(
        r["variance_se"].numpy() ** 2, (m4 - s2**2 * (n - 3) / (n - 1)) / n, rtol=1e-7
    )


def _accumulate(x: torch.Tensor, chunks: int = 3) -> dict[str, torch.Tensor]:
    acc = MomentAccumulator()
    for part in torch.tensor_split(x, chunks):
        acc.update(part)
    return acc.result()


def test_variance_standard_error_closed_forms():
    """Deterministic samples whose standard error of ``s^2`` is known in closed form.

    ``Var(s^2) = (mu4 - sigma^4 (n - 3) / (n - 1)) / n`` with plug-ins ``m4`` (the
    ``1/n`` central moment) and ``s^4``, floored at ``2 s^4 / (n (n - 1))`` (the smallest
    value possible, since ``mu4 >= sigma^4``).
    """
    n = 400
    # half +1, half -1 (sorted, so the first chunk's shift is far from the mean): m2 = m4 = 1
    # and s^2 = n / (n - 1). The plug-in (3n - 1) / (n (n - 1)^3) is below the floor
    # 2 s^4 / (n (n - 1)) = 2 n / (n - 1)^3, which is what is reported.
    coin = torch.cat([torch.ones(n // 2), -torch.ones(n // 2)]).double().unsqueeze(1)
    r = _accumulate(coin)
    assert float(r["variance"]) == pytest.approx(n / (n - 1), rel=1e-12)
    assert (3 * n - 1) / (n * (n - 1) ** 3) < 2 * n / (n - 1) ** 3
    assert float(r["variance_se"]) == pytest.approx(math.sqrt(2 * n / (n - 1) ** 3), rel=1e-9)
    # -1, 0, +1 in proportions 1/4, 1/2, 1/4: m2 = m4 = 1/2, s^2 = n / (2 (n - 1)); the
    # plug-in (about 1 / (4n)) is far above the floor (about 1 / (2 n^2))
    three = torch.cat([-torch.ones(n // 4), torch.zeros(n // 2), torch.ones(n // 4)])
    r = _accumulate(three.double().unsqueeze(1))
    s2 = n / (2 * (n - 1))
    var_of_var = (0.5 - s2**2 * (n - 3) / (n - 1)) / n
    assert var_of_var > 2 * s2**2 / (n * (n - 1))
    assert float(r["variance"]) == pytest.approx(s2, rel=1e-12)
    assert float(r["variance_se"]) == pytest.approx(math.sqrt(var_of_var), rel=1e-9)
    assert float(r["mean_se"]) == pytest.approx(math.sqrt(s2 / n), rel=1e-12)


def test_variance_z_scores_have_unit_spread():
    """Over independent samples the z-scores ``(s^2 - sigma^2) / SE`` have standard deviation
    1: the SE is neither too small nor conservative.

    Bernoulli(0.2) values (discrete, skewed, like a score-function gradient), n = 400: s^2 is
    close to normal there. The sample standard deviation of ``reps`` normal z-scores has
    standard error ``1 / sqrt(2 reps)``; one two-sided check on a fixed seed with
    false-alarm probability 1e-4 gives Z = 3.89.

    Not the fair coin: there ``s^2 - 1 ~ (1 - chi2_1) / n`` is not normal (the leading term
    of ``Var(s^2)``, ``mu4 - sigma^4``, vanishes) and both the error and the plug-in
    ``m4 - m2^2 ~ 4 xbar^2`` are driven by ``xbar``: the z-scores spread about 0.5 whatever
    the floor (it is exact there), so the reported SE is conservative for that case.
    """
    g = torch.Generator().manual_seed(0)
    n, reps, p = 400, 1000, 0.2
    x = (torch.rand(reps, n, generator=g) < p).double()
    zs = []
    for row in x:
        r = _accumulate(row.unsqueeze(1))
        zs.append(float((r["variance"] - p * (1 - p)) / r["variance_se"]))
    z_bound = NormalDist().inv_cdf(1 - 1e-4 / 2)
    assert abs(np.std(zs, ddof=1) - 1) <= z_bound / math.sqrt(2 * reps), np.std(zs, ddof=1)


def test_z_score_edge_cases():
    assert z_score(1.0, 0.5) == 2.0
    assert z_score(0.0, 0.0) == 0.0
    assert math.isinf(z_score(1.0, 0.0))


def test_formatting_helpers():
    assert fmt(None) == "n/a" and fmt(0.0) == "0" and fmt(1.5e-7) == "1.500e-07"
    table = format_table(["a", "b"], [["x", "1"], ["yy", "22"]])
    assert table.splitlines()[1].startswith("--")
    payload = to_jsonable({"t": torch.tensor([1.0, float("nan")]), "n": np.float32(2)})
    assert payload == {"t": [1.0, "nan"], "n": 2.0}


def test_command_line_spells_out_every_option():
    p = argparse.ArgumentParser()
    p.add_argument("--phi", type=float, nargs="+", default=[0.0])
    p.add_argument("--flag", action="store_true")
    p.add_argument("--name", default=None)
    args = p.parse_args(["--phi", "0", "2", "--flag"])
    assert command_line("binopt variance", args, p) == "binopt variance --phi 0.0 2.0 --flag"


def test_mean_variance_se_holds_for_correlated_coordinates():
    """The variance averaged over D perfectly correlated coordinates is as uncertain as one
    coordinate's: its standard error must not shrink like 1/sqrt(D) (combining per-unit
    errors as if independent did). Normal data, n = 400: Var(s^2) = 2 sigma^4 / (n - 1).
    Over 200 seeded repetitions the mean of the squared jackknife SE must match it within
    Z = 4 standard errors of that mean (plus the jackknife's O(1/G) bias, 1/G = 5%)."""
    from applications.toys._common import MomentAccumulator, jackknife_groups

    n, d, reps = 400, 50, 200
    gen = torch.Generator().manual_seed(0)
    se2 = []
    for _ in range(reps):
        z = torch.randn(n, 1, generator=gen, dtype=torch.float64)
        x = z.expand(n, d)  # every coordinate the same draw
        acc = MomentAccumulator(jackknife_groups(n), n)
        for chunk in x.split(64):
            acc.update(chunk)
        se2.append(acc.mean_variance_se() ** 2)
    se2 = torch.tensor(se2)
    true = 2.0 / (n - 1)
    tol = 4 * float(se2.std()) / reps**0.5 + 0.05 * true
    assert abs(float(se2.mean()) - true) <= tol, (float(se2.mean()), true, tol)
    # the old combination, sqrt(sum se_k^2) / D, is sqrt(D) = 7x too small here
    per_unit = acc.result()["variance_se"]
    assert float(per_unit.pow(2).sum().sqrt() / d) < 0.2 * float(se2.mean()) ** 0.5


def test_mean_variance_se_arguments():
    from applications.toys._common import MomentAccumulator, jackknife_groups

    assert jackknife_groups(3) is None and jackknife_groups(4) == 2
    assert jackknife_groups(10**6) == 20
    with pytest.raises(ValueError, match="num_estimates >= 2"):
        MomentAccumulator(groups=5, num_estimates=6)
    with pytest.raises(ValueError, match="needs groups="):
        MomentAccumulator().mean_variance_se()


def test_write_json_replaces_the_file_atomically(tmp_path, monkeypatch):
    """The new version goes to a temporary file renamed over the old one: a reader holding
    the previous file keeps it whole (a link to it still reads the old payload), and a
    Ctrl-C while writing leaves the previous version and no temporary file. Writing
    straight to the path truncated it first."""
    from applications.toys import _common
    from applications.toys._common import write_json

    path = tmp_path / "out.json"
    write_json(path, {"a": 1})
    os.link(path, tmp_path / "reader.json")
    write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert json.loads((tmp_path / "reader.json").read_text()) == {"a": 1}

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(_common.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_json(path, {"a": 3, "long": list(range(1000))})
    assert json.loads(path.read_text()) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "reader.json"]


def test_figures_are_replaced_atomically(tmp_path, monkeypatch):
    """Same for every figure (plotting.save_figure): savefig wrote straight to the path."""
    from applications.toys import _common
    from applications.toys.plotting import plot_curves

    curves = {"a": [{"x": [0, 1, 2], "y": [1.0, 2.0, 1.5]}]}
    path = tmp_path / "fig.png"
    assert plot_curves(curves, path, "x", "y", "x", "y") == path
    before = path.read_bytes()
    assert before.startswith(b"\x89PNG")
    os.link(path, tmp_path / "reader.png")
    plot_curves(curves, path, "x", "y", "x", "y", title="changed")
    assert path.read_bytes() != before and (tmp_path / "reader.png").read_bytes() == before

    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(_common.os, "fsync", interrupted)
    now = path.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        plot_curves(curves, path, "x", "y", "x", "y", title="interrupted")
    assert path.read_bytes() == now
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png", "reader.png"]


@pytest.mark.parametrize("stem", ["", ".", "..", "a/b"])
def test_prepare_output_refuses_unusable_names(stem, tmp_path):
    from applications.toys._common import prepare_output

    with pytest.raises(UserError, match="--name must be a file name stem"):
        prepare_output(tmp_path / "out", stem, (".json",))
    assert not (tmp_path / "out").exists()  # nothing created for a refused name


def test_prepare_output_refuses_a_file_as_folder_and_a_folder_as_output(tmp_path):
    from applications.toys._common import prepare_output

    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot create output folder"):
        prepare_output(tmp_path / "file", "run", (".json",))
    (tmp_path / "run.png").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        prepare_output(tmp_path, "run", (".json", ".png"))
    assert prepare_output(tmp_path / "new", "run", (".json",)) == [tmp_path / "new" / "run.json"]
    assert os.listdir(tmp_path / "new") == []  # the write check leaves nothing behind
