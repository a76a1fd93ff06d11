"""The search space: per-group prune ratios, per-layer bits and ranks, global distillation.

Dimensions are Optuna distributions named ``prune:<group root>``, ``wbits:<layer>``,
``abits:<layer>``, ``rank:<layer>``, ``kd_temperature``, ``kd_alpha``. Bit-widths are limited
to what the target stores and computes, so a sampled policy always runs on the target.
``abits:<layer>`` is conditional: it is sampled only for layers with integer weights
(:meth:`SearchSpace.samples_act_bits`); :meth:`SearchSpace.policy_from_params` itself applies
whatever it is given (sensitivity probes measure activation quantization alone), and
:meth:`SearchSpace.trial_policy` is what a trial enqueued with those params runs.

Example:
    >>> from squeezer.evaluators.models import build_model
    >>> sp = SearchSpace.build(build_model("lenet5", in_channels=1, num_classes=10), (1, 28, 28),
    ...                        weight_bits=(4, 8), act_bits=(8, None))
    >>> sp.uniform_policy(prune_ratio=0.5, weight_bits=4).for_layer("features.0").weight_bits
    4
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from torch import nn

from ..compressors.layers import classifier_name
from ..compressors.lowrank import can_decompose
from ..compressors.policy import DistillConfig, LayerPolicy, Policy, PruningConfig
from ..compressors.pruning import ChannelGroups, channel_groups

PRUNE_CHOICES = (0.0, 0.25, 0.5, 0.75)
RANK_CHOICES = (None, 0.5, 0.25)


def kd_params(distill: DistillConfig | None = None) -> dict[str, float]:
    """The distillation dimensions' values for ``distill`` (the defaults of :class:`DistillConfig`
    when None: what seeds and the uniform grid use)."""
    d = distill or DistillConfig()
    return {"kd_temperature": d.temperature, "kd_alpha": d.alpha}


#: The default distillation settings as search parameters.
KD_DEFAULTS = kd_params()


@dataclass
class SearchSpace:
    layers: list[str]
    groups: list[str]
    groups_info: ChannelGroups
    weight_bits: tuple[int | None, ...]
    act_bits: tuple[int | None, ...]
    rank_layers: list[str] = field(default_factory=list)
    prune_choices: tuple[float, ...] = PRUNE_CHOICES
    rank_choices: tuple[float | None, ...] = RANK_CHOICES
    distill: bool = True
    criterion: str = "l1"
    quantizer: str = "uniform"

    @classmethod
    def build(cls, model: nn.Module, input_shape: Sequence[int], *, weight_bits: Sequence[int | None],
              act_bits: Sequence[int | None], distill: bool = True, criterion: str = "l1",
              quantizer: str = "uniform", rank_min_params: int = 4096,
              prune_choices: Sequence[float] = PRUNE_CHOICES) -> "SearchSpace":
        cg = channel_groups(model, input_shape)
        layers, rank_layers = [], []
        head = classifier_name(model)
        for name, m in model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                layers.append(name)
                big = m.weight.numel() >= rank_min_params
                spatial = isinstance(m, nn.Linear) or m.kernel_size != (1, 1) or min(m.in_channels, m.out_channels) >= 64
                if can_decompose(m) and big and spatial and name != head:
                    rank_layers.append(name)
        return cls(layers=layers, groups=list(cg.sizes), groups_info=cg, weight_bits=tuple(weight_bits),
                   act_bits=tuple(act_bits), rank_layers=rank_layers, distill=distill, criterion=criterion,
                   quantizer=quantizer, prune_choices=tuple(float(c) for c in prune_choices))

    # --- sampling -------------------------------------------------------------------------
    def sample(self, trial: Any) -> Policy:
        """Ask ``trial`` (an Optuna trial) for every dimension; return the policy."""
        params: dict[str, Any] = {}
        for g in self.groups:
            params[f"prune:{g}"] = trial.suggest_categorical(f"prune:{g}", list(self.prune_choices))
        for name in self.layers:
            params[f"wbits:{name}"] = wb = trial.suggest_categorical(f"wbits:{name}", list(self.weight_bits))
            if self.samples_act_bits(wb):
                params[f"abits:{name}"] = trial.suggest_categorical(f"abits:{name}", list(self.act_bits))
        for name in self.rank_layers:
            params[f"rank:{name}"] = trial.suggest_categorical(f"rank:{name}", list(self.rank_choices))
        if self.distill:
            params["kd_temperature"] = trial.suggest_float("kd_temperature", 1.0, 8.0)
            params["kd_alpha"] = trial.suggest_float("kd_alpha", 0.0, 0.9)
        return self.policy_from_params(params)

    def samples_act_bits(self, weight_bits: int | None) -> bool:
        """Is ``abits:<layer>`` asked of a layer whose weights got ``weight_bits``?

        Only layers with integer weights (< 16 bits) get quantized activations, unless the target
        cannot compute in float at all (``None`` not among the activation choices): runtimes
        (ONNX Runtime, XNNPACK, TFLite) run an int8 kernel only when both its weights and its input
        are integers. Float weights with integer activations would add a quantize and a dequantize
        around a float kernel, slower than float and no smaller.

        Example:
            >>> sp = SearchSpace([], [], None, weight_bits=(8, None), act_bits=(8, None))
            >>> sp.samples_act_bits(8), sp.samples_act_bits(None)
            (True, False)
        """
        return None not in self.act_bits or (weight_bits is not None and weight_bits < 16)

    def policy_from_params(self, params: dict[str, Any]) -> Policy:
        ratio_of = {}
        for g in self.groups:
            r = float(params.get(f"prune:{g}", 0.0) or 0.0)
            for m in self.groups_info.members[g]:
                ratio_of.setdefault(m, r)
        layers = {}
        for name in self.layers:
            layers[name] = LayerPolicy(
                prune_ratio=ratio_of.get(name, 0.0),
                weight_bits=params.get(f"wbits:{name}"),
                act_bits=params.get(f"abits:{name}"),
                rank_ratio=params.get(f"rank:{name}") if name in self.rank_layers else None,
                quantizer=self.quantizer,
            )
        distill = None
        if self.distill and "kd_alpha" in params:
            distill = DistillConfig(temperature=float(params["kd_temperature"]), alpha=float(params["kd_alpha"]))
        return Policy(layers=layers, pruning=PruningConfig(criterion=self.criterion), distill=distill)

    def canonical_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """``params`` as a trial gets them: without ``abits:<layer>`` where the layer's weight
        bits do not ask for it (:meth:`samples_act_bits`; Optuna ignores an enqueued value of
        a parameter the trial never asks for)."""
        return {k: v for k, v in params.items()
                if not (k.startswith("abits:") and not self.samples_act_bits(params.get("wbits:" + k[6:])))}

    def trial_policy(self, params: dict[str, Any]) -> Policy:
        """The policy a trial enqueued with ``params`` runs (what seeds must be priced as)."""
        return self.policy_from_params(self.canonical_params(params))

    def params_for(self, policy: Policy) -> dict[str, Any]:
        """Optuna params that reproduce ``policy`` (to enqueue a known policy)."""
        p: dict[str, Any] = {}
        for g in self.groups:
            p[f"prune:{g}"] = _nearest(self.groups_info.group_ratio(g, policy), self.prune_choices)
        for name in self.layers:
            lp = policy.for_layer(name)
            p[f"wbits:{name}"] = lp.weight_bits if lp.weight_bits in self.weight_bits else self.weight_bits[-1]
            p[f"abits:{name}"] = lp.act_bits if lp.act_bits in self.act_bits else self.act_bits[-1]
        for name in self.rank_layers:
            r = policy.for_layer(name).rank_ratio
            p[f"rank:{name}"] = r if r in self.rank_choices else None
        if self.distill:
            p.update(kd_params(policy.distill))
        return p

    # --- reference policies --------------------------------------------------------------
    def uniform_policy(self, *, prune_ratio: float = 0.0, weight_bits: int | None = None,
                       act_bits: int | None = None, rank_ratio: float | None = None,
                       distill: DistillConfig | None = DistillConfig()) -> Policy:
        """The same settings in every layer (the classifier is never pruned)."""
        params: dict[str, Any] = {f"prune:{g}": prune_ratio for g in self.groups}
        for name in self.layers:
            params[f"wbits:{name}"] = weight_bits
            params[f"abits:{name}"] = act_bits
        for name in self.rank_layers:
            params[f"rank:{name}"] = rank_ratio
        pol = self.policy_from_params(params)
        return replace(pol, distill=distill if self.distill else None)

    def smallest_policy(self) -> Policy:
        """The policy of the smallest model this space can reach."""
        bits = [b for b in self.weight_bits if b is not None]
        return self.uniform_policy(prune_ratio=max(self.prune_choices), weight_bits=min(bits) if bits else None,
                                   act_bits=None, rank_ratio=min((r for r in self.rank_choices if r), default=None))

    @property
    def n_dims(self) -> int:
        return len(self.groups) + 2 * len(self.layers) + len(self.rank_layers) + (2 if self.distill else 0)


def _nearest(v: float, choices: Sequence[float]) -> float:
    return min(choices, key=lambda c: abs(c - v))
