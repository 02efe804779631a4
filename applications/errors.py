"""Errors that the command line reports as one line (no traceback)."""

from __future__ import annotations

from collections.abc import Mapping


class UserError(Exception):
    """A mistake in the user's input: reported as ``binopt: error: <message>``, exit code 2."""


def with_option_names(exc: Exception, options: Mapping[str, str]) -> UserError:
    """A :class:`UserError` with the message of ``exc``, naming options instead of settings.

    Settings objects check their fields by name (``num_threads must be >= 1; got 0``); on
    the command line the message should name the option that was given (``--threads must
    be >= 1; got 0``). The first word of the message is replaced when it (or the part of it
    before a ``[``, as in ``lam['1']``) is a key of ``options``; other messages are kept.

    Parameters
    ----------
    exc : Exception
        The error raised by the check.
    options : mapping of str to str
        Setting name to option, e.g. ``{"num_threads": "--threads"}``.

    Returns
    -------
    UserError
        To be raised ``from None`` in place of ``exc``.
    """
    text = str(exc)
    head, sep, rest = text.partition(" ")
    name, bracket, index = head.partition("[")
    if sep and name in options:
        text = f"{options[name]}{bracket}{index} {rest}"
    return UserError(text)
