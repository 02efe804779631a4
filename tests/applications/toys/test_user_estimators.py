"""A researcher's own estimator in the toys' tools: ``--import`` on the command line,
``measure`` and ``plot_variance`` from Python, and the bias verdict of each row."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch

import binopt
from applications.cli import main
from applications.errors import UserError
from binopt.estimators import base as estimator_base

# ARM times 1.1 (biased) and REINFORCE with a constant baseline (unbiased), registered by
# the module that defines them, as a user's module would.
MODULE = textwrap.dedent(
    '''
    import torch
    import binopt
    from binopt.estimators.base import attach_gradient


    @binopt.register_estimator(aliases=("{prefix}_cb",))
    class ConstantBaseline(binopt.Estimator):
        name = "{prefix}_constant_baseline"
        unbiased = True

        def __init__(self, b: float = 0.0, **kwargs):
            super().__init__(**kwargs)
            self.b = b

        def _estimate(self, call_f, alphas):
            probs = [torch.sigmoid(a.detach()) for a in alphas]
            z = [(self._uniform(tuple(a.shape), a) < p).to(a.dtype)
                 for a, p in zip(alphas, probs)]
            values = call_f(z)
            centred = values.detach() - self.b
            coef = [centred.reshape((-1,) + (1,) * (zk.dim() - 1)) * (zk - p)
                    for zk, p in zip(z, probs)]
            return attach_gradient(values, coef, alphas)


    @binopt.register_estimator
    class ScaledARM(binopt.ARM):
        name = "{prefix}_scaled_arm"
        unbiased = False

        @staticmethod
        def _coefficients(diff, u, alpha):
            return 1.1 * diff * (u - 0.5)
    '''
)


@pytest.fixture
def user_module(tmp_path, request):
    """Write a user module (names prefixed by the test's name) and restore the registry,
    ``sys.modules`` and ``sys.path`` afterwards."""
    registry, aliases = dict(estimator_base._REGISTRY), dict(estimator_base._ALIASES)
    modules, path = set(sys.modules), list(sys.path)
    prefix = "u" + str(abs(hash(request.node.name)) % 10**8)
    file = tmp_path / f"{prefix}_estimators.py"
    file.write_text(MODULE.format(prefix=prefix))
    yield prefix, file
    estimator_base._REGISTRY.clear()
    estimator_base._REGISTRY.update(registry)
    estimator_base._ALIASES.clear()
    estimator_base._ALIASES.update(aliases)
    for name in set(sys.modules) - modules:
        if name.startswith(prefix):  # not torch's own, imported on the way
            del sys.modules[name]
    sys.path[:] = path


def test_variance_imports_a_users_estimator_from_a_file(user_module, tmp_path, capsys):
    """``--import FILE`` registers the user's estimators for ``--estimators`` and
    ``--train-estimator``; the row of ARM x 1.1 shows its bias, and has no exact variance
    (it was ARM's, which it subclasses: a "variance z" of 37 on a correct measurement)."""
    prefix, file = user_module
    out = tmp_path / "out"
    argv = ["variance", "--import", str(file), "--dim", "4", "--phi", "1",
            "--estimators", f"{prefix}_cb:b=0.7,{prefix}_scaled_arm,arm",
            "--step", "3", "--train-estimator", f"{prefix}_scaled_arm",
            "--num-samples", "40000", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    data = json.loads((out / "variance_toy.json").read_text())
    assert f"--import {file}" in data["command"]
    rows = {r["name"]: r for r in data["settings"][0]["rows"]}
    scaled, cb, arm = rows[f"{prefix}_scaled_arm"], rows[f"{prefix}_cb"], rows["arm"]
    assert scaled["exact_variance"] is None and cb["exact_variance"] is None
    assert arm["exact_variance"] is not None
    # 40,000 estimates: the 10 % bias is about 10 standard errors, the critical |z| for
    # 4 units at 1e-4 is 4.2; the unbiased ones pass
    assert scaled["bias_detected"] and scaled["bias_p"] < 1e-12
    assert not cb["bias_detected"] and not arm["bias_detected"]
    assert f"bias detected (p < 0.0001): {prefix}_scaled_arm (p=" in text
    assert f"none detected: {prefix}_cb:b=0.7, arm" in text


def test_variance_imports_a_module_from_the_current_folder(user_module, tmp_path, monkeypatch,
                                                           capsys):
    prefix, file = user_module
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    argv = ["toy", "--import", file.stem, "--p0", "0.49", "--steps", "2", "--seeds", "1",
            "--estimators", f"{prefix}_constant_baseline", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    assert sys.path == path_before  # the folder was on it for the import only
    data = json.loads((tmp_path / "out" / "toy_curves.json").read_text())
    assert f"--import {file.stem}" in data["command"]
    assert list(data["runs"][0]["estimators"]) == [f"{prefix}_constant_baseline"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--estimators", "my_new_estimator"],
         "--estimators: cannot build estimator 'my_new_estimator': unknown estimator"),
        (["--estimators", "my_new_estimator"], "loaded with --import MODULE_OR_FILE"),
        (["--train-estimator", "my_new_estimator", "--step", "2"],
         "--train-estimator: cannot build estimator 'my_new_estimator'"),
        (["--import", "no_such_module_here"],
         "--import no_such_module_here: no module named 'no_such_module_here' in the current "
         "folder or on PYTHONPATH"),
        (["--import", "missing/estimators.py"], "--import missing/estimators.py: no such file"),
    ],
)
def test_unknown_estimators_and_modules_are_one_line_errors(argv, message, tmp_path, capsys,
                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["variance", *argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("binopt: error:") and message in err and len(err.splitlines()) == 1


def test_a_bug_in_the_imported_module_keeps_its_traceback(tmp_path):
    bad = tmp_path / "buggy_estimators_module.py"
    bad.write_text("import binopt\nraise RuntimeError('bug in the user module')\n")
    try:
        with pytest.raises(RuntimeError, match="bug in the user module"):
            main(["variance", "--import", str(bad), "--out", str(tmp_path)])
        assert "buggy_estimators_module" not in sys.modules
    finally:
        sys.modules.pop("buggy_estimators_module", None)


def test_measure_and_plot_variance_from_python(user_module, monkeypatch, tmp_path):
    """The Python route: ``measure`` takes names as the command line does, and
    ``plot_variance`` marks rows whose bias was detected."""
    from applications.toys import plotting
    from applications.toys._common import import_modules
    from applications.toys.variance import logit_setting, measure

    prefix, file = user_module
    import_modules([str(file)])
    logits = torch.tensor([0.0, 1.0, -1.0, 0.5], dtype=torch.float64)

    def f(z):
        return ((z - 0.49) ** 2).sum(-1)

    setting = logit_setting("mine", f, logits, binopt.exact_grad(f, logits))
    rows = measure(setting, f"{prefix}_scaled_arm,disarm", num_samples=40_000)
    assert [r["estimator"] for r in rows] == [f"{prefix}_scaled_arm", "disarm"]
    assert rows[0]["bias_detected"] and not rows[1]["bias_detected"]
    assert measure(setting, ["disarm"], num_samples=100)[0]["estimator"] == "disarm"

    figures = []
    monkeypatch.setattr(plotting, "save_figure", lambda fig, path: figures.append(fig) or path)
    plotting.plot_variance([{"label": setting.label, "rows": rows}], tmp_path / "v.png")
    ticks = [t.get_text() for t in figures[0].axes[0].get_xticklabels()]
    assert ticks == [f"{prefix}_scaled_arm (biased)", "disarm"]


def test_measure_and_plot_variance_check_their_arguments(tmp_path):
    from applications.toys.plotting import plot_variance
    from applications.toys.variance import logit_setting, measure

    logits = torch.zeros(2, dtype=torch.float64)
    setting = logit_setting("x", lambda z: z.sum(-1), logits, None)
    with pytest.raises(ValueError, match="chunk_size must be >= 1; got 0"):
        measure(setting, "arm", num_samples=10, chunk_size=0)
    with pytest.raises(TypeError, match="num_samples must be an int >= 2; got 10.0"):
        measure(setting, "arm", num_samples=10.0)
    with pytest.raises(TypeError, match="got the class ARM .*register it with binopt.register_"):
        measure(setting, [binopt.ARM], num_samples=10)
    with pytest.raises(ValueError, match="estimator listed twice: arm"):
        measure(setting, ["arm", "arm"], num_samples=10)
    with pytest.raises(UserError, match="unknown estimator 'nope'"):
        measure(setting, "nope", num_samples=10)
    row = measure(setting, "arm", num_samples=10)[0]
    with pytest.raises(TypeError, match=r"non-empty list.*got dict \(wrap one setting in a list\)"):
        plot_variance({"label": "x", "rows": [row]}, tmp_path / "v.png")
    with pytest.raises(TypeError, match=r"settings\[0\] must be a mapping with 'label' and 'rows'"):
        plot_variance([{"rows": [row]}], tmp_path / "v.png")
    with pytest.raises(ValueError, match=r"settings\[0\] \('x'\) has no rows"):
        plot_variance([{"label": "x", "rows": []}], tmp_path / "v.png")
    assert not (tmp_path / "v.png").exists()


def test_bias_p_value():
    from applications.toys.variance import bias_p_value

    assert bias_p_value(0.0) == 1.0
    assert bias_p_value(1.959963984540054) == pytest.approx(0.05, rel=1e-9)
    assert bias_p_value(-1.959963984540054, 1) == pytest.approx(0.05, rel=1e-9)
    assert bias_p_value(3.0, 10) == pytest.approx(10 * 0.0026997960632601866, rel=1e-9)
    assert bias_p_value(float("inf"), 4) == 0.0
    with pytest.raises(ValueError, match="tests must be an int >= 1; got 0"):
        bias_p_value(1.0, 0)


def test_estimator_colours_leave_red_to_the_bias_marking():
    """Red names the estimators with a detected bias: no estimator's own colour is red."""
    import matplotlib

    from applications.toys.plotting import _colors

    red = matplotlib.colormaps["tab10"](3)
    colours = _colors([f"e{i}" for i in range(12)])
    assert red not in colours.values()
    assert len(set(list(colours.values())[:9])) == 9  # the first nine all differ
