"""User-facing errors: the CLI prints ``squeezer: error: <message>`` (one line) and exits 2."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from a person (arguments, files, budgets). One line, exit status 2."""
