"""Apply a :class:`~compressors.policy.Policy` to a model, in place.

Order: structured pruning (dependency-aware) -> low-rank decomposition -> unstructured
sparsity mask -> weight quantization / sharing -> activation quantization. Every step keys
layers by their original FQN, so the same policy replays on a fresh copy of the model
(that is how exported models are rebuilt: ``apply_policy_`` on the architecture, then
``load_state_dict``).

Example:
    >>> from squeezer.evaluators.models import build_model
    >>> from squeezer.compressors.policy import Policy, LayerPolicy
    >>> m = build_model("lenet5", in_channels=1, num_classes=10)
    >>> r = apply_policy_(m, Policy(layers={"_default": LayerPolicy(prune_ratio=0.5, weight_bits=4)}), (1, 28, 28))
    >>> r.kept["features.0"]
    3
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from .layers import compressible_layers
from .lowrank import DECOMPOSITIONS, can_decompose
from .policy import LayerPolicy, Policy
from .pruning import prune_
from .quantize import attach_act_quant_, attach_weight_quant_
from .sharing import attach_sharing_
from .sparsity import attach_mask_


class _Fp16(nn.Module):
    """fp16 storage: weights rounded through half precision."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.half().float()


@dataclass
class ApplyResult:
    """What :func:`apply_policy_` did: channels kept per pruning group, layers per original FQN."""

    kept: dict[str, int] = field(default_factory=dict)
    layers: dict[str, list[str]] = field(default_factory=dict)  # original FQN -> compressible FQNs now
    decomposed: list[str] = field(default_factory=list)
    #: The policy with every pruned group's ratio explicit on its root (``(C - k) / C``; also the
    #: per-group ratios a global saliency rate chose): replaying it on a fresh model gives the
    #: same shapes. Save this one.
    policy: Policy | None = None


def _set_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, attr = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def apply_policy_(model: nn.Module, policy: Policy, input_shape: Sequence[int], *,
                  data: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
                  skip_quantization: bool = False) -> ApplyResult:
    """Change ``model`` in place as ``policy`` says.

    Args:
        model: the (trained) model; it is modified.
        policy: what to do per layer.
        input_shape: ``(C, H, W)`` of one input, for dependency tracing.
        data: a few training batches, for data-driven criteria (Taylor, saliency, LASSO).
        skip_quantization: structural changes only (pruning, decomposition, masks); used
            to build a float teacher of the same shape or to measure structure alone.

    Returns:
        An :class:`ApplyResult`.
    """
    result = ApplyResult()
    originals = compressible_layers(model)
    result.kept = prune_(model, policy, input_shape, data=data)
    resolve = getattr(result.kept, "resolved_policy", None)
    result.policy = resolve(policy) if resolve is not None else policy

    mods = dict(model.named_modules())
    for name in originals:
        lp = policy.for_layer(name)
        layer = mods[name]
        if lp.rank_ratio is not None and lp.rank_ratio < 1.0 and can_decompose(layer):
            _set_module(model, name, DECOMPOSITIONS.get(lp.decomposition)(layer, lp.rank_ratio))
            result.decomposed.append(name)

    for name in originals:
        mod = model.get_submodule(name)
        parts = [f"{name}.{n}" for n, m in mod.named_modules() if n and isinstance(m, (nn.Conv2d, nn.Linear))] \
            if isinstance(mod, nn.Sequential) else [name]
        result.layers[name] = parts
        lp = policy.for_layer(name)
        for part in parts:
            _compress_layer_(model.get_submodule(part), lp, policy, skip_quantization=skip_quantization)
    return result


def _compress_layer_(layer: nn.Module, lp: LayerPolicy, policy: Policy, *, skip_quantization: bool) -> None:
    if lp.sparsity > 0:
        attach_mask_(layer, lp.sparsity, policy.sparsity.method)
    if skip_quantization:
        return
    if lp.sharing is not None:
        attach_sharing_(layer, lp)  # weight sharing (k-means, BIRCH, ...) replaces the quantizer
    elif lp.weight_bits == 16:
        parametrize.register_parametrization(layer, "weight", _Fp16())
    elif lp.weight_bits is not None:
        attach_weight_quant_(layer, lp.quantizer, lp.weight_bits)
    if lp.act_bits is not None and lp.act_bits < 16:
        attach_act_quant_(layer, lp.act_bits, lp.act_quantizer)
