"""Policy data types: what to do to each layer, serialisable and versioned.

A :class:`Policy` maps layer keys to :class:`LayerPolicy` objects. Keys are module FQNs
(``"layer1.0.conv1"``), regular expressions (``"re:layer1\\..*"``) or ``"_default"``. Lookup
order for a layer: exact FQN, then the first matching regex in insertion order, then
``_default``, then an empty ``LayerPolicy()`` (leave the layer alone).

Example:
    >>> p = Policy(layers={"_default": LayerPolicy(weight_bits=8)})
    >>> p.for_layer("features.0").weight_bits
    8
    >>> Policy.from_dict(p.to_dict()) == p
    True
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

SCHEMA = "squeezer.policy/1"
#: Older schema names we know how to read (migrated on load).
_LEGACY_SCHEMAS = {"squeezer.policy/0"}

VALID_BITS = (1, 2, 3, 4, 5, 6, 7, 8, 16)


class PolicyError(ValueError):
    """A policy (or policy file) is malformed."""


def _check(cond: bool, rule: str, got: str) -> None:
    if not cond:
        raise PolicyError(f"`{rule}` must hold, but got {got}")


@dataclass(frozen=True)
class LayerPolicy:
    """Compression settings of one layer.

    Attributes:
        prune_ratio: fraction of output channels removed (structured), in [0, 1).
        sparsity: fraction of individual weights zeroed (unstructured), in [0, 1).
        weight_bits: storage/compute width of weights; ``None`` = fp32, 16 = fp16.
        act_bits: width of this layer's input activations; ``None`` = float.
        quantizer: weight quantizer name (registry ``compressors.QUANTIZERS``).
        rank_ratio: low-rank decomposition rank as a fraction of full rank; ``None`` = none.
        decomposition: decomposition name (registry ``compressors.DECOMPOSITIONS``).
        sharing: weight-sharing method (registry ``compressors.SHARING``) or ``None``.
        clusters: number of shared values for ``sharing`` (``None`` = ``2**weight_bits``
            or chosen by the method, e.g. BIRCH).
        act_quantizer: activation quantizer name (registry ``compressors.quantize.ACT_QUANTIZERS``).
    """

    prune_ratio: float = 0.0
    sparsity: float = 0.0
    weight_bits: int | None = None
    act_bits: int | None = None
    quantizer: str = "uniform"
    rank_ratio: float | None = None
    decomposition: str = "svd"
    sharing: str | None = None
    clusters: int | None = None
    act_quantizer: str = "uniform"

    def __post_init__(self) -> None:
        _check(0.0 <= self.prune_ratio < 1.0, "0 <= prune_ratio < 1", f"prune_ratio={self.prune_ratio}")
        _check(0.0 <= self.sparsity < 1.0, "0 <= sparsity < 1", f"sparsity={self.sparsity}")
        for name in ("weight_bits", "act_bits"):
            v = getattr(self, name)
            _check(v is None or (isinstance(v, int) and v in VALID_BITS),
                   f"{name} in {VALID_BITS} or null", f"{name}={v!r}")
        if self.rank_ratio is not None:
            _check(0.0 < self.rank_ratio <= 1.0, "0 < rank_ratio <= 1", f"rank_ratio={self.rank_ratio}")
        if self.clusters is not None:
            _check(isinstance(self.clusters, int) and self.clusters >= 2, "clusters >= 2",
                   f"clusters={self.clusters!r}")


@dataclass(frozen=True)
class PruningConfig:
    """How structured pruning picks channels.

    Attributes:
        criterion: importance name (registry ``compressors.PRUNING_CRITERIA``).
        global_ratio: if set, criteria that rank channels globally (e.g. ``saliency``)
            choose per-layer ratios themselves so that this fraction of channels goes.
        round_to: keep channel counts multiples of this (hardware friendliness).
    """

    criterion: str = "l1"
    global_ratio: float | None = None
    round_to: int | None = None

    def __post_init__(self) -> None:
        if self.global_ratio is not None:
            _check(0.0 <= self.global_ratio < 1.0, "0 <= global_ratio < 1", f"global_ratio={self.global_ratio}")
        if self.round_to is not None:
            _check(self.round_to >= 1, "round_to >= 1", f"round_to={self.round_to}")


@dataclass(frozen=True)
class SparsityConfig:
    """How unstructured sparsity is imposed: ``magnitude`` or ``dns`` (dynamic network surgery)."""

    method: str = "magnitude"


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation during fine-tune.

    Attributes:
        method: ``hinton`` (soft targets), ``fitnets`` (hints) or ``attention`` (attention transfer).
        temperature: softmax temperature of the soft targets.
        alpha: weight of the distillation term; ``1 - alpha`` weighs the hard-label loss.
        hint_layers: module FQNs whose features are matched (fitnets / attention).
        hint_weight: weight of the feature term.
    """

    method: str = "hinton"
    temperature: float = 4.0
    alpha: float = 0.5
    hint_layers: tuple[str, ...] = ()
    hint_weight: float = 1.0

    def __post_init__(self) -> None:
        _check(self.temperature > 0, "temperature > 0", f"temperature={self.temperature}")
        _check(0.0 <= self.alpha <= 1.0, "0 <= alpha <= 1", f"alpha={self.alpha}")
        if not isinstance(self.hint_layers, tuple):
            object.__setattr__(self, "hint_layers", tuple(self.hint_layers))


