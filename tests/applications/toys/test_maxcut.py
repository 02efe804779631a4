"""Tests for max-cut / QUBO."""

from __future__ import annotations

import itertools
import re

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


def test_negative_weights_are_edges_and_cut_as_weighted():
    """A negative weight is an edge that is better left uncut: it counts as an edge (it was
    left out of ``meta["edges"]``, counted with W > 0) and the energy is still minus the
    weighted cut."""
    W = torch.tensor(
        [[0.0, 1.0, -2.0, 0.0], [1.0, 0.0, 0.5, -0.25], [-2.0, 0.5, 0.0, 0.0],
         [0.0, -0.25, 0.0, 0.0]],
        dtype=torch.float64,
    )
    q = maxcut_qubo(W)
    assert q.meta["edges"] == 4
    states = binopt.estimators.all_states(4, dtype=torch.float64)
    energies = q.energy(states)
    for k in range(len(states)):
        assert float(energies[k]) == pytest.approx(-_cut(W, states[k]))
    # the best cut keeps the negative edges uncut
    best, z = brute_force(q)
    assert best == pytest.approx(-1.5) and z[0] == z[2] and z[1] == z[3]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_samples": 0}, "num_samples must be >= 1; got 0"),
        ({"record_every": 0}, "record_every must be >= 1; got 0"),
        ({"steps": -1}, "steps must be >= 0; got -1"),
        ({"lr": float("nan")}, "lr must be a finite number > 0; got nan"),
        ({"init_std": -0.1}, "init_std must be a finite number >= 0; got -0.1"),
    ],
)
def test_optimize_logits_checks_its_arguments_first(kwargs, message):
    """Raised by optimize_logits itself, before any step (num_samples=0 used to fail inside
    the estimator, record_every=0 as a ZeroDivisionError)."""
    q = random_maxcut(5, 0.5, seed=0)
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        optimize_logits(q, parse_estimator_spec("disarm"), **{"steps": 3, **kwargs})
    # raised by optimize_logits's own checks (maxcut.py or the shared ones in _common.py),
    # not from inside the estimator or a training step
    assert info.traceback[-1].path.name in ("maxcut.py", "_common.py")
    assert not any("estimators" in str(entry.path) for entry in info.traceback)
