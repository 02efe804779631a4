"""``binopt sparsify``: train a network with L0 gates, prune it and report.

Example::

    binopt sparsify --model mlp --dataset mnist5k --estimator arm --lam 0.1 --epochs 15 \\
        --out runs/quickstart --baseline dense

Every flag mirrors a field of :class:`~applications.sparsify.train.TrainConfig`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from applications.cli import HelpFormatter
from applications.errors import UserError, with_option_names

from .train import CHECKPOINT_NAME, TrainConfig, TrainingDivergedError, train

_DEFAULT_LR = {"adam": 1e-3, "sgd": 0.1}
# TrainConfig fields whose option is not --FIELD-NAME (error messages name the option)
_OPTION_OF_FIELD = {"num_threads": "--threads"}
# what a JSON option looks like, for its error message
_JSON_EXAMPLES = {"--model-options": '{"hidden": [100, 50]}',
                  "--estimator-options": '{"beta": 0.5}'}


def parse_lam(text: str) -> float | dict[str, float]:
    """``"0.1"`` -> 0.1; ``"1=0.1,3=0.05"`` -> per-gated-layer dict."""
    text = text.strip()
    if "=" not in text:
        try:
            value = float(text)
        except ValueError:
            raise UserError(
                f"--lam must be a number or name=value pairs like 1=0.1,3=0.05; got {text!r}"
            ) from None
        return value
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise UserError(f"--lam pair {part!r} is not name=value")
        if name.strip() in out:
            raise UserError(f"--lam names layer {name.strip()!r} twice; got {text!r}")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise UserError(f"--lam value in {part!r} is not a number") from None
    return out


def _json_dict(flag: str, text: str | None) -> dict:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{flag} must be a JSON object like '{_JSON_EXAMPLES.get(flag, '{}')}'; got {text!r} "
            f"({exc})"
        ) from None
    if not isinstance(value, dict):
        raise UserError(f"{flag} must be a JSON object; got {text!r}")
    return value


def register(subparsers, name: str = "sparsify", help_text: str = "") -> argparse.ArgumentParser:
    """Add the ``sparsify`` subcommand to ``subparsers``."""
    d = TrainConfig()
    p = subparsers.add_parser(
        name,
        help=help_text or "train a network with L0 gates and prune it",
        description="Train a network with L0 gates (L0-ARM by default), prune it and report "
        "the pruned architecture, the weights and FLOPs kept and the test error. Writes "
        "OUT/metrics.jsonl, OUT/checkpoint.pt (every epoch), OUT/summary.json and "
        "OUT/summary.png.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", default=d.model, help="mlp, lenet5 or wrn")
    p.add_argument("--dataset", default=d.dataset,
                   help="mnist5k, mnist1d (offline), mnist, cifar10, cifar100 (need --data-root)")
    p.add_argument("--data-root", default=None, help="folder with the full data sets")
    p.add_argument("--estimator", default=d.estimator,
                   help="arm (L0-ARM), hard_concrete (L0-HC), disarm, straight_through, ...")
    p.add_argument("--estimator-options", default=None, metavar="JSON",
                   help='extra estimator arguments, e.g. \'{"beta": 0.5}\' for hard_concrete')
    p.add_argument("--lam", default=str(d.lam), metavar="LAM",
                   help="L0 strength: one number, or per gated layer name=value pairs "
                   "(e.g. 1=0.1,3=0.05)")
    p.add_argument("--parameterization", default=d.parameterization,
                   help="scaled_sigmoid, hard_sigmoid or sigmoid (hard_concrete always uses "
                   "sigmoid on log a)")
    p.add_argument("--k", type=float, default=d.k, help="slope of the scaled/hard sigmoid")
    p.add_argument("--init-drop-rate", type=float, default=None,
                   help="initial gate drop probability (default: the model's)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="examples per optimizer step")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate (default 1e-3 for adam, 0.1 for sgd)")
    p.add_argument("--gate-lr", type=float, default=None,
                   help="learning rate of the gate parameters (default: --lr)")
    p.add_argument("--optimizer", default=None,
                   help="adam or sgd (Nesterov, momentum 0.9); default adam, sgd for wrn")
    p.add_argument("--lr-schedule", default=d.lr_schedule, help="constant, cosine or step")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="L2 on the weights (never on the gate parameters)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the weights, the batch order and the gate samples")
    p.add_argument("--data-seed", type=int, default=d.data_seed,
                   help="seed of the train/test/validation splits")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's; 1 is often fastest for small "
                   "models)")
    p.add_argument("--out", default=d.out, help="output folder")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.pt (same settings; --lr, --gate-lr and "
                        "--lam may change, e.g. after a NaN loss)")
    p.add_argument("--baseline", default=None, choices=["dense"],
                   help="also train the dense network with the same budget")
    p.add_argument("--validation-fraction", type=float, default=d.validation_fraction,
                   help="carve a seeded validation set out of the training set")
    p.add_argument("--limit", type=int, default=None,
                   help="use at most this many training and test examples (default: all)")
    p.add_argument("--model-options", default=None, metavar="JSON",
                   help='extra model arguments, e.g. \'{"hidden": [100, 50]}\'')
    p.add_argument("--distributed", action="store_true",
                   help="data-parallel training (DDP) over the processes torchrun started; "
                        "automatic when WORLD_SIZE > 1; --batch-size is the global batch")
    p.add_argument("--no-progress", action="store_true", help="print nothing while training")
    p.add_argument("--json", action="store_true", help="print the summary as JSON at the end")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Build (and validate) a :class:`TrainConfig` from parsed arguments."""
    model = str(args.model).strip().lower()
    optimizer = args.optimizer
    if optimizer is None:
        optimizer = "sgd" if model in ("wrn", "wide_resnet", "wideresnet") else "adam"
    lr = args.lr
    if lr is None:
        lr = _DEFAULT_LR.get(str(optimizer).strip().lower(), 1e-3)
    lam = parse_lam(args.lam)
    config = TrainConfig(
        model=args.model,
        dataset=args.dataset,
        data_root=args.data_root,
        estimator=args.estimator,
        estimator_options=_json_dict("--estimator-options", args.estimator_options),
        lam=lam,
        parameterization=args.parameterization,
        k=args.k,
        init_drop_rate=args.init_drop_rate,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=lr,
        gate_lr=args.gate_lr,
        distributed=bool(args.distributed),
        optimizer=optimizer,
        lr_schedule=args.lr_schedule,
        weight_decay=args.weight_decay,
        seed=args.seed,
        data_seed=args.data_seed,
        device=args.device,
        amp=bool(args.amp),
        num_threads=args.threads,
        out=args.out,
        resume=bool(args.resume),
        baseline=args.baseline,
        validation_fraction=args.validation_fraction,
        limit=args.limit,
        model_options=_json_dict("--model-options", args.model_options),
        progress=not args.no_progress,
    )
    try:
        config.validate()
    except UserError as exc:  # ConfigError: name the option, not the TrainConfig field
        options = {name: "--" + name.replace("_", "-") for name in vars(args)}
        raise with_option_names(exc, {**options, **_OPTION_OF_FIELD}) from None
    return config


def _rank_zero() -> bool:
    """Whether this is the process that prints (rank 0 under ``torchrun``, or alone)."""
    return int(os.environ.get("RANK", "0")) == 0


def run(args: argparse.Namespace) -> int:
    """Run ``binopt sparsify``; returns the exit code (130 after Ctrl-C)."""
    from .results import format_summary

    config = config_from_args(args)
    # with --json, stdout carries only the JSON (`binopt sparsify --json | jq`): the
    # per-epoch lines go to stderr instead
    progress_to = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    try:
        with progress_to:
            summary = train(config)
    except TrainingDivergedError as exc:
        print(f"binopt: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        checkpoint = Path(config.out) / CHECKPOINT_NAME
        if not _rank_zero() or not checkpoint.is_file():
            raise  # "binopt: interrupted" (once per rank; nothing to continue from)
        print(f"binopt: interrupted; {checkpoint} keeps the last finished epoch: run the same "
              "command with --resume to continue", file=sys.stderr)
        return 130
    # under torchrun every rank returns the summary; one copy on the terminal is enough
    if not _rank_zero():
        return 0
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
    return 0
