"""What a trial records: its ``trials/NNNN.json`` file and the study attributes of its result.

The file is written before the study is told (so a result survives a kill in between:
:func:`search.recovery.recover_from_trial_file`); both come from the same result dict of
:func:`search.trial.train_trial`: ``reason`` (``trained`` | ``stopped`` | ``failed``), ``val_metric``
(None unless trained), ``rung_metric``, ``steps``, ``train_seconds`` and, when stopped,
``pruned_at``; a trial that failed by itself (its loss diverged, its fine-tune raised) has an
``error`` saying why. Keys are the JSON vocabulary (:mod:`search.schema`).

Example:
    >>> result_attrs({"reason": "trained", "val_metric": 0.9, "rung_metric": {}, "steps": 60, "train_seconds": 3.0})
    {'train_seconds': 3.0, 'steps': 60, 'evaluated': True, 'val_metric': 0.9}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..compressors.policy import Policy
from .limits import cost_dict
from .runfolder import CorruptFile, read_checked_json, trial_path, write_json
from .schema import stamped


def trial_record(number: int, worker: str | None, policy: Policy, cost: Any, cons: dict[str, float],
                 result: dict[str, Any] | None) -> dict[str, Any]:
    """The ``trials/NNNN.json`` record (``result`` None = rejected over budget, never trained)."""
    rec: dict[str, Any] = {"number": number, "worker": worker, "policy": policy.to_dict(),
                           "metrics": cost_dict(cost), "constraints": dict(cons)}
    if result is None:
        return stamped("trial", {**rec, "reason": "over_budget"})
    if result["reason"] == "failed":
        return stamped("trial", {**rec, "reason": "failed", "error": result["error"], "steps": result["steps"],
                                 "train_seconds": result["train_seconds"]})
    if result["val_metric"] is not None:
        rec["metrics"] = {**rec["metrics"], "val_metric": result["val_metric"]}
    rec.update(reason=result["reason"], rung_metric=result["rung_metric"], steps=result["steps"],
               train_seconds=result["train_seconds"])
    if "pruned_at" in result:
        rec["pruned_at"] = result["pruned_at"]
    return stamped("trial", rec)


def result_attrs(result: dict[str, Any]) -> dict[str, Any]:
    """User attributes a finished trial carries."""
    attrs: dict[str, Any] = {"train_seconds": result["train_seconds"], "steps": result["steps"]}
    if result["reason"] == "failed":
        return {**attrs, "error": result["error"]}
    if result["rung_metric"]:
        attrs["rung_metric"] = dict(result["rung_metric"])
    if result["reason"] == "stopped":
        attrs["pruned_at"] = result["pruned_at"]
    else:
        attrs.update(evaluated=True, val_metric=result["val_metric"])
    return attrs


def write_trial_file(run_dir: Path, rec: dict[str, Any]) -> None:
    write_json(trial_path(run_dir, rec["number"]), rec, checksum=True)


def read_trial_file(run_dir: Path, number: int) -> dict[str, Any]:
    """Trial ``number``'s record; :class:`~search.runfolder.CorruptFile` if it is damaged."""
    return read_checked_json(trial_path(run_dir, number))


def corrupt_trial_files(run_dir: Path) -> list[str]:
    """The damaged ``trials/NNNN.json`` files of a run, as messages saying so."""
    out = []
    for path in sorted((Path(run_dir) / "trials").glob("[0-9]*.json")):
        try:
            read_checked_json(path)
        except CorruptFile as e:
            out.append(str(e))
    return out
