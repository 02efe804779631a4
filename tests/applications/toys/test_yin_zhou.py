"""Tests for the Yin-Zhou toy problem."""

from __future__ import annotations

import pytest
import torch

import binopt
from applications.toys._common import parse_estimator_list
from applications.toys.yin_zhou import YinZhouToy, train_toy


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
    specs = parse_estimator_list("reinforce")
    out = train_toy(YinZhouToy(0.49, 6), specs, steps=2, eval_every=1, variance_samples=4000)
    curve = out["estimators"]["reinforce"]
    assert curve["variance_method"] == "monte_carlo"
    # at phi = 0 each unit's REINFORCE variance is E[f^2]/4 - (grad)^2 with f ~ -1.5
    exact = binopt.diagnostics.exact_variance(
        "reinforce", YinZhouToy(0.49, 6).loss, torch.zeros(6, dtype=torch.float64)
    )
    assert curve["variance_mean"][0] == pytest.approx(float(exact["variance"].mean()), rel=0.1)
