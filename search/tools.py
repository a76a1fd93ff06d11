"""The small operations: what a model costs, the targets, the methods, calibration and benchmarks.

Each turns bad input into a one-line :class:`~search.errors.UserError`; the CLI prints them.

Example:
    >>> c = cost("resnet20", input_shape=(3, 32, 32), target="arm-m7")
    >>> c.size_bytes > 0 and c.latency_ms > 0
    True
    >>> "arm-a72" in [t["name"] for t in targets()] and "uniform" in methods()["quantizers"]["methods"]
    True
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from torch import nn

from .. import hw_models
from ..compressors.policy import Policy, PolicyError
from ..evaluators.models import build_model
from ..hw_models.bench import BenchError, BenchResult, bench_artifact
from .errors import UserError
from .limits import resolve_target

#: kind -> (module, registry attribute, policy field that selects it)
METHOD_KINDS: dict[str, tuple[str, str, str]] = {
    "pruning_criteria": ("..compressors.pruning", "PRUNING_CRITERIA", "pruning.criterion"),
    "sparsity_methods": ("..compressors.sparsity", "SPARSITY_METHODS", "sparsity.method"),
    "quantizers": ("..compressors.quantize", "QUANTIZERS", "layers.*.quantizer"),
    "sharing": ("..compressors.sharing", "SHARING", "layers.*.sharing"),
    "decompositions": ("..compressors.lowrank", "DECOMPOSITIONS", "layers.*.decomposition"),
    "regularizers": ("..compressors.regularizers", "REGULARIZERS", "regularizer"),
    "distillation": ("..compressors.distill", "DISTILLATION", "distill.method"),
}


def cost(model: Any, *, input_shape: tuple[int, ...] = (1, 28, 28), target: str = "arm",
         policy: Policy | str | Path | None = None, num_classes: int = 10) -> Any:
    """Size, MACs, latency, energy and peak memory of ``model`` (a name or an ``nn.Module``) on
    ``target``, with ``policy`` (an object or a policy file) applied if given."""
    tgt = resolve_target(target)
    if not isinstance(model, nn.Module):
        try:
            model = build_model(model, in_channels=input_shape[0], num_classes=num_classes)
        except ValueError as e:
            raise UserError(str(e)) from None
    if policy is not None and not isinstance(policy, Policy):
        try:
            policy = Policy.load(policy)
        except PolicyError as e:
            raise UserError(str(e)) from None
    return hw_models.estimate(model, input_shape=input_shape, target=tgt, policy=policy)


def targets() -> list[dict[str, Any]]:
    """Every shipped hardware target, described (name, aliases, what it models)."""
    return [hw_models.describe_target(n) for n in hw_models.list_targets()]


def methods() -> dict[str, dict[str, Any]]:
    """``{kind: {"field": policy field, "methods": {name: summary}}}`` for every compression method;
    a kind whose module cannot be imported is listed with an ``error`` (one broken module never
    hides the rest)."""
    out: dict[str, dict[str, Any]] = {}
    for kind, (mod, attr, fld) in METHOD_KINDS.items():
        try:
            # Imported here: sharing and regularizers need scikit-learn (1.6 s), only for this list.
            reg = getattr(importlib.import_module(mod, __package__), attr)
            out[kind] = {"field": fld, "methods": {n: reg.summary(n) for n in reg.names()}}
        except Exception as e:  # noqa: BLE001 - report, keep listing the others
            out[kind] = {"field": fld, "methods": {}, "error": f"{type(e).__name__}: {e}"}
    return out


def calibrate(target: str | None, measurements: str | Path | None, out: str | Path | None, *,
              kit: str | Path | None = None, runtime: str = "onnxruntime") -> dict[str, Any]:
    """Fit ``target`` to a CSV of measurements (or measure this machine for ``host`` / ``host-ort``);
    write ``out``. With ``kit``: write a calibration kit for another device instead."""
    if kit is None and (target is None or out is None):
        raise UserError("calibrate needs --target and --out (or --kit DIR to write a calibration kit)")
    if kit is not None and (measurements is not None or out is not None):
        raise UserError("--kit writes a kit; fit its measurements afterwards with --target, --measurements, --out")
    if target is not None:
        resolve_target(target)
    if measurements is not None and not Path(measurements).is_file():
        raise UserError(f"measurements file not found: {measurements}")
    try:
        if kit is not None:
            return hw_models.cli_calibrate(None, None, None, kit=kit, runtime=runtime)
        return hw_models.cli_calibrate(target, measurements, out, runtime="torch")
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise UserError(str(e).strip("'\"")) from None


def bench(artifact: str | Path, **kw: Any) -> BenchResult:
    """Median latency of an exported artifact on this machine, next to the cost model's."""
    try:
        return bench_artifact(artifact, **kw)
    except BenchError as e:
        raise UserError(str(e)) from None
