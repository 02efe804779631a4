"""Errors that the command line reports as one line (no traceback)."""


class UserError(Exception):
    """A mistake in the user's input: reported as ``binopt: error: <message>``, exit code 2."""
