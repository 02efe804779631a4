"""Tests for the Yin-Zhou toy problem."""

from __future__ import annotations

import math
import re
from statistics import NormalDist

import numpy as np
import pytest
import torch

import binopt
from applications.toys._common import parse_estimator_list
from applications.toys.yin_zhou import EXACT_VARIANCE_MAX_DIM, YinZhouToy, train_toy


@pytest.mark.parametrize("mode", ["max", "min"])
@pytest.mark.parametrize("p0", [0.49, 0.51])
def test_closed_forms_match_enumeration(mode, p0):
    toy = YinZhouToy(p0, dim=3, mode=mode)
    logits = torch.tensor([-1.0, 0.3, 2.0], dtype=torch.float64)
    exact = binopt.exact_grad(toy.loss, logits)
    torch.testing.assert_close(toy.exact_grad(logits), exact)
    torch.testing.assert_close(toy.expected_loss(logits), binopt.exact_expectation(toy, logits))
    # the right answer minimises the expected loss
    right = torch.full((3,), 30.0 if toy.right_answer else -30.0, dtype=torch.float64)
    assert toy.expected_loss(right) < toy.expected_loss(-right)


def test_right_answer_follows_the_paper():
    assert YinZhouToy(0.49, mode="max").right_answer == 1  # ARM paper: sigmoid(phi) -> 1
    assert YinZhouToy(0.51, mode="max").right_answer == 0
    assert YinZhouToy(0.49, mode="min").right_answer == 0


@pytest.mark.parametrize("kwargs", [{"p0": 0.5}, {"p0": 1.2}, {"dim": 0}, {"mode": "avg"}])
def test_invalid_problems(kwargs):
    with pytest.raises(ValueError):
        YinZhouToy(**kwargs)


def test_hard_concrete_probability_of_the_right_answer():
    """Closed-form P(z = 1) and P(z = 0) of the hard concrete gate against sampling."""
    est = binopt.get_estimator("hard_concrete", generator=torch.Generator().manual_seed(0))
    logits = torch.tensor([0.7], dtype=torch.float64)
    z = est.sample(logits, (200_000,))
    for p0, value in [(0.49, 1.0), (0.51, 0.0)]:
        p = YinZhouToy(p0, 1, "max").prob_right(logits, est)
        freq = (z == value).double().mean()
        se = (p * (1 - p) / z.shape[0]).sqrt()
        assert abs(float(freq - p)) < 5 * float(se)


def test_training_finds_the_right_answer_and_records_curves():
    specs = parse_estimator_list("disarm,exact")
    out = train_toy(
        YinZhouToy(0.4, 1, "max"), specs, steps=150, lr=0.1, seeds=[0, 1], eval_every=50
    )
    assert set(out["estimators"]) == {"disarm", "exact"}
    for curve in out["estimators"].values():
        assert len(curve["steps"]) == len(curve["prob_right_mean"]) == 151
        assert curve["variance_steps"] == [0, 50, 100, 150]
        assert curve["final_prob_right"] > 0.95
        assert curve["prob_right_mean"][0] == pytest.approx(0.5)
    # exact variance of DisARM at D = 1: 0 at phi = 0 (the antithetic pair always differs)
    assert out["estimators"]["disarm"]["variance_mean"][0] == 0.0
    assert out["estimators"]["disarm"]["variance_method"] == "exact"


