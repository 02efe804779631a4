"""Max-cut (and general QUBO) on random graphs, solved by optimising Bernoulli logits.

A QUBO minimises ``E(z) = z^T Q z + c^T z`` over ``z in {0,1}^n`` (``Q`` symmetric, zero
diagonal; a diagonal is folded into ``c`` since ``z_i^2 = z_i``). Max-cut on a graph with
symmetric weights ``W`` is the QUBO with ``Q = W`` and ``c = -deg``: the cut
``sum_{i<j} W_ij [z_i != z_j] = deg^T z - z^T W z``, so ``E(z) = -cut(z)``.

Three solvers:

- :func:`brute_force`: the exact optimum by enumeration (``n <= 24``; a global flip symmetry
  is used for max-cut by fixing ``z_0 = 0``).
- :func:`local_search`: greedy construction followed by single-flip local search, from
  several random starts (the baseline for larger ``n``).
- :func:`optimize_logits`: stochastic optimisation of ``E_{z ~ Bernoulli(sigmoid(alpha))}[E(z)]``
  with any binopt estimator; returns the rounded solution and the best sample seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ._common import EstimatorSpec, check_at_least, check_learning_rate, progress

#: Largest ``n`` that :func:`brute_force` enumerates.
MAX_BRUTE_FORCE = 24


@dataclass
class QUBO:
    """Minimise ``z^T Q z + c^T z`` over binary ``z``.

    Parameters
    ----------
    Q : torch.Tensor
        Symmetric ``(n, n)`` matrix; its diagonal is moved into ``c``.
    c : torch.Tensor
        Linear term, shape ``(n,)``.
    name : str
        Description used in outputs.
    """

    Q: torch.Tensor
    c: torch.Tensor
    name: str = "qubo"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        Q = torch.as_tensor(self.Q, dtype=torch.float64)
        c = torch.as_tensor(self.c, dtype=torch.float64)
        if Q.dim() != 2 or Q.shape[0] != Q.shape[1] or c.shape != (Q.shape[0],):
            raise ValueError(
                f"Q must be (n, n) and c (n,); got {tuple(Q.shape)} and {tuple(c.shape)}"
            )
        if not torch.allclose(Q, Q.T):
            raise ValueError("Q must be symmetric")
        diag = torch.diagonal(Q).clone()
        self.Q = Q - torch.diag(diag)
        self.c = c + diag

    @property
    def n(self) -> int:
        """Number of binary variables."""
        return self.Q.shape[0]

    def energy(self, z: torch.Tensor) -> torch.Tensor:
        """``z^T Q z + c^T z`` for ``z`` of shape ``(S, n)``, shape ``(S,)`` (the estimator's f)."""
        Q = self.Q.to(device=z.device, dtype=z.dtype)
        c = self.c.to(device=z.device, dtype=z.dtype)
        return ((z @ Q) * z).sum(-1) + z @ c

    __call__ = energy

    def expected_energy(self, logits: torch.Tensor) -> torch.Tensor:
        """``E[energy]`` in closed form (independent units, zero diagonal)."""
        pi = torch.sigmoid(logits)
        Q = self.Q.to(dtype=pi.dtype)
        return (pi @ Q * pi).sum(-1) + pi @ self.c.to(dtype=pi.dtype)

    def exact_grad(self, logits: torch.Tensor) -> torch.Tensor:
        """``d E[energy] / d logits`` in closed form, for any ``n``."""
        pi = torch.sigmoid(logits.detach().to(torch.float64))
        return (2 * pi @ self.Q + self.c) * pi * (1 - pi)


def random_graph(
    n: int, edge_prob: float = 0.5, seed: int = 0, weighted: bool = False
) -> torch.Tensor:
    """Symmetric adjacency (or weight) matrix of an Erdos-Renyi graph ``G(n, p)``.

    Weights are 1, or uniform on ``(0, 1]`` when ``weighted``.
    """
    if n < 2:
        raise ValueError(f"a graph needs n >= 2 nodes; got {n}")
    if not 0.0 < edge_prob <= 1.0:
        raise ValueError(f"edge_prob must be in (0, 1]; got {edge_prob}")
    g = torch.Generator().manual_seed(int(seed))
    upper = torch.rand(n, n, generator=g, dtype=torch.float64) < edge_prob
    w = torch.ones(n, n, dtype=torch.float64)
    if weighted:
        w = 1.0 - torch.rand(n, n, generator=g, dtype=torch.float64)
    upper = torch.triu(upper, diagonal=1)
    W = torch.where(upper, w, torch.zeros_like(w))
    return W + W.T


def maxcut_qubo(W: torch.Tensor, name: str = "maxcut") -> QUBO:
    """The QUBO whose energy is minus the cut of the graph with weights ``W``.

    Weights may be negative (edges that are better left uncut); ``meta["edges"]`` counts
    the nonzero off-diagonal weights of the upper triangle.
    """
    W = torch.as_tensor(W, dtype=torch.float64)
    W = W - torch.diag(torch.diagonal(W))
    # != 0, not > 0: a negative weight is an edge too (it was left out of the count)
    edges = int(torch.triu(W, diagonal=1).ne(0).sum())
    return QUBO(W, -W.sum(1), name=name, meta={"kind": "maxcut", "edges": edges})


def random_maxcut(n: int, edge_prob: float = 0.5, seed: int = 0, weighted: bool = False) -> QUBO:
    """Max-cut on a random ``G(n, p)`` graph as a :class:`QUBO`."""
    q = maxcut_qubo(random_graph(n, edge_prob, seed, weighted), name=f"maxcut G({n},{edge_prob})")
    q.meta.update({"n": n, "edge_prob": edge_prob, "seed": seed, "weighted": weighted})
    return q


def random_qubo(n: int, seed: int = 0) -> QUBO:
    """A QUBO with standard normal couplings and linear terms."""
    g = torch.Generator().manual_seed(int(seed))
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    return QUBO(
        (A + A.T) / 2,
        torch.randn(n, generator=g, dtype=torch.float64),
        name=f"qubo n={n}",
        meta={"kind": "qubo", "n": n, "seed": seed},
    )


def brute_force(problem: QUBO, chunk: int = 1 << 16) -> tuple[float, torch.Tensor]:
    """The minimum energy and one minimiser by enumerating all ``2^n`` states.

    For max-cut the flip symmetry halves the work (``z_0 = 0`` is fixed).
    """
    n = problem.n
    if n > MAX_BRUTE_FORCE:
        raise ValueError(f"brute force is limited to n <= {MAX_BRUTE_FORCE}; got {n}")
    symmetric = problem.meta.get("kind") == "maxcut"
    free = n - 1 if symmetric else n
    bits = 2 ** torch.arange(free - 1, -1, -1)
    best, best_z = float("inf"), None
    for start in range(0, 2**free, chunk):
        codes = torch.arange(start, min(start + chunk, 2**free))
        z = (codes.unsqueeze(1) // bits % 2).to(torch.float64)
        if symmetric:
            z = torch.cat([torch.zeros(len(z), 1, dtype=torch.float64), z], dim=1)
        e = problem.energy(z)
        k = int(torch.argmin(e))
        if float(e[k]) < best:
            best, best_z = float(e[k]), z[k].clone()
    return best, best_z


def local_search(problem: QUBO, restarts: int = 10, seed: int = 0) -> tuple[float, torch.Tensor]:
    """Greedy construction plus single-flip local search, best of ``restarts`` random orders.

    Greedy: visit the variables in a random order and set each to the value with the lower
    energy given those already set (the rest at 0). Local search: flip the variable with
    the most negative energy change while one exists.
    """
    Q, c, n = problem.Q, problem.c, problem.n
    g = torch.Generator().manual_seed(int(seed))
    best, best_z = float("inf"), None
    for _ in range(max(1, restarts)):
        z = torch.zeros(n, dtype=torch.float64)
        for i in torch.randperm(n, generator=g).tolist():
            # energy change of setting z_i = 1 given the current z (z_i currently 0)
            if float(2 * Q[i] @ z + c[i]) < 0:
                z[i] = 1.0
        while True:
            # delta_i of flipping z_i: (1 - 2 z_i) (2 (Q z)_i + c_i)
            delta = (1 - 2 * z) * (2 * Q @ z + c)
            i = int(torch.argmin(delta))
            if float(delta[i]) >= -1e-12:
                break
            z[i] = 1.0 - z[i]
        e = float(problem.energy(z.unsqueeze(0))[0])
        if e < best:
            best, best_z = e, z.clone()
    return best, best_z


def optimize_logits(
    problem: QUBO,
    spec: EstimatorSpec,
    *,
    steps: int = 1000,
    lr: float = 0.1,
    num_samples: int = 1,
    seed: int = 0,
    init_std: float = 0.1,
    record_every: int = 10,
    show_progress: bool | None = None,
) -> dict[str, Any]:
    """Minimise ``E[energy]`` over Bernoulli logits with an estimator (Adam).

    Parameters
    ----------
    problem : QUBO
    spec : EstimatorSpec
    steps : int
        Adam steps.
    lr : float
        Learning rate.
    num_samples : int
        Independent estimates averaged per step.
    seed : int
        Seeds the initial logits and the estimator's generator.
    init_std : float
        Standard deviation of the normal initial logits. Do not start max-cut at exactly
        0: with ``pi = 1/2`` the antithetic pair of ARM/DisARM is ``(z, 1 - z)``, which has
        the same cut, so their estimate is exactly 0 there (``alpha = 0`` is a stationary
        point of the expected cut, which only a noisy estimator escapes).
    record_every : int
        Steps between points of the recorded curves.

    Returns
    -------
    dict with ``rounded_energy`` (energy of ``1[sigmoid(alpha) > 1/2]`` at the end),
    ``best_sample_energy`` (lowest energy among one monitoring sample drawn per step from
    the current Bernoulli distribution, with its own generator so that monitoring does not
    change the estimator's random stream), ``evaluations`` (of ``f`` by the estimator,
    monitoring excluded), and the curves ``steps``, ``expected_energy`` (closed form) and
    ``rounded`` (energy of the rounded logits).

    Raises
    ------
    ValueError
        An argument out of range (checked before any step).
    """
    # checked here: num_samples=0 failed inside the estimator, record_every=0 at step 0
    check_at_least(0, steps=steps)
    check_at_least(1, num_samples=num_samples, record_every=record_every)
    check_learning_rate(lr)
    if not (math.isfinite(init_std) and init_std >= 0):
        raise ValueError(f"init_std must be a finite number >= 0; got {init_std}")
    gen = torch.Generator().manual_seed(int(seed))
    monitor = torch.Generator().manual_seed(int(seed) + 1_000_003)
    est = spec.build(generator=gen)
    init = init_std * torch.randn(problem.n, generator=monitor, dtype=torch.float64)
    logits = init.requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=lr)
    steps_rec, expected, rounded = [], [], []
    best = float("inf")
    best_z = torch.zeros(problem.n, dtype=torch.float64)
    desc = f"{problem.name} {spec.label}"
    for step in progress(range(steps + 1), desc=desc, enabled=show_progress):
        with torch.no_grad():
            u = torch.rand(problem.n, generator=monitor, dtype=torch.float64)
            z = (u < torch.sigmoid(logits)).double()
            e = float(problem.energy(z.unsqueeze(0))[0])
            if e < best:
                best, best_z = e, z
        if step % record_every == 0 or step == steps:
            with torch.no_grad():
                steps_rec.append(step)
                expected.append(float(problem.expected_energy(logits)))
                r = (logits > 0).double().unsqueeze(0)
                rounded.append(float(problem.energy(r)[0]))
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        est.surrogate(problem.energy, logits, num_samples=num_samples).backward()
        opt.step()
    with torch.no_grad():
        final_round = (logits > 0).double()
    evals = est.evaluations_per_estimate
    return {
        "estimator": spec.label,
        "rounded_energy": float(problem.energy(final_round.unsqueeze(0))[0]),
        "rounded_solution": final_round,
        "best_sample_energy": best,
        "best_sample": best_z,
        "evaluations": int(evals * num_samples * steps) if evals > 0 else None,
        "steps": steps_rec,
        "expected_energy": expected,
        "rounded": rounded,
        "final_logits": logits.detach(),
    }


def energy_to_cut(problem: QUBO, energy: float) -> float:
    """For a max-cut QUBO the cut value is minus the energy."""
    return -energy


__all__ = [
    "MAX_BRUTE_FORCE",
    "QUBO",
    "brute_force",
    "energy_to_cut",
    "local_search",
    "maxcut_qubo",
    "optimize_logits",
    "random_graph",
    "random_maxcut",
    "random_qubo",
]
