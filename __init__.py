"""squeezer: make CNNs fit real hardware.

Search per-layer compression policies (structured pruning, weight and activation bit-widths,
low-rank ranks, distillation) for your trained model under a size budget and latency / energy
limits on a hardware target, then fine-tune the chosen one and export it verified.

Example (your own model, data and metric; see the README's "Python API" for a complete script)::

    import squeezer
    result = squeezer.search(model, data=(train_set, val_set), budget="2MB", target="arm",
                             metric=my_metric, trials=10, run="runs/mine")
    result.best.policy, result.best.model, result.best.metrics, result.front
    result.export("onnx", "model.onnx")

The repository root is this package: ``search/``, ``compressors/``, ``evaluators/`` and
``hw_models/`` install as ``squeezer.search``, ``squeezer.compressors``, ... (ARCHITECTURE.md).

    >>> import squeezer
    >>> squeezer.Policy(layers={"_default": squeezer.LayerPolicy(weight_bits=8)}).for_layer("conv").weight_bits
    8
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from . import search  # the package, callable as the search itself (search/__init__.py)
from .compressors.policy import DistillConfig, LayerPolicy, Policy, PruningConfig, SparsityConfig
from .evaluators.checkpoint import load_checkpoint
from .hw_models.cost import Cost
from .search import (
    Applied,
    Candidate,
    Exported,
    SearchConfig,
    SearchResult,
    UserError,
    apply,
    bench,
    calibrate,
    cost,
    export,
    methods,
    report,
    resume,
    sensitivity,
    targets,
)

__all__ = [
    # the job
    "search", "resume", "SearchResult", "Candidate", "SearchConfig",
    # one policy, one model
    "apply", "Applied", "export", "Exported", "load_checkpoint",
    "Policy", "LayerPolicy", "PruningConfig", "SparsityConfig", "DistillConfig",
    # hardware
    "cost", "Cost", "targets", "calibrate", "bench",
    # runs and methods
    "report", "sensitivity", "methods",
    "UserError",
]

try:
    __version__ = _version("squeezer")
except PackageNotFoundError:  # a source checkout on sys.path, not installed
    __version__ = "dev"
