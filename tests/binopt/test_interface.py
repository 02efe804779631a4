"""The estimator interface (binopt/estimators/base.py, DESIGN.md 2): structures, shapes,
declared properties, devices and dtypes, generators, gates."""

from __future__ import annotations

import math

import pytest
import torch

import binopt
from binopt.estimators import base as base_module

ALL = binopt.available_estimators()
DTYPES = [torch.float32, torch.float64]
DEVICES = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])

# name -> (unbiased, evaluations per estimate, requires differentiable f, reparameterized)
PROPERTIES = {
    "arm": (True, 2, False, False),
    "disarm": (True, 2, False, False),
    "exact": (True, None, False, False),  # 2^D, known after the first call
    "gumbel": (False, 1, True, True),
    "hard_concrete": (False, 1, True, True),
    "reinforce": (True, 1, False, False),
    "reinforce_loo": (True, 2, False, False),
    "straight_through": (False, 1, True, True),
}


def make(name, seed=None, **options):
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return binopt.get_estimator(name, generator=gen, **options)


def quadratic(z):
    return ((z - 0.45) ** 2).sum(-1)


class Recorder:
    """An objective that records what it receives and returns."""

    def __init__(self, fn=quadratic):
        self.fn, self.inputs, self.outputs = fn, [], []

    def __call__(self, z):
        self.inputs.append(z)
        out = self.fn(z)
        self.outputs.append(out.detach())
        return out


# ------------------------------------------------------------------ declared properties
def test_properties_table_is_complete():
    assert sorted(PROPERTIES) == ALL


@pytest.mark.parametrize("name", ALL)
def test_declared_properties(name):
    unbiased, evals, diff_f, reparam = PROPERTIES[name]
    est = make(name)
    assert est.name == name
    assert est.unbiased is unbiased
    assert est.requires_differentiable_f is diff_f
    assert est.reparameterized is reparam
    if evals is not None:
        assert est.evaluations_per_estimate == evals
    else:
        assert est.evaluations_per_estimate == -1
        est.grad(quadratic, torch.zeros(3))
        assert est.evaluations_per_estimate == 8


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n", [1, 7])
def test_one_vectorized_call_with_declared_evaluations(name, n):
    """f is called once per grad/surrogate, on ``evaluations_per_estimate * N`` samples."""
    rec = Recorder()
    est = make(name, 0)
    est.grad(rec, torch.zeros(3), num_samples=n)
    assert len(rec.inputs) == 1
    rows = rec.inputs[0].shape[0]
    if name == "exact":
        assert rows == 2**3
    else:
        assert rows == est.evaluations_per_estimate * n


def test_loo_evaluations_follow_k():
    est = binopt.REINFORCELOO(num_samples=4)
    assert est.evaluations_per_estimate == 4
    rec = Recorder()
    est.grad(rec, torch.zeros(2), num_samples=5)
    assert rec.inputs[0].shape == (20, 2)


@pytest.mark.parametrize("name", ALL)
def test_bernoulli_samples_are_binary_and_relaxed_ones_in_unit_interval(name):
    rec = Recorder()
    make(name, 0).grad(rec, torch.linspace(-3, 3, 12), num_samples=20)
    z = rec.inputs[0].detach()
    if PROPERTIES[name][0] or name == "straight_through":
        assert set(torch.unique(z).tolist()) <= {0.0, 1.0}
    else:
        assert ((z >= 0) & (z <= 1)).all()


# ------------------------------------------------------------------ grad(): structures
def _structures(dtype=torch.float32):
    a = torch.tensor([0.3, -1.0], dtype=dtype)
    b = torch.tensor([[0.5], [2.0]], dtype=dtype)
    c = torch.tensor(0.7, dtype=dtype)
    return {
        "tensor": a,
        "list": [a, b],
        "tuple": (a, b, c),
        "dict": {"w": b, "v": a, "s": c},
    }


def _leaves(s):
    if isinstance(s, torch.Tensor):
        return [s]
    return list(s.values()) if isinstance(s, dict) else list(s)


