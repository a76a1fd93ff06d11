"""The JSON a user reads: one vocabulary, versioned by a ``schema`` field.

Every JSON that squeezer writes into a run folder or prints with ``--json`` carries
``"schema": "squeezer.<kind>/<version>"`` and uses the keys of the README's table "JSON fields":
units in the names (``size_bytes``, ``latency_ms``), and the searched score as ``metric`` (its
name: ``accuracy`` = top-1, a fraction) with ``val_metric`` / ``test_metric`` (its value on the
validation / test split), whatever the metric is. The study's trial user attributes use the
same keys.

A file without a ``schema`` is version 1 (written before this vocabulary): :func:`upgrade`
reads it into the current keys, so run folders of older versions still load.

Example:
    >>> upgrade({"val_accuracy": 0.9, "test_accuracy": 0.88, "status": "feasible"}, "metrics")
    {'schema': 'squeezer.metrics/2', 'val_metric': 0.9, 'test_metric': 0.88, 'metric': 'accuracy', 'feasible': True}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .errors import UserError
from .runfolder import read_json

#: Kind -> current schema. ``cost`` and ``bench`` are written by ``hw_models`` (``COST_SCHEMA``,
#: ``BENCH_SCHEMA`` there) and listed here so that one table names them all.
SCHEMAS = {"metrics": "squeezer.metrics/2", "trial": "squeezer.trial/2", "summary": "squeezer.summary/2",
           "report": "squeezer.report/2", "apply": "squeezer.apply/2", "export": "squeezer.export-result/2",
           "cost": "squeezer.cost/2", "bench": "squeezer.bench/2", "measured": "squeezer.measured/1",
           "finalists": "squeezer.finalists/1"}

#: Version-1 keys (files, trial user attributes) -> version 2.
RENAMED = {"val_accuracy": "val_metric", "test_accuracy": "test_metric", "rung_accuracy": "rung_metric",
           "rung_acc": "rung_metric"}

#: Version-1 trial file ``status`` -> version-2 ``reason``.
OLD_STATUS = {"evaluated": "trained", "pruned": "stopped", "over_budget": "over_budget"}


def stamped(kind: str, d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with its ``schema`` first (what every JSON a user reads starts with)."""
    return {"schema": SCHEMAS[kind], **{k: v for k, v in d.items() if k != "schema"}}


def _renamed(d: dict[str, Any]) -> dict[str, Any]:
    return {RENAMED.get(k, k): v for k, v in d.items()}


def _metrics_v1(d: dict[str, Any]) -> dict[str, Any]:
    out = _renamed(d)
    out.setdefault("metric", "accuracy")  # version 1 searched top-1 accuracy unless it said otherwise
    if "status" in out:
        out["feasible"] = out.pop("status") == "feasible"
    return out


def _trial_v1(d: dict[str, Any]) -> dict[str, Any]:
    out = _renamed(d)
    out["metrics"] = _renamed(out.get("metrics") or {})
    if "status" in out:
        out["reason"] = OLD_STATUS.get(out.pop("status"), "unknown")
    cons = out.get("constraints")
    if isinstance(cons, list):  # unnamed in version 1: by position, as Optuna names a list
        out["constraints"] = {str(i): v for i, v in enumerate(cons)}
    return out


def _summary_v1(d: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in d.items() if k not in ("trials", "samples")}
    out["base"] = upgrade(d.get("base"), "metrics")
    out["best"] = upgrade(d.get("best"), "metrics")
    out["trial_counts"] = {"sampled": d.get("samples"), "trained": d.get("trials")}
    return out


_FROM_V1: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "metrics": _metrics_v1, "trial": _trial_v1, "summary": _summary_v1}


def upgrade(d: dict[str, Any] | None, kind: str) -> dict[str, Any] | None:
    """``d`` (a ``kind`` file of any version this code knows) in the current vocabulary."""
    if d is None or d.get("schema") == SCHEMAS[kind]:
        return d
    if d.get("schema") is not None:
        raise UserError(f"unknown schema {d['schema']!r}; this squeezer reads {SCHEMAS[kind]} and files without "
                        f"a schema (version 1)")
    return stamped(kind, _FROM_V1[kind](d))


def read_run_json(path: Path, kind: str) -> dict[str, Any] | None:
    """The ``kind`` file at ``path`` in the current vocabulary (None if there is none)."""
    return upgrade(read_json(path), kind) if Path(path).is_file() else None
