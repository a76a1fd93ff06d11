"""Policy types and everything that changes a model: prune, quantize, share, low-rank, distill.

Flat public API (the modules are private details)::

    from . import Policy, LayerPolicy, apply_policy_, QUANTIZERS

Example:
    >>> from squeezer.compressors import Policy, LayerPolicy, PRUNING_CRITERIA
    >>> "taylor" in PRUNING_CRITERIA and Policy(layers={"_default": LayerPolicy(weight_bits=8)}).layers != {}
    True
"""

from __future__ import annotations

from . import criteria as _criteria  # noqa: F401  (registers the data-driven pruning criteria)
from .apply import ApplyResult, apply_policy_, compressible_layers
from .distill import DISTILLATION, Distiller, make_distiller
from .lowrank import DECOMPOSITIONS
from .policy import SCHEMA, DistillConfig, LayerPolicy, Policy, PolicyError, PruningConfig, SparsityConfig
from .pruning import PRUNING_CRITERIA, ChannelGroups, channel_groups, kept_channels, prune_
from .quantize import ACT_QUANTIZERS, QUANTIZERS, QuantizedTensor, WeightQuantizer
from .registry import Registry, UnknownNameError
from .regularizers import REGULARIZERS
from .sharing import SHARING
from .sparsity import SPARSITY_METHODS, sparsity_step_hook

__all__ = [
    "SCHEMA", "Policy", "LayerPolicy", "PruningConfig", "SparsityConfig", "DistillConfig", "PolicyError",
    "apply_policy_", "ApplyResult", "compressible_layers",
    "channel_groups", "ChannelGroups", "kept_channels", "prune_",
    "PRUNING_CRITERIA", "SPARSITY_METHODS", "QUANTIZERS", "ACT_QUANTIZERS", "DECOMPOSITIONS", "DISTILLATION",
    "QuantizedTensor", "WeightQuantizer", "Distiller", "make_distiller", "sparsity_step_hook",
    "Registry", "UnknownNameError", "SHARING", "REGULARIZERS",
]