def _flat_f(z):
    leaves = _leaves(z)
    n = leaves[0].shape[0]
    flat = torch.cat([leaf.reshape(n, -1) for leaf in leaves], dim=1)
    return ((flat - 0.45) ** 2).sum(-1) + flat[:, 0] * flat[:, -1]


@pytest.mark.parametrize("kind", ["tensor", "list", "tuple", "dict"])
@pytest.mark.parametrize("name", ALL)
def test_grad_shape_structure_detached(name, kind):
    logits = _structures()[kind]
    for leaf in _leaves(logits):
        leaf.requires_grad_(True)
    rec = Recorder(_flat_f)
    g = make(name, 0).grad(rec, logits, num_samples=5)
    assert type(g) is type(logits)
    if isinstance(logits, dict):
        assert list(g) == list(logits)
    # f received the same structure with a leading sample dimension
    z = rec.inputs[0]
    assert type(z) is type(logits)
    s = _leaves(z)[0].shape[0]
    for zl, leaf in zip(_leaves(z), _leaves(logits)):
        assert zl.shape == (s, *leaf.shape)
    for gl, leaf in zip(_leaves(g), _leaves(logits)):
        assert gl.shape == (5, *leaf.shape)
        assert not gl.requires_grad and gl.grad_fn is None
        assert torch.isfinite(gl).all()
        assert leaf.grad is None  # grad() never touches .grad


def test_exact_grad_structure():
    logits = _structures(torch.float64)["dict"]
    g = binopt.exact_grad(_flat_f, logits)
    assert list(g) == list(logits)
    for key in logits:
        assert g[key].shape == logits[key].shape and g[key].dtype == torch.float64


def test_zero_dim_logits():
    g = binopt.ARM().grad(lambda z: z * 2.0, torch.tensor(0.3), num_samples=4)
    assert g.shape == (4,)
    assert binopt.exact_grad(lambda z: z * 2.0, torch.tensor(0.0)).item() == pytest.approx(0.5)


# ------------------------------------------------------------ surrogate(): value, backward
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n", [1, 6])
def test_surrogate_value_is_monte_carlo_mean_of_f(name, n):
    rec = Recorder()
    logits = torch.tensor([0.2, -0.8, 1.5], dtype=torch.float64, requires_grad=True)
    loss = make(name, 0).surrogate(rec, logits, num_samples=n)
    assert loss.shape == () and loss.requires_grad
    if name == "exact":
        pi = torch.sigmoid(logits.detach())
        expect = 0.0
        for k, z in enumerate(rec.inputs[0].detach()):
            q = torch.where(z == 1, pi, 1 - pi).prod()
            expect = expect + q * rec.outputs[0][k]
        torch.testing.assert_close(loss.detach(), expect)
    else:
        # every evaluation is a draw of z (or of the relaxation): the value is their mean
        torch.testing.assert_close(loss.detach(), rec.outputs[0].mean())


@pytest.mark.parametrize("name", ALL)
def test_surrogate_backward_is_the_mean_of_grad(name):
    """With the same generator seed, surrogate(N).backward() leaves grad(N).mean(0)."""
    logits = torch.tensor([0.2, -0.8, 1.5], dtype=torch.float64, requires_grad=True)
    make(name, 3).surrogate(quadratic, logits, num_samples=9).backward()
    g = make(name, 3).grad(quadratic, logits, num_samples=9)
    torch.testing.assert_close(logits.grad, g.mean(0))


def test_surrogate_gives_theta_gradients():
    theta = torch.tensor(0.3, requires_grad=True)
    logits = torch.zeros(2, requires_grad=True)
    binopt.ARM().surrogate(lambda z: ((z - theta) ** 2).sum(-1), logits).backward()
    assert theta.grad is not None and logits.grad is not None


