"""The search: configuration, space, study, backends, run folder, report -- and the Python API.

The public names are re-exported by ``squeezer`` itself (``import squeezer``); this package's
modules are described in ARCHITECTURE.md. The package is callable: ``squeezer.search(model,
data, budget="2MB", ...)`` is :func:`search.api.search`, so the API function and the package
share their name without one hiding the other (``import squeezer.search.space`` still works).

Example:
    >>> from squeezer.search import SearchConfig, parse_size
    >>> SearchConfig(budget="2MB").budget_bytes == parse_size("2MB")
    True
"""

from __future__ import annotations

import sys
import types
from typing import Any

from . import api
from .api import Candidate, SearchResult, report, resume, search, sensitivity
from .apply import Applied, apply
from .artifacts import Exported, export
from .budget import format_bytes, parse_size
from .config import SearchConfig
from .errors import UserError
from .space import SearchSpace
from .tools import bench, calibrate, cost, methods, targets

__all__ = ["search", "resume", "report", "sensitivity", "apply", "export", "cost", "targets", "methods", "calibrate",
           "bench", "SearchResult", "Candidate", "Applied", "Exported", "SearchConfig", "SearchSpace", "UserError",
           "parse_size", "format_bytes"]


class _CallableModule(types.ModuleType):
    """This package, callable as :func:`search.api.search`."""

    def __call__(self, *args: Any, **kwargs: Any) -> SearchResult:
        return api.search(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
__wrapped__ = api.search  # inspect.signature(squeezer.search) and help() show the function's
