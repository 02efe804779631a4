"""The search space: command-line syntax, fixed parts, conditional parameters."""

from __future__ import annotations

import optuna
import pytest

from applications.tune.space import FloatRange, SearchSpace, parse_choices, parse_float_spec


def test_parse_float_spec_fixed_and_range():
    assert parse_float_spec("0.1", log=True, name="lam") == FloatRange(0.1, 0.1)
    assert parse_float_spec("0.1", log=True, name="lam").fixed
    r = parse_float_spec("1e-3:1", log=True, name="lam")
    assert (r.low, r.high, r.log, r.fixed) == (1e-3, 1.0, True, False)
    assert parse_float_spec("2:10", log=False, name="k").describe() == "2:10"


@pytest.mark.parametrize(
    "text", ["", "a", "1:2:3", "2:1", "0:1", ":1", "nan:1"],
)
def test_parse_float_spec_rejects(text):
    with pytest.raises(ValueError):
        parse_float_spec(text, log=True, name="lam", low=0.0)


def test_parse_float_spec_bounds():
    with pytest.raises(ValueError) as info:
        parse_float_spec("0.5:1.5", log=False, name="init-drop-rate", low=0.0, high=1.0,
                         exclusive=True)
    assert str(info.value) == (
        "--init-drop-rate takes a number in (0, 1) or a range LOW:HIGH with 0 < LOW <= HIGH "
        "< 1; got '0.5:1.5'")
    with pytest.raises(ValueError, match=r"--k takes a number > 0 .*; got '0'"):
        parse_float_spec("0", log=False, name="k", low=0.0, exclusive=True)
    assert parse_float_spec("1", log=False, name="p", low=0.0, high=1.0).fixed  # inclusive
    # lam = 0 (no L0 penalty) is a valid fixed value; only a log-scale *range* needs LOW > 0
    zero = parse_float_spec("0", log=True, name="lam", low=0.0)
    assert zero.fixed and zero.low == 0.0 and not zero.log


@pytest.mark.parametrize("text", ["-1", "0:1", "2:1", "1:2:3", "x", "nan"])
def test_lam_errors_name_the_option_the_syntax_and_the_value(text, capsys):
    """``--lam -1`` used to say ``values must lie in [0.0, None]``: no option, no syntax."""
    from applications.cli import main

    assert main(["tune", f"--lam={text}", "--trials", "1"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == (
        "binopt: error: --lam takes a number >= 0 or a range LOW:HIGH with 0 < LOW <= HIGH "
        f"(log scale); got {text!r}")



def test_parse_choices():
    assert parse_choices("arm, DisARM", name="estimator", allowed=["arm", "disarm"]) == (
        "arm", "disarm")
    with pytest.raises(ValueError, match="unknown value"):
        parse_choices("arm,nope", name="estimator", allowed=["arm"])
    with pytest.raises(ValueError):
        parse_choices(" , ", name="estimator", allowed=["arm"])


def test_space_rejects_exact_estimator():
    with pytest.raises(ValueError, match="exact"):
        SearchSpace(estimator=("exact",))


def _sample(space: SearchSpace, n: int, layer_names=None) -> list[tuple[dict, dict]]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    out = []
    for _ in range(n):
        trial = study.ask()
        cfg = space.suggest(trial, layer_names)
        study.tell(trial, 0.0)
        out.append((cfg, dict(trial.params)))
    return out


def test_fixed_parts_are_not_optuna_parameters():
    space = SearchSpace(
        lam=FloatRange(0.1, 0.1), parameterization=("scaled_sigmoid",), k=FloatRange(7, 7),
        estimator=("arm",), init_drop_rate=FloatRange(0.3, 0.3), lr=FloatRange(1e-3, 1e-3),
        gate_lr=FloatRange(1e-2, 1e-2),
    )
    (cfg, params), = _sample(space, 1)
    assert params == {}
    assert cfg == {"lam": 0.1, "estimator": "arm", "parameterization": "scaled_sigmoid",
                   "k": 7.0, "init_drop_rate": 0.3, "lr": 1e-3, "gate_lr": 1e-2}


def test_searched_parts_stay_in_range_and_hard_concrete_has_no_k():
    space = SearchSpace()
    for cfg, params in _sample(space, 30):
        assert 1e-3 <= cfg["lam"] <= 1.0
        assert 3e-4 <= cfg["lr"] <= 3e-3
        assert 3e-3 <= cfg["gate_lr"] <= 3e-2 and "gate_lr" in params
        assert 0.05 <= cfg["init_drop_rate"] <= 0.6
        assert cfg["estimator"] in ("arm", "disarm", "hard_concrete")
        if cfg["estimator"] == "hard_concrete":
            assert "k" not in cfg and "k" not in params and "parameterization" not in params
        else:
            assert 2 <= cfg["k"] <= 10
            assert cfg["parameterization"] in ("scaled_sigmoid", "hard_sigmoid")


def test_per_layer_lambda():
    space = SearchSpace(lam_per_layer=True)
    (cfg, params), = _sample(space, 1, ["1", "3"])
    assert set(cfg["lam"]) == {"1", "3"}
    assert {"lam[1]", "lam[3]"} <= set(params)
    with pytest.raises(ValueError, match="layer names"):
        _sample(space, 1)


def test_round_trip_dict():
    space = SearchSpace(lam_per_layer=True, estimator=("arm",))
    assert SearchSpace.from_dict(space.to_dict()) == space


def test_gate_lr_from_the_command_line():
    """``--gate-lr`` fixes (a number) or searches (LOW:HIGH, log scale) the gate step size,
    and the sampled value reaches ``TrainConfig``."""
    import argparse

    from applications.errors import UserError
    from applications.sparsify.train import TrainConfig
    from applications.tune.cli import _space, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())

    def space(*extra):
        return _space(parser.parse_args(["tune", *extra]))

    default = space()
    assert default.gate_lr == FloatRange(3e-3, 3e-2, log=True)
    assert default.describe()["gate_lr"] == "0.003:0.03 (log)"
    fixed = space("--gate-lr", "0.01")
    assert fixed.gate_lr.fixed and fixed.gate_lr.low == 0.01
    (cfg, params), = _sample(fixed, 1)
    assert cfg["gate_lr"] == 0.01 and "gate_lr" not in params
    searched = space("--gate-lr", "1e-3:1e-1").gate_lr
    assert (searched.low, searched.high, searched.log) == (1e-3, 0.1, True)
    for bad in ("0", "-1:1", "2e-2:1e-2"):
        with pytest.raises(UserError):
            space(f"--gate-lr={bad}")
    cfg.pop("lam")
    assert TrainConfig(lam=0.1, **cfg).gate_lr == 0.01
    assert SearchSpace.from_dict(fixed.to_dict()) == fixed
