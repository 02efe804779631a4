"""Argument checks at the public boundary: every error names what was expected and what came.

There is no GPU in CI, so mixed devices use the ``meta`` device next to ``cpu``.
"""

from __future__ import annotations

import pytest
import torch

import binopt
from binopt.parameterizations import CallableParameterization, get_parameterization

ALL = binopt.available_estimators()


def f_sum(z):
    return z.sum(-1)


@pytest.fixture
def validation_on():
    """Restore the global switch whatever a test does with it."""
    before = binopt.validate_args_enabled()
    binopt.set_validate_args(True)
    yield
    binopt.set_validate_args(before)


@pytest.fixture(params=ALL)
def est(request):
    return binopt.get_estimator(request.param)


# ----------------------------------------------------------------------------- logits
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_logits(est, bad, validation_on):
    logits = torch.tensor([0.0, bad, 1.0])
    with pytest.raises(
        ValueError, match=r"logits must be finite; got 1 NaN/inf value\(s\).*\(3,\)"
    ):
        est.grad(f_sum, logits)
    with pytest.raises(ValueError, match=r"logits\[1\] must be finite; got 1 NaN/inf"):
        est.surrogate(f_sum, [torch.zeros(2), logits])


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_non_floating_logits(est, dtype):
    logits = torch.zeros(3, dtype=dtype)
    with pytest.raises(TypeError, match=rf"logits must have a floating-point dtype; got {dtype}"):
        est.grad(f_sum, logits)


