"""User-facing errors: the CLI prints ``squeezer: error: <message>`` (one line) and exits 2."""

from __future__ import annotations


class UserError(ValueError):
    """Bad input from a person (arguments, files, budgets, objects passed to the API): one line.

    The CLI prints it and exits with status 2; from Python it is a ``ValueError``.
    """
