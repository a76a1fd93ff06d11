"""squeezer: make CNNs fit real hardware.

The repository root is this package: ``search/``, ``compressors/``, ``evaluators/`` and
``hw_models/`` install as ``squeezer.search``, ``squeezer.compressors``, ...
(``pyproject.toml`` maps them). This module is the public API.
"""

from __future__ import annotations

__all__: list[str] = []
