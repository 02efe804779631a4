"""Tests for the shared helpers of applications.toys."""

from __future__ import annotations

import argparse
import math

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


def test_variance_standard_error_is_honest_for_a_two_point_distribution():
    """Two-point values (mu4 ~ sigma^4): the plug-in Var(s^2) can be ~0; with the floor at
    its smallest possible value the z-scores never blow up and are not vacuous either."""
    g = torch.Generator().manual_seed(0)
    n, reps = 400, 300
    zs = []
    for _ in range(reps):
        x = torch.where(torch.rand(n, 1, generator=g) < 0.5, 1.0, -1.0).double()
        acc = MomentAccumulator()
        acc.update(x)
        r = acc.result()
        zs.append(float((r["variance"] - 1.0) / r["variance_se"]))
    zs = np.asarray(zs)
    assert np.abs(zs).max() < 4.0
    assert 0.3 < zs.std() < 1.2


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
