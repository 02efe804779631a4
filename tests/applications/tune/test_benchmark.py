"""Output names of ``benchmarks/tune_mnist5k.py`` (parsing only: nothing is trained)."""

from __future__ import annotations

COMMITTED = ["tune_mnist5k.json", "tune_mnist5k_pareto.md", "tune_mnist5k_pareto.png",
             "tune_mnist5k_pareto.html", "tune_mnist5k_best_trials.json",
             "tune_mnist5k_trials.json"]


def test_tune_benchmark_output_names(load_benchmark):
    """The default settings (and the documented command, ``--threads 1 --jobs 2``) give the
    committed names and study folder; other settings give their own names and folder."""
    bench = load_benchmark("tune_mnist5k")
    assert all((bench.RESULTS / name).exists() for name in COMMITTED)
    study = bench.ROOT / "runs" / "tune" / "mnist5k-bench-gatelr"
    for argv in ([], ["--threads", "1", "--jobs", "2"], ["--jobs", "4", "--report-only"],
                 ["--results", "/tmp/elsewhere"], ["--trials", "24", "--epochs", "80"]):
        args = bench.parse_args(argv)
        assert args.stem == "tune_mnist5k" and args.out == str(study), argv

    args = bench.parse_args(["--trials", "6", "--epochs", "5"])
    assert args.stem == "tune_mnist5k_epochs-5_trials-6"
    assert args.out == str(study.with_name("mnist5k-bench-gatelr_epochs-5_trials-6"))
    assert bench.parse_args(["--lam", "0.01:1"]).stem == "tune_mnist5k_lam-0.01_1"
    assert bench.parse_args(["--seed", "1"]).stem == "tune_mnist5k_seed-1"
    # --out chooses the study folder, not the result names
    args = bench.parse_args(["--trials", "6", "--out", "/tmp/tune-small"])
    assert args.stem == "tune_mnist5k_trials-6" and args.out == "/tmp/tune-small"
    assert bench.parse_args(["--out", "/tmp/tune-small"]).stem == "tune_mnist5k"
