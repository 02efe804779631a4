"""The ``binopt`` command: one entry point with subcommands.

Each subcommand lives next to the code it drives and exposes ``register(subparsers)``;
modules are imported lazily so that a missing optional dependency (optuna for ``tune``)
only affects its own subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "sparsify": ("applications.sparsify.cli", "train a network with L0 gates and prune it"),
    "export": ("applications.sparsify.export_cli", "export a pruned run as a smaller dense model"),
    "variance": ("applications.toys.cli", "measure estimator bias and variance on a problem"),
    "toy": ("applications.toys.toy_cli", "train the Yin-Zhou toy with several estimators"),
    "tune": ("applications.tune.cli", "search the pruning-rate vs accuracy trade-off with optuna"),
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="binopt", description="Stochastic binary optimization.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith(module.rsplit(".", 1)[0]):
                continue  # subcommand not shipped in this build
            raise
        mod.register(sub, name, help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser(only=command if command in SUBCOMMANDS else None)
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 0 if not argv else 2
        result = args.func(args)
        return int(result or 0)
    except UserError as exc:
        print(f"binopt: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        if missing and missing.split(".")[0] in {"optuna", "plotly", "mlxtend", "mnist1d"}:
            extra = "tune" if missing.split(".")[0] in {"optuna", "plotly"} else "data"
            print(
                f"binopt: error: this command needs {missing.split('.')[0]}; "
                f"install it with: pip install 'binopt[{extra}]'",
                file=sys.stderr,
            )
            return 2
        raise
    except KeyboardInterrupt:
        print("binopt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