@dataclass(frozen=True)
class Policy:
    """A whole-model compression policy (see module docstring for key lookup)."""

    layers: Mapping[str, LayerPolicy] = field(default_factory=dict)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    distill: DistillConfig | None = None
    coding: str | None = None
    regularizer: str | None = None

    def __post_init__(self) -> None:
        for k, v in self.layers.items():
            _check(isinstance(k, str), "layer keys are strings", f"{k!r}")
            _check(isinstance(v, LayerPolicy), "layer values are LayerPolicy", f"{type(v).__name__} for {k!r}")
            if k.startswith("re:"):
                try:
                    re.compile(k[3:])
                except re.error as e:
                    raise PolicyError(f"invalid regular expression in layer key {k!r}: {e}") from None
        _check(self.coding in (None, "huffman"), "coding in (null, 'huffman')", f"coding={self.coding!r}")
        # Freeze the mapping's content (dict is kept for ordering of regex keys).
        object.__setattr__(self, "layers", dict(self.layers))

    def __hash__(self) -> int:  # dict field: hash the canonical JSON instead
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @property
    def prunes(self) -> bool:
        """Whether the policy removes channels: a ``prune_ratio`` above 0 anywhere, or a global ratio.

        Example:
            >>> Policy().prunes, Policy().with_layer("fc", prune_ratio=0.5).prunes
            (False, True)
        """
        return bool(self.pruning.global_ratio) or any(lp.prune_ratio > 0 for lp in self.layers.values())

    # -- lookup -----------------------------------------------------------------------------
    def for_layer(self, name: str) -> LayerPolicy:
        """The settings that apply to module ``name``."""
        if name in self.layers:
            return self.layers[name]
        for key, lp in self.layers.items():
            if key.startswith("re:") and re.fullmatch(key[3:], name):
                return lp
        return self.layers.get("_default", LayerPolicy())

    def resolved(self, names: list[str]) -> "Policy":
        """Same policy with one explicit FQN entry per name (no regex, no default)."""
        return replace(self, layers={n: self.for_layer(n) for n in names})

    def with_layer(self, name: str, **changes: Any) -> "Policy":
        """Copy with ``changes`` applied to ``name``'s settings (creating an FQN entry)."""
        layers = dict(self.layers)
        layers[name] = replace(self.for_layer(name), **changes)
        return replace(self, layers=layers)

    # -- (de)serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        default = LayerPolicy()
        layers = {}
        for k, lp in self.layers.items():
            # Sparse encoding: only fields that differ from the defaults.
            layers[k] = {f.name: getattr(lp, f.name) for f in fields(lp)
                         if getattr(lp, f.name) != getattr(default, f.name)}
        d: dict[str, Any] = {"schema": SCHEMA, "layers": layers, "pruning": asdict(self.pruning),
                             "sparsity": asdict(self.sparsity),
                             "distill": None if self.distill is None else {**asdict(self.distill),
                                                                          "hint_layers": list(self.distill.hint_layers)},
                             "coding": self.coding}
        if self.regularizer is not None:
            d["regularizer"] = self.regularizer
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Policy":
        if not isinstance(d, Mapping):
            raise PolicyError(f"a policy must be a JSON object, but got {type(d).__name__}")
        schema = d.get("schema")
        if schema is None:
            raise PolicyError(f"policy has no 'schema' field; expected \"{SCHEMA}\"")
        if schema in _LEGACY_SCHEMAS:
            d = _migrate(d)
        elif schema != SCHEMA:
            raise PolicyError(f"unsupported policy schema {schema!r}; this squeezer reads {SCHEMA!r}"
                              f" (and migrates {sorted(_LEGACY_SCHEMAS)})")
        known = {"schema", "layers", "pruning", "sparsity", "distill", "coding", "regularizer", "meta"}
        unknown = set(d) - known
        if unknown:
            raise PolicyError(f"unknown policy field(s) {sorted(unknown)}; known: {sorted(known)}")
        layers_raw = d.get("layers", {}) or {}
        if not isinstance(layers_raw, Mapping):
            raise PolicyError("policy 'layers' must be an object keyed by module name, 're:<regex>' or '_default'")
        layers = {str(k): _build(LayerPolicy, v, f"layers[{k!r}]") for k, v in layers_raw.items()}
        distill = d.get("distill")
        return cls(
            layers=layers,
            pruning=_build(PruningConfig, d.get("pruning") or {}, "pruning"),
            sparsity=_build(SparsityConfig, d.get("sparsity") or {}, "sparsity"),
            distill=None if distill is None else _build(DistillConfig, distill, "distill"),
            coding=d.get("coding"),
            regularizer=d.get("regularizer"),
        )

    def save(self, path: str | Path, *, meta: Mapping[str, Any] | None = None) -> Path:
        """Write JSON (or YAML when the suffix is .yaml/.yml)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        d = self.to_dict()
        if meta:
            d["meta"] = dict(meta)
        if path.suffix in (".yaml", ".yml"):
            path.write_text(yaml.safe_dump(d, sort_keys=False))
        else:
            path.write_text(json.dumps(d, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Policy":
        path = Path(path)
        if not path.is_file():
            raise PolicyError(f"policy file not found: {path}")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                d = yaml.safe_load(text)
            else:
                d = json.loads(text)
        except Exception as e:  # noqa: BLE001 - any parse error is a bad policy file
            raise PolicyError(f"cannot parse policy file {path}: {str(e).splitlines()[0]}") from None
        return cls.from_dict(d)


def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, Mapping):
        raise PolicyError(f"policy {where} must be an object, but got {raw!r}")
    names = {f.name for f in fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise PolicyError(f"unknown field(s) {sorted(unknown)} in policy {where}; known: {sorted(names)}")
    try:
        return cls(**raw)
    except PolicyError as e:
        raise PolicyError(f"policy {where}: {e}") from None
    except TypeError as e:
        raise PolicyError(f"policy {where}: {e}") from None


def _migrate(d: Mapping[str, Any]) -> dict[str, Any]:
    """squeezer.policy/0 -> /1: 'bits' became 'weight_bits', 'prune' became 'prune_ratio'."""
    out = {k: v for k, v in d.items() if k != "schema"}
    out["schema"] = SCHEMA
    layers = {}
    for k, v in (d.get("layers") or {}).items():
        v = dict(v)
        if "bits" in v:
            v["weight_bits"] = v.pop("bits")
        if "prune" in v:
            v["prune_ratio"] = v.pop("prune")
        layers[k] = v
    out["layers"] = layers
    return out
