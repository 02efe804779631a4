"""``binopt variance`` runs whose outputs are committed, and the check of the issue's bar.

Runs (each writes ``benchmarks/results/variance_<name>.json`` and ``.png`` through the CLI,
and its printed table to ``variance_<name>.txt``; see "Output names" below for runs with
other settings):

- ``toy_bar``: the Yin-Zhou toy, p0 = 0.49, D = 1, at phi = 0 and phi = 2. The bar: the
  variances of REINFORCE, ARM and DisARM agree with ``binopt.diagnostics.exact_variance``
  within sampling error (|z| < 4) and DisARM <= ARM <= REINFORCE. The verdict is printed
  and stored under ``bar_check`` in ``variance_toy_bar.json``.
- ``toy_D10``: the same toy with D = 10 units at phi = 1 (exact variances by enumeration).
- ``maxcut_n10``: max-cut on G(10, 0.5) after 100 DisARM steps from small random logits.
- ``vae_linear_step0`` / ``vae_linear_step2000``: the binary VAE's encoder-gradient
  variance at initialization and after 2,000 DisARM steps.

Output names: the files go to the folder ``--out`` (default ``benchmarks/results``). A run
whose ``binopt`` arguments are those of the default settings writes its committed name,
``variance_<name>.*``; a run whose arguments differ (``--num-samples`` other than 200,000
changes ``toy_bar``, ``toy_D10`` and ``maxcut_n10``, not the two VAE runs, which always
take 400 estimates) writes ``variance_<name>_<settings>.*`` (``--num-samples 1000``:
``variance_toy_bar_num_samples-1000.*``; see :func:`output_stems`), so that it never
overwrites a committed result. Left out of the names: ``--only`` (it selects runs, each
with its own settings), ``--workers`` (one process per run, one thread each: the results
do not depend on it) and ``--out``.

Usage::

    python benchmarks/toys_variance.py [--only toy_bar] [--num-samples 200000]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from applications.toys._common import (  # noqa: E402
    default_results_dir,
    dumps_compact,
    environment,
)
from benchmarks._output import settings_stem  # noqa: E402

Z_MAX = 4.0
BENCHMARK_COMMAND = " ".join(["python benchmarks/toys_variance.py", *sys.argv[1:]])
ALL_MC = "reinforce,reinforce_loo,arm,disarm,straight_through,gumbel"


def runs(n: int) -> dict[str, list[str]]:
    """The ``binopt`` argument lists, by run name (``n`` estimates for the toy bar)."""
    vae = ["variance", "--problem", "vae", "--model", "linear", "--estimators", ALL_MC]
    return {
        "toy_bar": [
            "variance",
            "--problem",
            "toy",
            "--p0",
            "0.49",
            "--dim",
            "1",
            "--phi",
            "0",
            "2",
            "--estimators",
            ALL_MC,
            "--num-samples",
            str(n),
        ],
        "toy_D10": [
            "variance",
            "--problem",
            "toy",
            "--p0",
            "0.49",
            "--dim",
            "10",
            "--phi",
            "1",
            "--estimators",
            "reinforce,arm,disarm",
            "--num-samples",
            str(max(2, n // 4)),
        ],
        "maxcut_n10": [
            "variance",
            "--problem",
            "maxcut",
            "--nodes",
            "10",
            "--step",
            "100",
            "--train-estimator",
            "disarm",
            "--estimators",
            ALL_MC,
            "--num-samples",
            str(max(2, n // 4)),
        ],
        "vae_linear_step0": [*vae, "--step", "0", "--num-samples", "400"],
        "vae_linear_step2000": [*vae, "--step", "2000", "--num-samples", "400"],
    }


def output_stems(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, str]:
    """The file name stem of every run, by run name: ``variance_<name>`` when the run's
    ``binopt`` arguments are those of the default settings, else
    ``variance_<name>_<settings>`` naming the options that differ
    (:func:`benchmarks._output.settings_stem`; ``--only``, ``--workers`` and ``--out`` left
    out)."""
    table = runs(args.num_samples)
    default = runs(parser.parse_args([]).num_samples)
    return {
        name: (f"variance_{name}" if argv == default[name] else
               settings_stem(f"variance_{name}", args, parser, ignore={"only", "workers"}))
        for name, argv in table.items()
    }


def _one(job: tuple[str, list[str], str, str]) -> tuple[str, int, str]:
    import torch

    from applications.cli import main as cli_main

    torch.set_num_threads(1)
    name, argv, out, stem = job
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli_main([*argv, "--out", out, "--name", stem])
    Path(out, f"{stem}.txt").write_text(buf.getvalue())
    path = Path(out, f"{stem}.json")
    if path.exists():
        data = json.loads(path.read_text())
        data["benchmark_command"] = BENCHMARK_COMMAND
        data["environment"] = environment()
        path.write_text(dumps_compact(data) + "\n")
    return name, rc, buf.getvalue()


def check_bar(path: Path) -> dict:
    """The issue's bar on ``variance_toy_bar.json``; the verdict is added to the file."""
    data = json.loads(path.read_text())
    verdict: dict = {"z_max": Z_MAX, "settings": {}}
    ok_all = True
    for setting in data["settings"]:
        rows = {r["estimator"]: r for r in setting["rows"]}
        agree = {
            e: {
                "variance": rows[e]["variance"],
                "exact": rows[e]["exact_variance"],
                "z": rows[e]["variance_z"],
                "ok": rows[e]["variance_z"] is not None and abs(rows[e]["variance_z"]) < Z_MAX,
            }
            for e in ("reinforce", "arm", "disarm")
        }
        measured = (
            rows["disarm"]["variance"] <= rows["arm"]["variance"] <= rows["reinforce"]["variance"]
        )
        exact = (
            rows["disarm"]["exact_variance"]
            <= rows["arm"]["exact_variance"]
            <= rows["reinforce"]["exact_variance"]
        )
        ok = all(a["ok"] for a in agree.values()) and measured and exact
        ok_all &= ok
        verdict["settings"][setting["label"]] = {
            "agreement": agree,
            "ordering_measured": measured,
            "ordering_exact": exact,
            "ok": ok,
        }
    verdict["ok"] = ok_all
    data["bar_check"] = verdict
    path.write_text(dumps_compact(data) + "\n")
    return verdict


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", default=None, help="run names (default: all)")
    p.add_argument("--num-samples", type=int, default=200_000,
                   help="estimates for toy_bar (a quarter for toy_D10 and maxcut_n10); "
                   "other values write variance_<name>_num_samples-N.* for those runs")
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--out", default=default_results_dir(ROOT), help="output folder")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    table = runs(args.num_samples)
    stems = output_stems(args, parser)
    names = args.only or list(table)
    jobs = [(name, table[name], args.out, stems[name]) for name in names]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for name, rc, text in pool.map(_one, jobs):
            print(f"=== {name} (exit {rc}): binopt {' '.join(table[name])}")
            print(text)
    if "toy_bar" in names:
        verdict = check_bar(Path(args.out) / f"{stems['toy_bar']}.json")
        for label, v in verdict["settings"].items():
            zs = ", ".join(f"{e} z={a['z']:+.2f}" for e, a in v["agreement"].items())
            print(
                f"bar at {label}: {zs}; DisARM <= ARM <= REINFORCE measured "
                f"{v['ordering_measured']}, exact {v['ordering_exact']} -> "
                f"{'PASS' if v['ok'] else 'FAIL'}"
            )


if __name__ == "__main__":
    main()