def test_moving_average_baseline_updates_after_surrogate_only():
    est = binopt.REINFORCE(baseline="moving_average", decay=0.75, generator=torch.Generator())
    assert est.baseline_value is None
    est.grad(quadratic, torch.zeros(2))
    assert est.baseline_value is None  # grad() is a pure diagnostic
    v1 = est.surrogate(quadratic, torch.zeros(2), num_samples=4).detach()
    assert est.baseline_value == v1
    v2 = est.surrogate(quadratic, torch.zeros(2), num_samples=4).detach()
    torch.testing.assert_close(est.baseline_value, 0.75 * v1 + 0.25 * v2)
    assert repr(est) == "REINFORCE(baseline='moving_average')"


# --------------------------------------------------------------- device and dtype follow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ALL)
def test_device_and_dtype_follow_logits(name, dtype, device):
    gen = torch.Generator(device=device) if device == "cuda" else None
    est = binopt.get_estimator(name, generator=gen, validate_args=device != "meta")
    logits = torch.zeros(3, dtype=dtype, device=device, requires_grad=True)
    rec = Recorder()
    g = est.grad(rec, logits, num_samples=4)
    assert g.dtype == dtype and g.device.type == device
    z = rec.inputs[0]
    assert z.dtype == dtype and z.device.type == device
    loss = est.surrogate(quadratic, logits, num_samples=4)
    assert loss.dtype == dtype and loss.device.type == device
    if device != "meta":
        loss.backward()
        assert logits.grad.dtype == dtype and logits.grad.device.type == device


# ------------------------------------------------------------------------- generators
@pytest.mark.parametrize("name", ALL)
def test_generator_reproducibility(name):
    logits = torch.tensor([0.3, -0.2, 1.0])
    g1 = make(name, 11).grad(quadratic, logits, num_samples=50)
    g2 = make(name, 11).grad(quadratic, logits, num_samples=50)
    assert torch.equal(g1, g2)
    est = make(name, 11)
    s1 = est.surrogate(quadratic, logits, num_samples=50)
    s2 = est.surrogate(quadratic, logits, num_samples=50)  # the generator moved on
    if name != "exact":
        assert not torch.equal(make(name, 12).grad(quadratic, logits, num_samples=50), g1)
        assert s1 != s2
    # without a generator, torch's global seed rules
    torch.manual_seed(5)
    d1 = make(name).grad(quadratic, logits, num_samples=50)
    torch.manual_seed(5)
    d2 = make(name).grad(quadratic, logits, num_samples=50)
    assert torch.equal(d1, d2)


# ------------------------------------------------------------------------------- exact
def test_exact_max_dim_message():
    est = binopt.Exact(max_dim=3)
    with pytest.raises(
        ValueError,
        match=r"exact enumeration is limited to 3 binary units \(2\^3 states\); got 4\. "
        r"Use a Monte Carlo estimator",
    ):
        est.grad(quadratic, torch.zeros(4))
    assert est.grad(quadratic, torch.zeros(3)).shape == (1, 3)
    assert binopt.MAX_EXACT_DIM == 20


def test_exact_expectation_by_hand():
    logits = torch.tensor([0.0, math.log(3.0)], dtype=torch.float64)  # pi = 1/2, 3/4

    def f(z):
        return 1.0 + 2.0 * z[:, 0] + 4.0 * z[:, 0] * z[:, 1]

    value = binopt.exact_expectation(f, logits)
    assert value.item() == pytest.approx(1.0 + 2.0 * 0.5 + 4.0 * 0.5 * 0.75)
    g = binopt.exact_grad(f, logits)
    # dE/d alpha_i = pi_i (1 - pi_i) dE/d pi_i
    torch.testing.assert_close(
        g, torch.tensor([0.25 * (2.0 + 4.0 * 0.75), 0.1875 * (4.0 * 0.5)], dtype=torch.float64)
    )


