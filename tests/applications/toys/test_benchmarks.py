"""Output names of the toys benchmarks (``benchmarks/toys_*.py``; parsing only).

A run with the default settings, and each documented command that produced a committed
result (docs/toys/index.md and the ``command`` field of the committed JSONs), writes the
committed names; a run with other settings writes names that spell them out.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "results"


def _committed_command(stem: str) -> list[str]:
    """The arguments of the command recorded in ``RESULTS/<stem>.json``."""
    return shlex.split(json.loads((RESULTS / f"{stem}.json").read_text())["command"])[2:]


def test_maxcut_benchmark_output_names(load_benchmark):
    stem = "maxcut_random_graphs"
    bench = load_benchmark("toys_maxcut")
    parser = bench.build_parser()

    def name(*argv):
        return bench.output_stem(parser.parse_args(list(argv)), parser)

    assert name() == name(*_committed_command(stem)) == stem
    assert name("--workers", "1", "--out", "/tmp/x") == stem
    assert name("--steps", "100", "--seeds", "1") == f"{stem}_seeds-1_steps-100"
    assert name("--sizes", "10", "16") == f"{stem}_sizes-10+16"
    assert name("--name", "mine", "--steps", "5") == "maxcut_mine"  # --name as given


def test_yin_zhou_benchmark_output_names(load_benchmark):
    bench = load_benchmark("toys_yin_zhou")
    parser = bench.build_parser()

    def name(*argv):
        return bench.output_stem(parser.parse_args(list(argv)), parser)

    for stem in ("toys_yin_zhou_D1", "toys_yin_zhou_D20"):
        assert name(*_committed_command(stem)) == stem
    assert name() == name("--workers", "1") == "toys_yin_zhou_D1"
    assert name("--dim", "20") == "toys_yin_zhou_dim-20"  # not the committed D20 settings
    assert name("--steps", "100", "--seeds", "2") == "toys_yin_zhou_seeds-2_steps-100"
    assert name("--p0", "0.49", "0.51") == "toys_yin_zhou_p0-0.49+0.51"


def test_vae_benchmark_output_names(load_benchmark):
    bench = load_benchmark("toys_vae")
    parser = bench.build_parser()

    def name(*argv):
        return bench.output_stem(bench.parse_args(parser, list(argv)), parser)

    for stem in ("vae_bar_linear", "vae_bar_nonlinear", "vae_basket_linear"):
        assert name(*_committed_command(stem)) == stem
    assert name("bar") == "vae_bar_linear" and name("basket") == "vae_basket_linear"
    assert name("bar", "--kind", "nonlinear", "--workers", "2") == "vae_bar_nonlinear"
    # options the experiment does not use, and equivalent spellings
    assert name("bar", "--reps", "3", "--basket-steps", "0,10") == "vae_bar_linear"
    assert name("basket", "--seeds", "5") == "vae_basket_linear"
    assert name("bar", "--estimators", "disarm, reinforce_loo") == "vae_bar_linear"
    assert name("basket", "--basket-steps", "5000,3000,2000,1000,300,100") == (
        "vae_basket_linear")
    assert name("bar", "--steps", "6000") == "vae_bar_linear_steps-6000"
    assert name("bar", "--kind", "nonlinear", "--seeds", "2", "--lr", "0.01") == (
        "vae_bar_nonlinear_lr-0.01_seeds-2")
    assert name("basket", "--steps", "3000", "--reps", "20") == (
        "vae_basket_linear_reps-20_steps-3000")
    assert name("basket", "--estimators", "arm,disarm") == (
        "vae_basket_linear_estimators-arm_disarm")
    assert name("bar", "--name", "mine", "--steps", "10") == "vae_mine"  # --name as given


def test_variance_benchmark_output_names(load_benchmark):
    bench = load_benchmark("toys_variance")
    parser = bench.build_parser()

    def names(*argv):
        return bench.output_stems(parser.parse_args(list(argv)), parser)

    committed = {name: f"variance_{name}" for name in bench.runs(1)}
    assert all((RESULTS / f"{stem}.json").exists() for stem in committed.values())
    assert names() == committed
    assert names("--only", "toy_bar", "--workers", "1", "--num-samples", "200000") == committed
    # the runs --num-samples changes get its value in their names; the VAE runs, which
    # always take 400 estimates, keep theirs
    changed = {"toy_bar", "toy_D10", "maxcut_n10"}
    assert names("--num-samples", "1000") == {
        name: stem + ("_num_samples-1000" if name in changed else "")
        for name, stem in committed.items()}
