"""The ``binopt`` dispatcher: ``--version`` and what every subcommand's ``--help`` says."""

from __future__ import annotations

import argparse

import pytest

from applications.cli import SUBCOMMANDS, build_parser, main


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _meaningful_default(action: argparse.Action) -> bool:
    return bool(action.option_strings) and action.default not in (None, False, argparse.SUPPRESS)


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_help_states_every_default_once(command):
    """Every option with a default says it (``--epochs`` did not: it had no help text), and
    no option says ``(default: None)`` or ``(default: False)`` (after "default: the model's")."""
    parser = _subparsers()[command]
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text, text
    for action in parser._actions:
        if not _meaningful_default(action):
            continue
        shown = parser._get_formatter()._format_action(action)
        assert "default" in shown.lower(), f"binopt {command} --help: {shown}"
        assert shown.lower().count("default") == 1, f"binopt {command} --help: {shown}"


def test_help_shows_list_defaults_as_typed():
    text = _subparsers()["toy"].format_help()
    assert "(default: 0.49 0.499 0.501 0.51)" in text


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith("binopt ")
