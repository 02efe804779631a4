"""Yin-Zhou toy: training curves of every estimator for p0 in {0.49, 0.499, 0.501, 0.51}.

Same computation and output format as ``binopt toy`` (``applications/toys/toy_cli.py``),
with the four values of ``p0`` run in parallel processes.

Writes ``toys_yin_zhou_<name>.json`` and ``.png`` into the folder ``--out`` (default
``benchmarks/results``). ``--name`` is taken as given (the committed ``D1`` and ``D20``
results were written with ``--name D1`` and ``--name D20``, below). Without it the name is
``D1`` with the default settings (``--dim 1``: the committed ``toys_yin_zhou_D1.*``) and
otherwise the options that differ from the defaults (``--dim 20`` writes
``toys_yin_zhou_dim-20.*``, ``--steps 100 --seeds 2`` ``toys_yin_zhou_seeds-2_steps-100.*``;
see :func:`output_stem`), so that such a run never overwrites a committed result.
``--workers`` and ``--out`` are left out of the name: every run is seeded and runs on one
thread, so the number of processes does not change the results.

Usage::

    python benchmarks/toys_yin_zhou.py --dim 1 --steps 2000 --seeds 5 --name D1
    python benchmarks/toys_yin_zhou.py --dim 20 --steps 2000 --seeds 5 --name D20 \\
        --estimators reinforce,reinforce_loo,arm,disarm,straight_through,gumbel,hard_concrete
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from applications.toys._common import (  # noqa: E402
    default_results_dir,
    environment,
    parse_estimator_list,
    write_json,
)
from applications.toys.plotting import plot_toy_curves  # noqa: E402
from applications.toys.toy_cli import _print_summary  # noqa: E402
from applications.toys.yin_zhou import P0_VALUES, YinZhouToy, train_toy  # noqa: E402
from benchmarks._output import changed_settings, settings_slug  # noqa: E402

ALL = "reinforce,reinforce_loo,arm,disarm,straight_through,gumbel,hard_concrete,exact"


def _job(job: dict) -> dict:
    torch.set_num_threads(1)
    toy = YinZhouToy(job["p0"], job["dim"], job["mode"])
    return train_toy(
        toy,
        parse_estimator_list(job["estimators"]),
        steps=job["steps"],
        lr=job["lr"],
        seeds=job["seeds"],
        eval_every=job["eval_every"],
        variance_samples=job["variance_samples"],
        record_every=max(1, job["steps"] // 500),
        show_progress=False,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--p0", type=float, nargs="+", default=list(P0_VALUES))
    p.add_argument("--dim", type=int, default=1)
    p.add_argument("--mode", choices=("max", "min"), default="max")
    p.add_argument("--estimators", default=ALL)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--variance-samples", type=int, default=2000)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--name", default=None,
                   help="file name stem after toys_yin_zhou_, taken as given (default: D1 "
                   "with the default settings, else the options that differ)")
    p.add_argument("--out", default=default_results_dir(ROOT), help="output folder")
    return p


def output_stem(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str:
    """``toys_yin_zhou_<--name>``; without ``--name`` ``toys_yin_zhou_D1`` with the default
    settings and ``toys_yin_zhou_<settings>`` otherwise, naming the options that differ
    (:func:`benchmarks._output.settings_slug`; ``--workers`` and ``--out`` left out)."""
    if args.name is not None:
        return f"toys_yin_zhou_{args.name}"
    changed = changed_settings(args, parser, ignore={"workers", "name"})
    return f"toys_yin_zhou_{settings_slug(changed) if changed else 'D1'}"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    stem = output_stem(args, parser)
    jobs = [
        dict(
            p0=p0,
            dim=args.dim,
            mode=args.mode,
            estimators=args.estimators,
            steps=args.steps,
            lr=args.lr,
            seeds=list(range(args.seeds)),
            eval_every=args.eval_every,
            variance_samples=args.variance_samples,
        )
        for p0 in args.p0
    ]
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        runs = list(pool.map(_job, jobs))
    wall = time.time() - t0
    _print_summary(runs)
    out = Path(args.out)
    command = " ".join(["python benchmarks/toys_yin_zhou.py", *(shlex.quote(a) for a in argv)])
    write_json(
        out / f"{stem}.json",
        {"command": command, "environment": environment(), "wall_seconds": wall, "runs": runs},
    )
    plot_toy_curves(runs, out / f"{stem}.png")
    print(f"wrote {out / stem}.json/.png ({wall:.0f} s)")


if __name__ == "__main__":
    main()
