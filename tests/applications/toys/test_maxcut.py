"""Tests for max-cut / QUBO."""

from __future__ import annotations

import itertools

import pytest
import torch

import binopt
from applications.toys._common import parse_estimator_spec
from applications.toys.maxcut import (
    QUBO,
    brute_force,
    local_search,
    maxcut_qubo,
    optimize_logits,
    random_graph,
    random_maxcut,
    random_qubo,
)


def _cut(W: torch.Tensor, z: torch.Tensor) -> float:
    n = W.shape[0]
    return sum(float(W[i, j]) for i, j in itertools.combinations(range(n), 2) if z[i] != z[j])


def test_energy_is_minus_the_cut():
    W = random_graph(7, 0.6, seed=3, weighted=True)
    q = maxcut_qubo(W)
    g = torch.Generator().manual_seed(0)
    z = (torch.rand(20, 7, generator=g) < 0.5).double()
    energies = q.energy(z)
    for k in range(20):
        assert float(energies[k]) == pytest.approx(-_cut(W, z[k]))


def test_graph_is_symmetric_without_self_loops():
    W = random_graph(9, 0.5, seed=1)
    assert torch.equal(W, W.T) and torch.all(torch.diagonal(W) == 0)
    assert set(W.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("make", [lambda: random_maxcut(8, 0.5, 2), lambda: random_qubo(8, 5)])
def test_brute_force_is_the_true_optimum_and_local_search_is_feasible(make):
    q = make()
    best, z = brute_force(q)
    states = binopt.estimators.all_states(q.n, dtype=torch.float64)
    assert best == pytest.approx(float(q.energy(states).min()))
    assert float(q.energy(z.unsqueeze(0))[0]) == pytest.approx(best)
    ls, z_ls = local_search(q, restarts=5, seed=0)
    assert ls >= best - 1e-9
    assert set(z_ls.unique().tolist()) <= {0.0, 1.0}
    # a local optimum: no single flip improves it
    for i in range(q.n):
        flipped = z_ls.clone()
        flipped[i] = 1 - flipped[i]
        assert float(q.energy(flipped.unsqueeze(0))[0]) >= ls - 1e-9


def test_qubo_diagonal_is_folded_into_the_linear_term():
    Q = torch.tensor([[2.0, 1.0], [1.0, -3.0]])
    q = QUBO(Q, torch.zeros(2))
    z = binopt.estimators.all_states(2, dtype=torch.float64)
    direct = ((z @ Q.double()) * z).sum(-1)
    torch.testing.assert_close(q.energy(z), direct)
    with pytest.raises(ValueError):
        QUBO(torch.tensor([[0.0, 1.0], [2.0, 0.0]]), torch.zeros(2))


def test_closed_form_gradient_and_expectation_match_enumeration():
    q = random_maxcut(6, 0.7, seed=4, weighted=True)
    logits = torch.linspace(-1.5, 1.0, 6, dtype=torch.float64)
    torch.testing.assert_close(q.exact_grad(logits), binopt.exact_grad(q.energy, logits))
    torch.testing.assert_close(q.expected_energy(logits), binopt.exact_expectation(q, logits))


def test_antithetic_estimators_are_exactly_zero_at_the_symmetric_point():
    """With pi = 1/2 the ARM/DisARM pair is (z, 1 - z), which has the same cut."""
    q = random_maxcut(6, 0.5, seed=0)
    zero = torch.zeros(6, dtype=torch.float64)
    for name in ["arm", "disarm"]:
        g = binopt.get_estimator(name).grad(q.energy, zero, num_samples=50)
        assert torch.all(g == 0)
    assert torch.allclose(q.exact_grad(zero), torch.zeros(6, dtype=torch.float64))


def test_optimizing_logits_reaches_the_optimum_on_a_small_graph():
    q = random_maxcut(8, 0.5, seed=1)
    best, _ = brute_force(q)
    out = optimize_logits(q, parse_estimator_spec("disarm"), steps=300, lr=0.1, seed=0)
    assert out["rounded_energy"] == pytest.approx(best)
    assert out["best_sample_energy"] == pytest.approx(best)
    assert out["evaluations"] == 600
    assert out["expected_energy"][-1] < out["expected_energy"][0]
    assert len(out["steps"]) == len(out["rounded"]) == 31


def test_brute_force_refuses_large_problems():
    with pytest.raises(ValueError, match="brute force"):
        brute_force(random_qubo(25))
