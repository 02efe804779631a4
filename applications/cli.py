"""The ``binopt`` command: one entry point with subcommands.

Each subcommand lives next to the code it drives and exposes ``register(subparsers)``;
modules are imported lazily so that a missing optional dependency (optuna for ``tune``)
only affects its own subcommand.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import os
import sys
from typing import Any

from .errors import UserError

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "sparsify": ("applications.sparsify.cli", "train a network with L0 gates and prune it"),
    "export": ("applications.sparsify.export_cli", "export a pruned run as a smaller dense model"),
    "variance": ("applications.toys.cli", "measure estimator bias and variance on a problem"),
    "toy": ("applications.toys.toy_cli", "train the Yin-Zhou toy with several estimators"),
    "tune": ("applications.tune.cli", "search the pruning-rate vs accuracy trade-off with optuna"),
}


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` that states every option's default, once.

    Like :class:`argparse.ArgumentDefaultsHelpFormatter`, but the default is also shown for
    options without a help text (``--epochs``), and left out where it says nothing
    (``None``, the ``False`` of a flag) or where the help text already states it in words
    (``"default: the model's"``), instead of printing ``(default: None)`` after it.
    """

    def _format_action(self, action: argparse.Action) -> str:
        default = _default_text(action)
        if default is not None:
            action = copy.copy(action)
            action.help = f"{action.help or ''} (default: {default})".lstrip()
        return super()._format_action(action)


def _default_text(action: argparse.Action) -> str | None:
    """The default of ``action`` as ``--help`` shows it, or ``None`` to show none."""
    value: Any = action.default
    help_text = str(action.help or "")
    if (not action.option_strings or value is None or value is argparse.SUPPRESS
            or help_text == argparse.SUPPRESS or "default" in help_text.lower()
            or (action.nargs == 0 and value is False)):
        return None
    if isinstance(value, (list, tuple)):  # nargs="+": as it is typed
        value = " ".join(str(v) for v in value)
    return str(value).replace("%", "%%")  # help texts are %-formatted


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="binopt", description="Stochastic binary optimization.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
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


def _version() -> str:
    """The installed version of binopt (``unknown`` when run from a bare checkout)."""
    from importlib import metadata

    try:
        return metadata.version("binopt")
    except metadata.PackageNotFoundError:
        return "unknown"


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (``binopt ... | head``)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        return True
    except (OSError, ValueError):
        return False
    try:
        import select

        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        # no poll() (Windows) or no file descriptor (a captured stream): the flush above
        # could not tell, and a broken pipe with output pending is by far the likely cause
        return True


def _silence_stdout() -> None:
    """Point standard output at the null device so that the final flush cannot fail.

    The recipe of the Python documentation (signal module, "Note on SIGPIPE").
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):  # no file descriptor: drop the buffer
        sys.stdout = open(os.devnull, "w")  # left open: it is stdout until the process ends


def main(argv: list[str] | None = None) -> int:
    """Run ``binopt ARGV``; return the exit status.

    Parameters
    ----------
    argv : list of str, optional
        The arguments (default: ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success, 2 for a user error (reported as one line), 130 on Ctrl-C, 141 when
        standard output is a pipe closed by its reader (``binopt ... | head``).
    """
    try:
        try:
            code = _main(argv)
        except SystemExit:  # argparse after --help or a usage error
            sys.stdout.flush()
            raise
        # flush here, not at interpreter exit, so that a closed pipe is handled below
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        if not _stdout_closed():
            raise  # a pipe of the command's own (a data loader worker, ...): a real error
        _silence_stdout()
        return 141  # what a shell reports for a process ended by SIGPIPE (128 + 13)


def _main(argv: list[str] | None) -> int:
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
                f"install it from the checkout with: pip install -e '.[{extra}]'",
                file=sys.stderr,
            )
            return 2
        raise
    except KeyboardInterrupt:
        print("binopt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
