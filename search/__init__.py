"""The search: configuration, space, study, run folder and report.

Example:
    >>> from squeezer.search import SearchConfig, parse_size
    >>> SearchConfig(budget="2MB").budget_bytes == parse_size("2MB")
    True
"""

from __future__ import annotations

from .budget import format_bytes, parse_size
from .config import SearchConfig
from .errors import UserError
from .space import SearchSpace

__all__ = ["SearchConfig", "SearchSpace", "parse_size", "format_bytes", "UserError", "search", "resume", "report"]


def __getattr__(name: str):  # the job pulls in optuna and hw_models: load on use
    if name in ("search", "resume"):
        from . import job

        return getattr(job, name)
    if name == "report":
        from .report import report

        return report
    raise AttributeError(f"module 'search' has no attribute {name!r}")
