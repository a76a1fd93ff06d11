"""Where trials run: ``optuna`` (this process, :mod:`.local`) or ``ray`` (a Ray cluster, :mod:`.ray`).

Both run the same trial lifecycle (:mod:`search.trial`) until ``--trials`` trained trials
exist in the study; :data:`BACKENDS` maps ``--backend`` to a ``run_trials(ctx, study, *,
progress)`` function.
"""

from __future__ import annotations

from typing import Any, Callable

from ...compressors.registry import Registry
from . import local, ray

#: Backends by name: ``run_trials(ctx, study, *, progress) -> None``.
BACKENDS: Registry[Callable[..., Any]] = Registry("backend")
BACKENDS.add("optuna", local.run_trials, summary="trials in this process (several processes may share a study)")
BACKENDS.add("ray", ray.run_trials, summary="trials on the workers of a Ray cluster; the driver holds the study")
