"""User-facing errors: the CLI prints ``squeezer: error: <message>`` (one line) and exits non-zero.

- :class:`UserError`: bad input (arguments, files, budgets, objects passed to the API), exit 2.
- :class:`RunStopped`: a run stopped by something outside it (a signal, a full disk); what it
  computed is kept and the message says how to continue; exit 128 + signal, or 1.
- :class:`Terminated`: what ``SIGTERM`` raises in the CLI (a ``KeyboardInterrupt``, so that it
  unwinds the run as Ctrl-C does).
"""

from __future__ import annotations

import signal


class UserError(ValueError):
    """Bad input from a person (arguments, files, budgets, objects passed to the API): one line.

    The CLI prints it and exits with status 2; from Python it is a ``ValueError``.
    """


class RunStopped(Exception):
    """A run stopped before its end; ``exit_code`` is what the CLI exits with."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """``SIGTERM`` received (the CLI turns it into this exception)."""

    signum = signal.SIGTERM


def raise_terminated(signum: int, frame: object) -> None:
    """A ``SIGTERM`` handler: unwind the run like Ctrl-C (trials marked, files closed)."""
    raise Terminated()