def test_monte_carlo_variance_is_used_beyond_the_exact_limit():
    """D = 6 > EXACT_VARIANCE_MAX_DIM: the variance at step 0 (phi = 0) is a Monte Carlo
    estimate, compared with the exact value within Z of its exact standard error.

    The reported statistic is the mean over units of the per-unit sample variances of ``n``
    REINFORCE estimates, i.e. the U-statistic ``(1 / n(n-1)) sum_{k != l} h(g_k, g_l)`` with
    kernel ``h(a, b) = |a - b|^2 / (2 D)``. Its exact variance is
    ``(4 (n - 2) zeta1 + 2 zeta2) / (n (n - 1))`` with ``zeta1 = Var_a E_b h(a, b)`` and
    ``zeta2 = Var h(a, b)``, both by enumerating the 2^6 states. The units are NOT
    independent (at phi = 0 every ``g_i^2 = f^2 / 4``), so summing per-unit standard errors
    in quadrature would understate this one by about sqrt(D).
    """
    toy, n = YinZhouToy(0.49, 6), 4000
    assert toy.dim > EXACT_VARIANCE_MAX_DIM
    out = train_toy(
        toy, parse_estimator_list("reinforce"), steps=2, eval_every=1, variance_samples=n
    )
    curve = out["estimators"]["reinforce"]
    assert curve["variance_method"] == "monte_carlo"

    # REINFORCE (no baseline) at phi = 0: g(z) = f(z) (z - 1/2), every state has prob 2^-6
    logits = torch.zeros(toy.dim, dtype=torch.float64)
    states = binopt.estimators.all_states(toy.dim, dtype=torch.float64)
    q = torch.full((len(states),), 2.0**-toy.dim, dtype=torch.float64)
    g = toy.loss(states).unsqueeze(1) * (states - 0.5)
    mean = q @ g
    exact = binopt.diagnostics.exact_variance("reinforce", toy.loss, logits)
    torch.testing.assert_close(mean, exact["mean"])  # the table is REINFORCE's estimate
    torch.testing.assert_close(q @ (g - mean) ** 2, exact["variance"])

    h = ((g.unsqueeze(1) - g.unsqueeze(0)) ** 2).sum(-1) / (2 * toy.dim)  # (S, S) kernel
    pair = q.unsqueeze(1) * q.unsqueeze(0)
    theta = float((pair * h).sum())
    assert theta == pytest.approx(float(exact["variance"].mean()), rel=1e-12)
    h1 = h @ q
    zeta1 = float(q @ (h1 - theta) ** 2)
    zeta2 = float((pair * (h - theta) ** 2).sum())
    se = math.sqrt((4 * (n - 2) * zeta1 + 2 * zeta2) / (n * (n - 1)))
    # one two-sided check on a fixed seed, false-alarm probability 1e-4
    z_bound = NormalDist().inv_cdf(1 - 1e-4 / 2)  # 3.89
    measured = curve["variance_mean"][0]
    assert abs(measured - theta) <= z_bound * se, (measured, theta, se)


def test_variance_measurements_do_not_change_the_training():
    """Gumbel has no exact variance, so its variance is a Monte Carlo estimate. Those
    estimates used to come from the training estimator's generator, and measuring every 10
    steps instead of once at the end flipped seed 0's outcome. Now every curve, and every
    seed's final answer, is the same whatever eval_every and variance_samples are."""
    specs = parse_estimator_list("reinforce,disarm,gumbel")
    runs = [
        train_toy(
            YinZhouToy(0.49, 1), specs, steps=300, seeds=[0, 1, 2], eval_every=every,
            variance_samples=samples,
        )
        for every, samples in [(10, 1000), (1000, 1000), (10, 50)]
    ]
    assert runs[0]["estimators"]["gumbel"]["variance_method"] == "monte_carlo"
    for label in ("reinforce", "disarm", "gumbel"):
        first = runs[0]["estimators"][label]
        for other in runs[1:]:
            curve = other["estimators"][label]
            assert np.array_equal(curve["prob_right_mean"], first["prob_right_mean"]), label
            assert np.array_equal(
                curve["final_prob_right_per_seed"], first["final_prob_right_per_seed"]
            ), label
    # the measurements still happen, from their own stream: the first is the same draw
    assert len(runs[0]["estimators"]["gumbel"]["variance_mean"]) == 31
    assert (
        runs[0]["estimators"]["gumbel"]["variance_mean"][0]
        == runs[1]["estimators"]["gumbel"]["variance_mean"][0]
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": float("nan")}, "lr must be a finite number > 0; got nan"),
        ({"init_logit": float("inf")}, "init_logit must be finite; got inf"),
        ({"record_every": 0}, "record_every must be >= 1; got 0"),
        ({"eval_every": -1}, "eval_every must be >= 1; got -1"),
        ({"variance_samples": 1}, "variance_samples must be >= 2; got 1"),
    ],
)
def test_train_toy_argument_errors_say_what_was_given(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        train_toy(YinZhouToy(0.49, 1), parse_estimator_list("disarm"), steps=2, **kwargs)
