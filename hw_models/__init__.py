"""Hardware targets and cost models: latency, energy, exact size and peak memory.

Trace a model once, then estimate any policy on any target in milliseconds:

Example:
    >>> from squeezer.evaluators.models import build_model
    >>> from squeezer.compressors.policy import Policy, LayerPolicy
    >>> from squeezer import hw_models
    >>> table = hw_models.trace(build_model("resnet20", in_channels=3, num_classes=10), (3, 32, 32))
    >>> cost = hw_models.estimate_table(table, Policy(layers={"_default": LayerPolicy(weight_bits=8)}), "arm-a72")
    >>> cost.size_bytes < hw_models.estimate_table(table, None, "arm-a72").size_bytes
    True

Targets are data files (``hw_models/targets/*.yaml``); ``get_target`` takes a name, an alias
or a path, so a calibrated profile (:func:`calibrate`, :func:`cli_calibrate`) is usable anywhere.
"""

from __future__ import annotations

from .calibrate import CalibrationRow, calibrate, cli_calibrate, evaluate, measure_host
from .cost import Cost, CostModel, LayerCost, cost_model, estimate, estimate_table
from .targets import (
                      MemoryLevel,
                      Target,
                      TargetError,
                      describe_target,
                      get_target,
                      list_targets,
                      load_target,
                      save_target,
)
from .trace import LayerSpec, LayerTable, trace

__all__ = [
    "LayerSpec", "LayerTable", "trace",
    "Target", "MemoryLevel", "TargetError", "get_target", "list_targets", "load_target", "save_target",
    "describe_target",
    "Cost", "LayerCost", "CostModel", "cost_model", "estimate", "estimate_table",
    "calibrate", "evaluate", "measure_host", "cli_calibrate", "CalibrationRow",
]