@pytest.mark.parametrize("name", ["arm", "disarm"])
@pytest.mark.parametrize("n", [1, 3])
def test_antithetic_pair_estimates_by_hand(name, n):
    """ARM and DisARM from their formulas (DESIGN.md 2), with the uniforms the estimator
    draws."""
    logits = torch.tensor([-1.5, -0.2, 0.0, 0.7, 2.0], dtype=torch.float64)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=torch.float64)

    def f(z):
        return (z * w).sum(-1) + 0.7 * z[:, 0] * z[:, 3]

    got = make(name, seed=11).grad(f, logits, num_samples=n)
    u = torch.rand((n, 5), generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    p = torch.sigmoid(logits)
    z1, z2 = (u > 1 - p).double(), (u < p).double()
    f1, f2 = f(z1)[:, None], f(z2)[:, None]
    if name == "arm":
        expected = (f1 - f2) * (u - 0.5)
    else:  # b = z2, b~ = z1
        expected = (0.5 * (f2 - f1) * (1 - 2 * z1) * (z2 != z1).double()
                    * torch.sigmoid(logits.abs()))
    torch.testing.assert_close(got, expected)
    # and the surrogate's value is the mean of both samples' values
    value = make(name, seed=11).surrogate(f, logits.clone().requires_grad_(), n)
    assert value.item() == pytest.approx(float(torch.cat([f1, f2]).mean()))


def test_attach_gradient_sets_gradients_and_keeps_the_value():
    theta = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    value = torch.stack([theta ** 2, 3 * theta])  # (N,) = (2,)
    a = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    coef_a = torch.arange(6, dtype=torch.float64).view(2, 3)
    coef_b = torch.tensor([[1.0], [-2.0]], dtype=torch.float64)  # broadcast over 4 units
    out = base_module.attach_gradient(value, [coef_a, coef_b], [a, b])
    torch.testing.assert_close(out, value.detach())
    (out * torch.tensor([1.0, 10.0], dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(a.grad, coef_a * torch.tensor([[1.0], [10.0]],
                                                             dtype=torch.float64))
    torch.testing.assert_close(b.grad, torch.tensor([[1.0], [-20.0]],
                                                    dtype=torch.float64).expand(2, 4))
    assert theta.grad.item() == pytest.approx(2 * 2.0 + 10 * 3)


# ------------------------------------------------------------------- gates and samples
def test_hard_concrete_gates_by_hand():
    est = binopt.HardConcrete()
    assert (est.beta, est.gamma, est.zeta) == (2.0 / 3.0, -0.1, 1.1)
    log_a = torch.tensor([-3.0, 0.0, 0.5, 3.0], dtype=torch.float64)
    # DESIGN.md 2: P(z != 0) = sigma(log a - beta log(-gamma / zeta))
    shift = (2.0 / 3.0) * math.log(0.1 / 1.1)  # = -1.59859...
    expect = [1.0 / (1.0 + math.exp(-(x - shift))) for x in log_a.tolist()]
    torch.testing.assert_close(est.prob_nonzero(log_a), torch.tensor(expect, dtype=torch.float64))
    assert est.prob_nonzero(torch.tensor(0.5, dtype=torch.float64)).item() == pytest.approx(
        0.8907667, abs=1e-6
    )
    # deterministic gate: min(1, max(0, sigma(log a)(zeta - gamma) + gamma))
    gate = est.deterministic_gate(log_a)
    sig = [1.0 / (1.0 + math.exp(-x)) for x in log_a.tolist()]
    by_hand = [min(1.0, max(0.0, s * 1.2 - 0.1)) for s in sig]
    torch.testing.assert_close(gate, torch.tensor(by_hand, dtype=torch.float64))
    assert gate[0] == 0.0 and gate[3] == 1.0  # clipped at both ends
    assert gate[2].item() == pytest.approx(0.6224593 * 1.2 - 0.1, abs=1e-6)


def test_hard_concrete_prob_nonzero_matches_samples():
    est = binopt.HardConcrete(generator=torch.Generator().manual_seed(0))
    log_a = torch.tensor([-1.0, 0.0, 1.5], dtype=torch.float64)
    n = 200_000
    z = est.sample(log_a, (n,))
    assert z.shape == (n, 3) and ((z >= 0) & (z <= 1)).all()
    assert (z == 0).any() and (z == 1).any()  # the stretch-and-clip puts mass on both ends
    p = est.prob_nonzero(log_a)
    freq = (z != 0).double().mean(0)
    se = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 5 * se).all(), (freq, p)
    # prob_nonzero is differentiable (it is the L0 penalty)
    x = log_a.clone().requires_grad_()
    est.prob_nonzero(x).sum().backward()
    assert (x.grad > 0).all()


@pytest.mark.parametrize("name", ["reinforce", "arm", "disarm", "exact", "straight_through"])
def test_bernoulli_gates(name):
    est = make(name, 0)
    logits = torch.tensor([-2.0, 0.0, 0.1, 3.0])
    pi = torch.sigmoid(logits)
    torch.testing.assert_close(est.prob_nonzero(logits), pi)
    # test-time gate (L0-ARM reference): keep where pi >= 1/2, carrying pi
    torch.testing.assert_close(
        est.deterministic_gate(logits), torch.tensor([0.0, 0.5, pi[2], pi[3]])
    )
    z = est.sample(logits, (20_000,))
    assert z.shape == (20_000, 4) and set(torch.unique(z).tolist()) <= {0.0, 1.0}
    assert ((z.mean(0) - pi).abs() <= 5 * (pi * (1 - pi) / 20_000).sqrt()).all()


@pytest.mark.parametrize("name", ["gumbel", "hard_concrete", "straight_through"])
def test_rsample_is_differentiable(name):
    est = make(name, 0)
    logits = torch.zeros(3, requires_grad=True)
    z = est.rsample(logits, (5,))
    assert z.shape == (5, 3) and z.requires_grad
    z.sum().backward()
    assert logits.grad is not None
    assert not est.sample(logits, (5,)).requires_grad


# -------------------------------------------------------------------------- registry
@pytest.mark.parametrize(
    "spec,cls",
    [
        ("arm", binopt.ARM),
        ("DisARM", binopt.DisARM),
        ("score_function", binopt.REINFORCE),
        ("sf", binopt.REINFORCE),
        ("loo", binopt.REINFORCELOO),
        ("rloo", binopt.REINFORCELOO),
        ("st", binopt.StraightThrough),
        ("straight-through", binopt.StraightThrough),
        ("concrete", binopt.GumbelSigmoid),
        ("gumbel_sigmoid", binopt.GumbelSigmoid),
        ("hc", binopt.HardConcrete),
        ("L0-HC", binopt.HardConcrete),
        ("enumeration", binopt.Exact),
        (binopt.ARM, binopt.ARM),
    ],
)
def test_get_estimator(spec, cls):
    est = binopt.get_estimator(spec)
    assert type(est) is cls
    inst = cls()
    assert binopt.get_estimator(inst) is inst


def test_options_and_repr():
    assert repr(binopt.get_estimator("arm")) == "ARM()"
    assert (
        repr(binopt.get_estimator("reinforce_loo", num_samples=4)) == "REINFORCELOO(num_samples=4)"
    )
    est = binopt.get_estimator("gumbel", temperature=0.5, hard=True)
    assert est.temperature == 0.5 and est.hard
    assert "temperature=0.5" in repr(est)


def test_register_estimator():
    @binopt.register_estimator(aliases=("half_arm",))
    class HalfARM(binopt.ARM):
        name = "test_half_arm"

    try:
        assert "test_half_arm" in binopt.available_estimators()
        assert type(binopt.get_estimator("half_arm")) is HalfARM
    finally:
        base_module._REGISTRY.pop("test_half_arm")
        base_module._ALIASES.pop("half_arm")
    assert "test_half_arm" not in binopt.available_estimators()
    with pytest.raises(TypeError, match=r"expects an Estimator subclass; got <class 'int'>"):
        binopt.register_estimator(int)


def test_register_estimator_refuses_to_replace_silently(monkeypatch):
    monkeypatch.setattr(base_module, "_REGISTRY", dict(base_module._REGISTRY))
    monkeypatch.setattr(base_module, "_ALIASES", dict(base_module._ALIASES))

    class ScaledARM(binopt.ARM):  # forgot its own name: it would have replaced ARM
        pass

    with pytest.raises(ValueError, match="ScaledARM needs a name of its own.*inherits name = "
                       "'arm'"):
        binopt.register_estimator(ScaledARM)
    assert binopt.get_estimator("arm").__class__ is binopt.ARM

    class Mine(binopt.ARM):
        name = "disarm"

    with pytest.raises(ValueError, match="'disarm' is taken by binopt.estimators.arm.DisARM"):
        binopt.register_estimator(Mine)
    with pytest.raises(ValueError, match="'arm' is taken by binopt.estimators.arm.ARM"):
        binopt.register_estimator(aliases=("arm",))(type("Other", (binopt.ARM,),
                                                          {"name": "test_other"}))
    assert "test_other" not in binopt.available_estimators()
    assert binopt.register_estimator(Mine, replace=True) is Mine
    assert type(binopt.get_estimator("disarm")) is Mine

    def define():  # the same class defined again (a re-run notebook cell) replaces itself
        class Cell(binopt.ARM):
            name = "test_cell"
        return binopt.register_estimator(Cell)

    first, second = define(), define()
    assert first is not second and type(binopt.get_estimator("test_cell")) is second


def test_surrogate_rows_gives_each_row_its_own_unbiased_gradient():
    """Row n of the logits is problem n with its own f_n: the per-row gradients average to
    the exact per-row gradients (5 standard errors)."""
    import binopt as _b

    torch.manual_seed(0)
    n_rows, dim = 3, 2
    logits = torch.randn(n_rows, dim, dtype=torch.float64)
    targets = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)

    reps = 4000
    est = _b.get_estimator("disarm", generator=torch.Generator().manual_seed(1))
    grads = []
    for _ in range(reps // 100):
        leaf = logits.unsqueeze(0).expand(100, n_rows, dim).reshape(100 * n_rows, dim).clone()
        leaf.requires_grad_(True)

        def f_big(z, _n=100):  # sample s belongs to row s % (rows in leaf), i.e. problem % 3
            idx = torch.arange(z.shape[0]) % (n_rows * _n) % n_rows
            t = targets[idx]
            return ((z - t.unsqueeze(1)) ** 2).sum(1) * (1 + idx)

        est.surrogate_rows(f_big, leaf).sum().backward()
        grads.append(leaf.grad.reshape(100, n_rows, dim))
    g = torch.cat(grads)
    for row in range(n_rows):
        exact = _b.exact_grad(
            lambda z, r=row: ((z - targets[r]) ** 2).sum(1) * (1 + r), logits[row]
        )
        mean, se = g[:, row].mean(0), g[:, row].std(0) / reps**0.5
        assert torch.all((mean - exact).abs() <= 5 * se + 1e-12), (row, mean, exact, se)
    # rows are NOT averaged together: row 0's gradient differs from row 2's exact gradient
    assert not torch.allclose(g[:, 0].mean(0), g[:, 2].mean(0), atol=0.05)


def test_surrogate_rows_rejects_exact_and_non_tensor():
    import binopt as _b

    with pytest.raises(ValueError, match="independent rows"):
        _b.Exact().surrogate_rows(lambda z: z.sum(1), torch.zeros(2, 3))
    with pytest.raises(TypeError, match="torch.Tensor of shape"):
        _b.ARM().surrogate_rows(lambda z: z.sum(1), [torch.zeros(2, 3)])


# ------------------------------------------------- edge cases found in review (2026-11)
SAMPLE_FREE = [n for n in ALL if not PROPERTIES[n][3]]  # samples carry no gradient


@pytest.mark.parametrize("name", SAMPLE_FREE)
def test_f_may_modify_its_samples_in_place(name):
    """An f that scales its samples in place gets the same estimates as a pure f: no
    estimator reads the samples again after f has run. (Reparameterized samples are left
    out: autograd itself refuses in-place changes it would need for the backward pass.)"""
    w = torch.tensor([1.0, 3.0, -2.0], dtype=torch.float64)
    logits = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
    expected = make(name, 3).grad(lambda z: ((z * w).sum(-1) - 1) ** 2, logits, num_samples=64)
    got = make(name, 3).grad(lambda z: (z.mul_(w).sum(-1) - 1) ** 2, logits, num_samples=64)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_exact_variance_table_survives_an_in_place_f():
    w = torch.tensor([1.0, 3.0], dtype=torch.float64)
    logits = torch.tensor([0.3, -0.7], dtype=torch.float64)

    def pure(z):
        return ((z * w).sum(-1) - 1) ** 2

    def in_place(z):
        return ((z.mul_(w)).sum(-1) - 1) ** 2

    for name in ("reinforce", "reinforce_loo", "arm", "disarm"):
        a = binopt.diagnostics.exact_variance(name, pure, logits)
        b = binopt.diagnostics.exact_variance(name, in_place, logits)
        torch.testing.assert_close(b["variance"], a["variance"])
        torch.testing.assert_close(b["mean"], a["mean"])


@pytest.mark.parametrize("name", ALL)
def test_grad_works_under_inference_mode(name):
    logits = torch.tensor([0.3, -0.2, 1.0])
    expected = make(name, 4).grad(quadratic, logits, num_samples=8)
    with torch.inference_mode():
        got = make(name, 4).grad(quadratic, logits, num_samples=8)
    torch.testing.assert_close(got, expected)


def test_exact_grad_under_inference_mode():
    with torch.inference_mode():
        g = binopt.exact_grad(quadratic, torch.zeros(2))
    torch.testing.assert_close(g, binopt.exact_grad(quadratic, torch.zeros(2)))


@pytest.mark.parametrize("name", ["arm", "disarm", "reinforce", "reinforce_loo",
                                  "straight_through"])
@pytest.mark.parametrize("draw", [0.0, 1.0 - 2.0**-24])  # torch.rand's extreme values
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_saturated_gates_sample_deterministically(name, draw, dtype, monkeypatch):
    """``safe_logit`` closes a gate at pi = sigmoid(-87.3), about 1e-38 in float32, not 0.
    A uniform draw of exactly 0 must not open it, nor the largest draw close an open one.
    In half precision the bound is float32's too, since the noise is compared in float32
    (float16's own bound, 9.7, would leave a closed gate open with probability 6e-5)."""
    logits = binopt.parameterizations.safe_logit(torch.tensor([0.0, 1.0], dtype=dtype))
    assert logits.dtype == dtype  # closed, open
    bound = -math.log(torch.finfo(torch.float32).tiny)
    assert float(logits[1]) == pytest.approx(bound, abs=0.2) == -float(logits[0])
    assert torch.sigmoid(logits[0].float()) > 0  # the case: pi is tiny, not 0
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.full(
        shape, draw, dtype=kw.get("dtype"), device=kw.get("device")))
    seen = []

    def f(z):
        seen.append(z.detach().clone())
        return z.sum(-1)

    make(name).grad(f, logits, num_samples=4)
    z = torch.cat([s.reshape(-1, 2) for s in seen])
    assert (z[:, 0] == 0).all() and (z[:, 1] == 1).all(), z
    samples = make(name).sample(logits, (3,))
    assert (samples[:, 0] == 0).all() and (samples[:, 1] == 1).all()


@pytest.mark.parametrize("name", ["gumbel", "hard_concrete", "straight_through"])
def test_relaxed_estimators_reject_an_f_not_differentiable_in_z(name):
    with pytest.raises(ValueError, match="differentiates f through its samples"):
        make(name, 0).grad(lambda z: (z > 0.5).sum(-1).float(), torch.zeros(3))
    with pytest.raises(ValueError, match="differentiates f through its samples"):
        logits = torch.zeros(3, requires_grad=True)
        make(name, 0).surrogate(lambda z: torch.ones(z.shape[0]), logits)
    # a score-function estimator takes such an f
    make("arm", 0).grad(lambda z: (z > 0.5).sum(-1).float(), torch.zeros(3))


@pytest.mark.parametrize("name", ["gumbel", "hard_concrete", "straight_through"])
def test_relaxed_estimators_reject_an_f_not_differentiable_in_z_but_in_theta(name):
    """With a parameter inside f, f's values require grad although they do not depend on
    the samples: the logits used to get a silent zero gradient (None after backward)."""
    theta = torch.tensor(2.0, requires_grad=True)
    logits = torch.zeros(3, requires_grad=True)
    for f in [lambda z: theta * (z > 0.5).sum(-1).float(),
              lambda z: theta * z.detach().sum(-1)]:
        with pytest.raises(ValueError, match="differentiates f through its samples"):
            make(name, 0).grad(f, logits)
        with pytest.raises(ValueError, match="differentiates f through its samples"):
            make(name, 0).surrogate(f, logits)
    # f using only one leaf of a structure, or modifying its samples in place, is fine
    make(name, 0).surrogate(lambda z: theta * z[1].sum(-1), [logits, logits * 2]).backward()
    assert logits.grad is not None and (logits.grad != 0).any()

    def in_place(z):
        z = z.clone() if name != "straight_through" else z  # (autograd saved the sigmoid)
        return (z.mul_(2) * theta).sum(-1)

    make(name, 0).grad(in_place, logits)
    # the check walks f's graph, so it follows validate_args; without, the zero is silent
    est = binopt.get_estimator(name, validate_args=False)
    assert (est.grad(lambda z: theta * z.detach().sum(-1), logits) == 0).all()


def test_namedtuple_logits():
    from collections import namedtuple

    pair = namedtuple("Pair", "a b")
    logits = pair(torch.tensor([0.2]), torch.tensor([-0.4, 0.1]))
    g = binopt.exact_grad(lambda z: z.a.sum(-1) * z.b.sum(-1), logits)
    assert isinstance(g, pair) and g.a.shape == (1,) and g.b.shape == (2,)
    est = make("arm", 0).grad(lambda z: z.a.sum(-1) * z.b.sum(-1), logits, num_samples=3)
    assert isinstance(est, pair) and est.b.shape == (3, 2)


def test_exact_is_exact_under_autocast():
    """Under (CPU bf16) autocast, the enumeration's matmul must stay in the logits' float32:
    in bf16 the oracle's gradient was 17% off on 12 units."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(12, generator=gen)
    w = torch.randn(12, generator=gen)

    def f(z):
        return (z * w).sum(-1) ** 2

    expected = binopt.exact_grad(f, logits.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = binopt.exact_grad(f, logits)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-5)


def test_get_estimator_names_unknown_options_and_the_accepted_ones():
    # the options of the subclass and those its **kwargs pass on to the base class
    with pytest.raises(TypeError, match=r"^REINFORCELOO takes no option 'foo', 'tau'; its "
                       r"options: generator, num_samples, validate_args$"):
        binopt.get_estimator("reinforce_loo", tau=1.0, foo=2)
    with pytest.raises(TypeError, match=r"^HardConcrete takes no option 'temperature'; its "
                       r"options: beta, gamma, generator, validate_args, zeta$"):
        binopt.get_estimator(binopt.HardConcrete, temperature=0.5)
    assert binopt.get_estimator("hard_concrete", beta=0.5).beta == 0.5

    class Open(binopt.ARM):  # an __init__ that takes anything: nothing to check against
        def __init__(self, **kwargs):
            self.extra = kwargs.pop("extra", None)
            super().__init__(**kwargs)

    assert binopt.get_estimator(Open, extra=1).extra == 1