def test_integer_leaf_in_a_dict(est):
    # a dict leaf is named by its key, not its position
    with pytest.raises(TypeError, match=r"logits\['b'\] must have a floating-point dtype; got tor"):
        est.grad(f_sum, {"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.long)})


@pytest.mark.parametrize(
    "logits,exc,pattern",
    [
        ({}, ValueError, r"at least one tensor; got an empty container"),
        ([], ValueError, r"at least one tensor; got an empty container"),
        ((), ValueError, r"at least one tensor; got an empty container"),
        ([0.0, 1.0], TypeError, r"logits\[0\] must be a torch.Tensor; got float"),
        ({"w": torch.zeros(2), "b": None}, TypeError, r"logits\['b'\] must be a torch.Tensor; got"),
        (0.5, TypeError, r"logits must be a torch.Tensor, a list/tuple.*; got float"),
        ("abc", TypeError, r"logits must be a torch.Tensor, a list/tuple.*; got str"),
    ],
)
def test_bad_structures(est, logits, exc, pattern):
    with pytest.raises(exc, match=pattern):
        est.grad(f_sum, logits)


def test_mixed_devices(est, validation_on):
    cpu, meta = torch.zeros(2), torch.zeros(2, device="meta")
    with pytest.raises(
        ValueError, match=r"one device; logits\[0\] is on cpu but logits\[1\] is on meta"
    ):
        est.grad(f_sum, [cpu, meta])
    # order does not matter, and the value check never touches the meta tensor first
    with pytest.raises(ValueError, match=r"logits\['a'\] is on meta but logits\['b'\] is on cpu"):
        est.grad(f_sum, {"a": meta, "b": cpu})


def test_f_returning_another_device(est):
    with pytest.raises(ValueError, match=r"f returned a tensor on meta; expected cpu"):
        est.grad(lambda z: z.sum(-1).to("meta"), torch.zeros(3))


def test_generator_on_another_device(est):
    est = type(est)(generator=torch.Generator(), validate_args=False)
    with pytest.raises(ValueError, match=r"generator is on cpu but the logits are on meta"):
        est.grad(f_sum, torch.zeros(2, device="meta"))


def test_meta_logits_with_validation_on(validation_on):
    # meta tensors carry no values: the finiteness check is skipped, shapes still flow
    g = binopt.ARM().grad(
        lambda z: z.sum((-1, -2)), torch.zeros(2, 3, device="meta"), num_samples=4
    )
    assert g.shape == (4, 2, 3) and g.device.type == "meta"


# ------------------------------------------------------------------------ f's output
@pytest.mark.parametrize(
    "out,pattern",
    [
        (lambda z: z, r"expected shape \((\d+),\) .*leading dimension \1; got shape \(\1, 3\)"),
        (lambda z: z.sum(), r"expected shape \(\d+,\).*; got shape \(\)"),
        (lambda z: z.sum(-1, keepdim=True), r"expected shape \((\d+),\).*; got shape \(\1, 1\)"),
        (lambda z: z.sum(-1)[:1], r"expected shape \(\d+,\).*; got shape \(1,\)"),
    ],
)
def test_f_wrong_shape(est, out, pattern):
    with pytest.raises(ValueError, match=rf"f must return one value per sample: {pattern}"):
        est.grad(out, torch.zeros(3), num_samples=2)


@pytest.mark.parametrize(
    "out,exc,pattern",
    [
        (lambda z: 1.0, TypeError, r"f must return a torch.Tensor of shape \(\d+,\).*; got float"),
        (lambda z: None, TypeError, r"f must return a torch.Tensor .*; got NoneType"),
        (lambda z: z.sum(-1).numpy(), TypeError, r"got ndarray"),
        (lambda z: z.sum(-1).long(), TypeError, r"floating-point tensor.*; got dtype torch.int64"),
        (lambda z: z.sum(-1) > 0, TypeError, r"floating-point tensor.*; got dtype torch.bool"),
    ],
)
def test_f_wrong_type(est, out, exc, pattern):
    with torch.no_grad():
        with pytest.raises(exc, match=pattern):
            est.grad(lambda z: out(z.detach()), torch.zeros(3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_f_non_finite(est, bad, validation_on):
    def f(z):
        v = z.sum(-1)
        return torch.where(torch.arange(v.shape[0]) == 0, torch.full_like(v, bad), v)

    with pytest.raises(ValueError, match=r"f must return finite values; got 1 NaN/inf value\(s\)"):
        est.grad(f, torch.zeros(3), num_samples=2)


def test_not_callable(est):
    with pytest.raises(TypeError, match=r"f must be callable; got int"):
        est.grad(3, torch.zeros(2))


# ---------------------------------------------------------------- validate_args switch
def test_set_validate_args_false_skips_value_checks(validation_on):
    nan_logits = torch.tensor([0.0, float("nan")])

    def f_nan(z):
        return z.sum(-1) * float("nan")

    binopt.set_validate_args(False)
    assert not binopt.validate_args_enabled()
    for name in ALL:
        est = binopt.get_estimator(name)
        assert est.validate_args is False
        est.grad(f_sum, nan_logits)  # no error: NaN propagates instead
        est.grad(f_nan, torch.zeros(2))
        # structural checks stay on
        with pytest.raises(ValueError, match=r"expected shape"):
            est.grad(lambda z: z, torch.zeros(2), num_samples=3)
        # a per-estimator setting wins over the global one
        with pytest.raises(ValueError, match=r"must be finite"):
            binopt.get_estimator(name, validate_args=True).grad(f_sum, nan_logits)
    binopt.set_validate_args(True)
    with pytest.raises(ValueError, match=r"must be finite"):
        binopt.ARM().grad(f_sum, nan_logits)
    binopt.ARM(validate_args=False).grad(f_sum, nan_logits)


def test_set_validate_args_type(validation_on):
    with pytest.raises(TypeError, match=r"set_validate_args expects a bool; got int"):
        binopt.set_validate_args(1)
    with pytest.raises(TypeError, match=r"validate_args must be a bool or None; got 'yes'"):
        binopt.ARM(validate_args="yes")


# -------------------------------------------------------------------- other arguments
@pytest.mark.parametrize(
    "n,exc,pattern",
    [
        (0, ValueError, r"num_samples must be >= 1; got 0"),
        (-3, ValueError, r"num_samples must be >= 1; got -3"),
        (2.0, TypeError, r"num_samples must be a positive int; got float"),
        (True, TypeError, r"num_samples must be a positive int; got bool"),
        (None, TypeError, r"num_samples must be a positive int; got NoneType"),
    ],
)
def test_num_samples(est, n, exc, pattern):
    with pytest.raises(exc, match=pattern):
        est.grad(f_sum, torch.zeros(2), num_samples=n)
    with pytest.raises(exc, match=pattern):
        est.surrogate(f_sum, torch.zeros(2), num_samples=n)


def test_unknown_estimator_lists_the_names():
    names = ", ".join(ALL)
    with pytest.raises(ValueError, match=rf"unknown estimator 'armm'; expected one of {names}"):
        binopt.get_estimator("armm")
    with pytest.raises(TypeError, match=r"a name, an Estimator class or instance; got 3"):
        binopt.get_estimator(3)
    with pytest.raises(ValueError, match=r"options \['temperature'\] cannot be applied to an"):
        binopt.get_estimator(binopt.ARM(), temperature=1.0)


@pytest.mark.parametrize("gen", [0, "cpu", torch.zeros(1), object()])
def test_generator_of_wrong_type(gen):
    kind = type(gen).__name__
    for name in ALL:
        with pytest.raises(
            TypeError, match=rf"generator must be a torch.Generator or None; got {kind}"
        ):
            binopt.get_estimator(name, generator=gen)


@pytest.mark.parametrize(
    "make,exc,pattern",
    [
        (lambda: binopt.REINFORCE(baseline="mean"), ValueError, r"baseline must be None or 'mov"),
        (lambda: binopt.REINFORCE(decay=1.0), ValueError, r"decay must be in \[0, 1\); got 1.0"),
        (lambda: binopt.REINFORCE(decay="slow"), TypeError, r"decay must be a number; got 'sl"),
        (lambda: binopt.REINFORCELOO(num_samples=1), ValueError, r"int num_samples >= 2; got 1"),
        (lambda: binopt.REINFORCELOO(num_samples=2.0), ValueError, r">= 2; got 2.0"),
        (
            lambda: binopt.GumbelSigmoid(temperature=0),
            ValueError,
            r"temperature must be a positive",
        ),
        (lambda: binopt.GumbelSigmoid(temperature=float("nan")), ValueError, r"got nan"),
        (lambda: binopt.HardConcrete(beta=-1), ValueError, r"beta must be a positive.*got -1"),
        (
            lambda: binopt.HardConcrete(gamma=0.1),
            ValueError,
            r"gamma < 0 and zeta > 1; got 0.1, 1.1",
        ),
        (lambda: binopt.HardConcrete(zeta=0.9), ValueError, r"got -0.1, 0.9"),
        # non-finite or non-numeric stretch limits used to pass (and gave NaN gates)
        (lambda: binopt.HardConcrete(gamma=-float("inf")), ValueError,
         r"gamma must be a finite number; got -inf"),
        (lambda: binopt.HardConcrete(zeta=float("inf")), ValueError,
         r"zeta must be a finite number; got inf"),
        (lambda: binopt.HardConcrete(gamma="low"), TypeError,
         r"gamma must be a number; got 'low'"),
        (lambda: binopt.GumbelSigmoid(temperature=None), TypeError,
         r"temperature must be a number; got None"),
        # bool("false") is True: a string used to switch the hard forward pass on
        (lambda: binopt.GumbelSigmoid(hard="false"), TypeError, r"hard must be a bool; got 'f"),
        # int(2.5) == 2, int(True) == 1 and a negative limit used to be taken silently
        (lambda: binopt.Exact(max_dim=2.5), TypeError, r"max_dim must be an int.*; got 2.5"),
        (lambda: binopt.Exact(max_dim=True), TypeError, r"max_dim must be an int.*; got True"),
        (lambda: binopt.Exact(max_dim=-1), ValueError, r"max_dim must be >= 0; got -1"),
    ],
)
def test_estimator_options(make, exc, pattern):
    with pytest.raises(exc, match=pattern):
        make()


def test_estimator_options_still_accepted():
    assert binopt.GumbelSigmoid(hard=1).hard is True
    assert binopt.HardConcrete(gamma=torch.tensor(-0.25), zeta=2).gamma == -0.25
    assert binopt.Exact(max_dim=0).max_dim == 0


# --------------------------------------------------------------------- sample / rsample
@pytest.mark.parametrize("name", ALL)
def test_sample_checks_its_arguments(name, validation_on):
    """sample() is a public entry point too: it used to fail with torch's internals on
    integer logits ('check_uniform_bounds' not implemented for 'Long') and to sample NaN
    logits silently (ARM as closed gates, the relaxations as NaN)."""
    est = binopt.get_estimator(name)
    methods = [est.sample] + ([est.rsample] if hasattr(est, "rsample") else [])
    for method in methods:
        with pytest.raises(TypeError, match=r"logits must have a floating-point dtype; got "
                                            r"torch.int64"):
            method(torch.tensor([0, 1]))
        with pytest.raises(ValueError, match=r"logits must be finite; got 1 NaN/inf"):
            method(torch.tensor([0.0, float("nan")]))
        with pytest.raises(TypeError, match=rf"{type(est).__name__}.{method.__name__} takes "
                                            r"one tensor of logits; got list"):
            method([torch.zeros(2)])
        with pytest.raises(TypeError, match=r"sample_shape must be a tuple of non-negative "
                                            r"ints \(or one int\); got \(2.0,\)"):
            method(torch.zeros(2), (2.0,))
        with pytest.raises(TypeError, match=r"sample_shape must be .*; got \(-1,\)"):
            method(torch.zeros(2), (-1,))
        assert method(torch.zeros(2), 3).shape == (3, 2)  # an int n means (n,)
        assert method(torch.zeros(2), torch.Size([2, 1])).shape == (2, 1, 2)
    # value checks follow validate_args
    binopt.get_estimator(name, validate_args=False).sample(torch.tensor([float("nan")]))


def test_exact_max_dim():
    with pytest.raises(ValueError, match=r"limited to 20 binary units \(2\^20 states\); got 21"):
        binopt.exact_grad(f_sum, torch.zeros(21))
    with pytest.raises(ValueError, match=r"limited to 4 binary units.*; got 5"):
        binopt.exact_expectation(f_sum, {"a": torch.zeros(2), "b": torch.zeros(3)}, max_dim=4)


def test_parameterization_arguments():
    with pytest.raises(ValueError, match=r"unknown parameterization 'tanh'; expected one of"):
        get_parameterization("tanh")
    with pytest.raises(TypeError, match=r"a name, a Parameterization or a callable; got 3"):
        get_parameterization(3)
    with pytest.raises(TypeError, match=r"fn must be callable; got str"):
        CallableParameterization("sigmoid")
    with pytest.raises(ValueError, match=r"k must be positive; got -1.0"):
        get_parameterization("scaled_sigmoid", k=-1)
    with pytest.raises(ValueError, match=r"k must be positive; got 0.0"):
        get_parameterization("hard_sigmoid", k=0)
    param = CallableParameterization(lambda phi: torch.sigmoid(phi).sum())
    with pytest.raises(ValueError, match=r"must return a tensor of shape \(3,\); got \(\)"):
        param.logits(torch.zeros(3))
    with pytest.raises(ValueError, match=r"strictly inside \(0, 1\); got 1.0"):
        get_parameterization("sigmoid").inverse(1.0)
    with pytest.raises(NotImplementedError, match=r"CallableParameterization has no inverse"):
        CallableParameterization(torch.sigmoid).inverse(0.5)
