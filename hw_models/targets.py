"""Hardware targets: data files (``hw_models/targets/*.yaml``) loaded into frozen :class:`Target` objects.

A target file names the device's peak compute throughput per compute width and op class,
its memory levels (size, bandwidth, energy per byte), energy per operation, per-op
overheads, the bit-widths it stores and computes natively, memory capacities, and the
source of every figure (``sources``: dotted field path -> citation). Fields fitted by
:func:`hw_models.calibrate` (``efficiency``, ``overhead_us``, ``energy_scale``,
``active_power_mw``) say so in ``calibration``.

Targets resolve by name, alias (``arm`` -> ``arm-a72``) or path to a YAML file:

Example:
    >>> t = get_target("arm")
    >>> t.name, t.compute_width(4), t.compute_width(32)
    ('arm-a72', 8, 32)
    >>> get_target("arm-a27")
    Traceback (most recent call last):
    ...
    squeezer.compressors.registry.UnknownNameError: unknown target 'arm-a27'; did you mean 'arm-a72'? known: ...
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..compressors.registry import UnknownNameError
from .trace import KINDS

TARGETS_DIR = Path(__file__).resolve().parent / "targets"

#: Compute op classes a target gives a throughput for.
OP_CLASSES = ("conv", "pointwise", "dwconv", "linear")
#: Efficiency classes (fitted): the compute classes plus memory-bound work.
EFFICIENCY_CLASSES = OP_CLASSES + ("elementwise", "pool", "copy", "memory", "weights")
#: Classes a target may add to fit apart what its runtime runs differently: integer kernels of
#: each compute class (``conv_int``...; else they share the float class's efficiency) and the
#: quantize/dequantize ops at float <-> integer boundaries (``convert``; else ``elementwise``).
OPTIONAL_CLASSES = tuple(f"{c}_int" for c in OP_CLASSES) + ("convert",)
DEVICE_CLASSES = ("cpu", "mcu", "gpu", "asic", "fpga")
#: Sections that must cite a source (a key equal to, or starting with, the section name).
SOURCED = ("throughput_gmacs", "elementwise_gops", "memory", "mac_energy_pj", "overhead_us", "capacity")


#: Runtimes a target may model (``runtime.name``).
RUNTIMES = ("litert", "xnnpack", "onnxruntime", "tflite-micro", "cmsis-nn", "tensorrt", "pytorch", "simulator",
            "unspecified")
#: Fusion rules a target may set (``fusion``): BN folded into its conv, an activation into its
#: producer, a residual add into the float conv that produces one of its inputs.
FUSIONS = ("bn", "activation", "add")


class TargetError(ValueError):
    """A target file is malformed or incomplete."""


@dataclass(frozen=True)
class GraphRules:
    """The graph rewrites a runtime does before running a model (``runtime.graph``; applied by
    :func:`hw_models.graph.runtime_graph`).

    Attributes:
        zero_multiply: ``x * 0`` is a constant zero (ops only it reads become dead), ``x + 0``
            and ``x * 1`` are ``x``.
        constant_folding: ops whose inputs are all constants cost nothing per inference.
        dead_code: ops whose result reaches no output are removed.
    """

    zero_multiply: bool = True
    constant_folding: bool = True
    dead_code: bool = True

    @property
    def rewrites(self) -> bool:
        return self.zero_multiply or self.constant_folding or self.dead_code

    @classmethod
    def none(cls) -> "GraphRules":
        """No rewrites: every op of the traced graph runs (PyTorch eager)."""
        return cls(False, False, False)


@dataclass(frozen=True)
class IntegerKernels:
    """Where the runtime runs a conv/linear as an integer kernel (``runtime.integer_kernels``).

    Attributes:
        ops: op kinds (:data:`hw_models.trace.KINDS`) with integer kernels; others compute in
            float whatever their readers need (default: every kind, as in a fully int8 TFLite
            graph; ONNX Runtime's QDQ form gives only conv/linear integer kernels).
        weight_bits: stored weight widths the integer kernels read (empty: every width below
            32); other integer weights are dequantized at load and run a float kernel (int4 on
            ONNX Runtime CPU).
        output: ``"any"``: every conv/linear with integer weights and activations runs an
            integer kernel (TFLite int8 ops); ``"quantized"``: only when its result (through
            fused BN/activations) goes to exactly one reader that quantizes it (ONNX Runtime's
            QDQ rule: ``DQ -> Conv -> Q`` becomes ``QLinearConv``, other convs stay float with
            their ``Q -> DQ`` around them).
        through: op kinds or module types a quantize moves across (ONNX Runtime propagates
            ``Q``/``DQ`` over ``MaxPool``: ``conv -> max pool -> quantize`` still forms an integer
            conv, and the pool then runs on integers).
        whole_graph: the deployment flow quantizes every conv/linear to int8 whatever the policy
            (ExecuTorch's XNNPACK PT2E quantizer).
        dequantize_at_load: integer weights outside an integer kernel are dequantized once when
            the model loads (the float kernel streams fp32 weights; squeezer's ONNX files for ONNX
            Runtime), rather than read as integers by a hybrid kernel.
    """

    ops: tuple[str, ...] = KINDS
    weight_bits: tuple[int, ...] = ()
    output: str = "any"
    through: tuple[str, ...] = ()
    whole_graph: bool = False
    dequantize_at_load: bool = False

    def moves_across(self, kind: str, module_type: str) -> bool:
        return kind in self.through or module_type in self.through


@dataclass(frozen=True)
class RuntimeRules:
    """The runtime a target models and what it does to a graph (the file's ``runtime`` section).

    Attributes:
        name: one of :data:`RUNTIMES`.
        graph: rewrites on the traced graph.
        integer_kernels: where integer kernels form.
    """

    name: str = "unspecified"
    graph: GraphRules = field(default_factory=GraphRules)
    integer_kernels: IntegerKernels = field(default_factory=IntegerKernels)

    def to_dict(self) -> dict[str, Any]:
        ik = self.integer_kernels
        return {"name": self.name, "graph": {f.name: getattr(self.graph, f.name) for f in fields(GraphRules)},
                "integer_kernels": {"ops": list(ik.ops), "weight_bits": list(ik.weight_bits), "output": ik.output,
                                    "through": list(ik.through), "whole_graph": ik.whole_graph, "dequantize_at_load": ik.dequantize_at_load}}


@dataclass(frozen=True)
class MemoryLevel:
    """One level of the memory hierarchy.

    Attributes:
        name: ``"l1"``, ``"l2"``, ``"sram"``, ``"dram"``, ``"flash"``...
        size_bytes: capacity of the level.
        bandwidth_gbps: sustained bandwidth in GB/s (1e9 bytes per second).
        energy_pj_per_byte: energy to move one byte to/from this level.
    """

    name: str
    size_bytes: int
    bandwidth_gbps: float
    energy_pj_per_byte: float


@dataclass(frozen=True)
class Target:
    """A hardware target (see the module docstring; every field is in the YAML file).

    Attributes:
        name: registry name, e.g. ``"arm-a72"``.
        description: the device in words.
        device_class: one of ``cpu, mcu, gpu, asic, fpga``.
        storage_bits: weight widths stored natively (others are stored at the next one up).
        compute_bits: widths computed natively (others run at the next one up).
        throughput_gmacs: compute width -> op class (:data:`OP_CLASSES`) -> peak GMAC/s.
        elementwise_gops: compute width -> peak element operations per second (G).
        memory: levels from smallest to largest.
        mac_energy_pj: compute width -> energy of one multiply-accumulate.
        overhead_us: op kind -> fixed time per op (dispatch, kernel launch); ``default`` required.
        capacity: ``flash_bytes``, ``sram_bytes``, ``sram_contiguous_bytes``, ``dram_bytes`` (null = n/a).
        sources: dotted field path -> citation of the figure.
        clock_mhz: core clock.
        threads: threads/cores the throughput figures assume.
        vector_lanes: compute width -> SIMD lanes (output channels are padded to a multiple).
        input_lanes: compute width -> input-channel blocking (e.g. oneDNN's 16-channel blocked
            layouts pad input channels too); empty = no input padding.
        weights_level: memory level weights are streamed from (e.g. ``flash``); ``None`` = by working set.
        elementwise_energy_pj: compute width -> energy of one element-wise op.
        active_power_mw: power above idle while running (energy += power x latency).
        efficiency: fitted achieved/peak ratio per class (:data:`EFFICIENCY_CLASSES`); a fitted
            multiplier, so it may exceed 1 where the nominal peak or bandwidth is conservative.
        energy_scale: fitted multipliers of the ``compute`` and ``memory`` energy terms.
        fusion: ``bn`` (BN folds into conv), ``activation`` (activation fused into its producer),
            ``add`` (a residual add fused into the float conv producing one of its inputs).
        runtime: the runtime modelled and its rules (:class:`RuntimeRules`).
        sparse_kernels: whether unstructured sparsity speeds compute up.
        sparse_efficiency: achieved fraction of the ideal sparse speed-up.
        aliases: other names.
        calibration: how the fitted fields were obtained (data, rows, errors).
        path: the file it was loaded from.
    """

    name: str
    description: str
    device_class: str
    storage_bits: tuple[int, ...]
    compute_bits: tuple[int, ...]
    throughput_gmacs: Mapping[int, Mapping[str, float]]
    elementwise_gops: Mapping[int, float]
    memory: tuple[MemoryLevel, ...]
    mac_energy_pj: Mapping[int, float]
    overhead_us: Mapping[str, float]
    capacity: Mapping[str, int | None]
    sources: Mapping[str, str]
    clock_mhz: float | None = None
    threads: int = 1
    vector_lanes: Mapping[int, int] = field(default_factory=dict)
    input_lanes: Mapping[int, int] = field(default_factory=dict)
    weights_level: str | None = None
    elementwise_energy_pj: Mapping[int, float] = field(default_factory=dict)
    active_power_mw: float = 0.0
    efficiency: Mapping[str, float] = field(default_factory=dict)
    energy_scale: Mapping[str, float] = field(default_factory=dict)
    fusion: Mapping[str, bool] = field(default_factory=dict)
    runtime: RuntimeRules = field(default_factory=RuntimeRules)
    sparse_kernels: bool = False
    sparse_efficiency: float = 0.5
    aliases: tuple[str, ...] = ()
    calibration: Mapping[str, Any] = field(default_factory=dict)
    path: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        _validate(self)

    def __hash__(self) -> int:
        return hash((self.name, tuple(sorted(self.efficiency.items())), tuple(sorted(self.overhead_us.items()))))

    # -- widths ----------------------------------------------------------------------------
    def compute_width(self, bits: int | None) -> int:
        """The width an operation of ``bits`` runs at: the next supported compute width up."""
        return _next_width(32 if bits is None else bits, self.compute_bits)

    def storage_width(self, bits: int | None) -> int:
        """The width a weight of ``bits`` is stored at on this target (the next supported one up)."""
        return _next_width(32 if bits is None else bits, self.storage_bits)

    def eff(self, cls: str) -> float:
        return float(self.efficiency.get(cls, 1.0))

    def overhead(self, kind: str) -> float:
        return float(self.overhead_us.get(kind, self.overhead_us["default"]))

    def level(self, name: str) -> MemoryLevel:
        for m in self.memory:
            if m.name == name:
                return m
        raise TargetError(f"target {self.name!r} has no memory level {name!r}; levels: {[m.name for m in self.memory]}")

    # -- (de)serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "path":
                continue
            v = getattr(self, f.name)
            if f.name == "runtime":
                v = v.to_dict()
            elif f.name == "memory":
                v = [{"name": m.name, "size_bytes": m.size_bytes, "bandwidth_gbps": m.bandwidth_gbps,
                      "energy_pj_per_byte": m.energy_pj_per_byte} for m in v]
            elif isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, Mapping):
                v = _plain(v)
            d[f.name] = v
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "<dict>") -> "Target":
        return _from_dict(d, source)

    def replace(self, **changes: Any) -> "Target":
        return replace(self, **changes)


def _plain(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _next_width(bits: int, supported: tuple[int, ...]) -> int:
    up = [b for b in supported if b >= bits]
    return min(up) if up else max(supported)


# --- validation ------------------------------------------------------------------------------

_REQUIRED = ("name", "description", "device_class", "storage_bits", "compute_bits", "throughput_gmacs",
             "elementwise_gops", "memory", "mac_energy_pj", "overhead_us", "capacity", "sources")
_CAPACITY_KEYS = ("flash_bytes", "sram_bytes", "sram_contiguous_bytes", "dram_bytes")


def _fail(source: str, msg: str) -> None:
    raise TargetError(f"target file {source}: {msg}")


def _check(source: str, cond: bool, rule: str, got: str) -> None:
    if not cond:
        _fail(source, f"`{rule}` must hold, but got {got}")


def _from_dict(d: Mapping[str, Any], source: str) -> Target:
    if not isinstance(d, Mapping):
        _fail(source, f"must be a mapping of fields, but got {type(d).__name__}")
    for k in _REQUIRED:
        if k not in d or d[k] is None:
            _fail(source, f"missing required field '{k}'")
    known = {f.name for f in fields(Target)}
    unknown = set(d) - known
    if unknown:
        _fail(source, f"unknown field(s) {sorted(unknown)}; known: {sorted(known - {'path'})}")
    mem = []
    if not isinstance(d["memory"], (list, tuple)) or not d["memory"]:
        _fail(source, "field 'memory' must be a non-empty list of levels")
    for i, m in enumerate(d["memory"]):
        if not isinstance(m, Mapping):
            _fail(source, f"memory[{i}] must be a mapping")
        for k in ("name", "size_bytes", "bandwidth_gbps", "energy_pj_per_byte"):
            if k not in m or m[k] is None:
                _fail(source, f"missing required field 'memory[{i}].{k}'")
        mem.append(MemoryLevel(name=str(m["name"]), size_bytes=int(float(m["size_bytes"])),
                               bandwidth_gbps=float(m["bandwidth_gbps"]),
                               energy_pj_per_byte=float(m["energy_pj_per_byte"])))
    cap = d["capacity"]
    if not isinstance(cap, Mapping):
        _fail(source, "field 'capacity' must be a mapping")
    for k in _CAPACITY_KEYS:
        if k not in cap:
            _fail(source, f"missing required field 'capacity.{k}' (null if not applicable)")

    def int_keyed(name: str, v: Any) -> dict:
        if not isinstance(v, Mapping):
            _fail(source, f"field '{name}' must be a mapping keyed by bit-width")
        try:
            return {int(k): x for k, x in v.items()}
        except (TypeError, ValueError):
            _fail(source, f"field '{name}' must be keyed by integer bit-widths, but got keys {list(v)}")
        return {}

    thr = {b: {str(c): float(x) for c, x in (v or {}).items()}
           for b, v in int_keyed("throughput_gmacs", d["throughput_gmacs"]).items()}
    kw = dict(d)
    kw.update(
        storage_bits=tuple(int(b) for b in d["storage_bits"]),
        compute_bits=tuple(int(b) for b in d["compute_bits"]),
        throughput_gmacs=thr,
        elementwise_gops={b: float(x) for b, x in int_keyed("elementwise_gops", d["elementwise_gops"]).items()},
        memory=tuple(mem),
        mac_energy_pj={b: float(x) for b, x in int_keyed("mac_energy_pj", d["mac_energy_pj"]).items()},
        elementwise_energy_pj={b: float(x) for b, x in
                               int_keyed("elementwise_energy_pj", d.get("elementwise_energy_pj") or {}).items()},
        vector_lanes={b: int(x) for b, x in int_keyed("vector_lanes", d.get("vector_lanes") or {}).items()},
        input_lanes={b: int(x) for b, x in int_keyed("input_lanes", d.get("input_lanes") or {}).items()},
        overhead_us={str(k): float(v) for k, v in d["overhead_us"].items()},
        capacity={k: (None if cap.get(k) is None else int(float(cap[k]))) for k in _CAPACITY_KEYS},
        sources={str(k): str(v) for k, v in d["sources"].items()},
        efficiency={str(k): float(v) for k, v in (d.get("efficiency") or {}).items()},
        energy_scale={str(k): float(v) for k, v in (d.get("energy_scale") or {}).items()},
        fusion=_fusion(source, d.get("fusion") or {}),
        runtime=_runtime(source, d.get("runtime")),
        aliases=tuple(str(a) for a in (d.get("aliases") or ())),
        calibration=dict(d.get("calibration") or {}),
        path=None if source.startswith("<") else source,
    )
    try:
        return Target(**kw)
    except TargetError:
        raise
    except (TypeError, ValueError) as e:
        _fail(source, str(e))
    raise AssertionError  # unreachable


def _fusion(source: str, d: Any) -> dict[str, bool]:
    if not isinstance(d, Mapping):
        _fail(source, "field 'fusion' must be a mapping of rule -> true/false")
    for k, v in d.items():
        _check(source, k in FUSIONS, f"fusion keys in {FUSIONS}", f"'fusion.{k}'")
        _check(source, isinstance(v, bool), f"fusion.{k} is true or false", f"{v!r}")
    return {str(k): bool(v) for k, v in d.items()}


def _section(source: str, d: Any, path: str, known: tuple[str, ...]) -> Mapping[str, Any]:
    """A mapping whose keys are all in ``known`` (else the unknown field is named)."""
    if d is None:
        return {}
    if not isinstance(d, Mapping):
        _fail(source, f"field '{path}' must be a mapping, but got {type(d).__name__}")
    for k in d:
        if k not in known:
            _fail(source, f"unknown field '{path}.{k}'; known: {list(known)}")
    return d


def _runtime(source: str, d: Any) -> RuntimeRules:
    """The ``runtime`` section, every rule checked (a malformed one is named by its field path)."""
    if d is None:
        return RuntimeRules()
    d = _section(source, d, "runtime", ("name", "graph", "integer_kernels"))
    name = d.get("name", "unspecified")
    _check(source, name in RUNTIMES, f"runtime.name in {RUNTIMES}", f"runtime.name={name!r}")
    g = _section(source, d.get("graph"), "runtime.graph", tuple(f.name for f in fields(GraphRules)))
    for k, v in g.items():
        _check(source, isinstance(v, bool), f"runtime.graph.{k} is true or false", f"{v!r}")
    ik = _section(source, d.get("integer_kernels"), "runtime.integer_kernels",
                  tuple(f.name for f in fields(IntegerKernels)))
    ops = ik.get("ops", KINDS)
    _check(source, isinstance(ops, (list, tuple)) and set(ops) <= set(KINDS),
           f"runtime.integer_kernels.ops is a list of op kinds {KINDS}", f"{ops!r}")
    wb = ik.get("weight_bits", ())
    _check(source, isinstance(wb, (list, tuple)) and all(isinstance(b, int) and 1 <= b < 32 for b in wb),
           "runtime.integer_kernels.weight_bits is a list of widths in [1, 32)", f"{wb!r}")
    out = ik.get("output", "any")
    _check(source, out in ("any", "quantized"), "runtime.integer_kernels.output in ('any', 'quantized')",
           f"{out!r}")
    through = ik.get("through", ())
    _check(source, isinstance(through, (list, tuple)) and all(isinstance(t, str) for t in through),
           "runtime.integer_kernels.through is a list of op kinds or module types", f"{through!r}")
    flags = {k: ik.get(k, False) for k in ("whole_graph", "dequantize_at_load")}
    for k, v in flags.items():
        _check(source, isinstance(v, bool), f"runtime.integer_kernels.{k} is true or false", f"{v!r}")
    return RuntimeRules(name=name, graph=GraphRules(**g),
                        integer_kernels=IntegerKernels(tuple(ops), tuple(wb), out, tuple(through), **flags))


def _validate(t: Target) -> None:
    src = t.path or f"<{t.name}>"
    _check(src, bool(t.name) and isinstance(t.name, str), "name is a non-empty string", f"name={t.name!r}")
    _check(src, t.device_class in DEVICE_CLASSES, f"device_class in {DEVICE_CLASSES}",
           f"device_class={t.device_class!r}")
    _check(src, len(t.compute_bits) > 0 and all(1 <= b <= 32 for b in t.compute_bits),
           "compute_bits is a non-empty list of widths in [1, 32]", f"compute_bits={list(t.compute_bits)}")
    _check(src, len(t.storage_bits) > 0 and all(1 <= b <= 32 for b in t.storage_bits),
           "storage_bits is a non-empty list of widths in [1, 32]", f"storage_bits={list(t.storage_bits)}")
    for b in t.compute_bits:
        if b not in t.throughput_gmacs:
            _fail(src, f"missing required field 'throughput_gmacs.{b}' (compute width {b} is listed in compute_bits)")
        for c in OP_CLASSES:
            if c not in t.throughput_gmacs[b]:
                _fail(src, f"missing required field 'throughput_gmacs.{b}.{c}'")
            v = t.throughput_gmacs[b][c]
            _check(src, v > 0 and math.isfinite(v), f"throughput_gmacs.{b}.{c} > 0", f"{v}")
        if b not in t.elementwise_gops:
            _fail(src, f"missing required field 'elementwise_gops.{b}'")
        _check(src, t.elementwise_gops[b] > 0, f"elementwise_gops.{b} > 0", f"{t.elementwise_gops[b]}")
        if b not in t.mac_energy_pj:
            _fail(src, f"missing required field 'mac_energy_pj.{b}'")
        _check(src, t.mac_energy_pj[b] >= 0, f"mac_energy_pj.{b} >= 0", f"{t.mac_energy_pj[b]}")
    if "default" not in t.overhead_us:
        _fail(src, "missing required field 'overhead_us.default'")
    for k, v in t.overhead_us.items():
        _check(src, v >= 0, f"overhead_us.{k} >= 0", f"{v}")
    sizes = [m.size_bytes for m in t.memory]
    _check(src, sizes == sorted(sizes), "memory levels ordered from smallest to largest",
           f"sizes={sizes}")
    for m in t.memory:
        _check(src, m.size_bytes > 0 and m.bandwidth_gbps > 0 and m.energy_pj_per_byte >= 0,
               f"memory level {m.name!r} has size_bytes > 0, bandwidth_gbps > 0, energy_pj_per_byte >= 0",
               f"{m}")
    if t.weights_level is not None:
        _check(src, t.weights_level in [m.name for m in t.memory], "weights_level names a memory level",
               f"weights_level={t.weights_level!r}")
    for k, v in t.efficiency.items():
        _check(src, k in EFFICIENCY_CLASSES + OPTIONAL_CLASSES,
               f"efficiency keys in {EFFICIENCY_CLASSES + OPTIONAL_CLASSES}", f"{k!r}")
        _check(src, v > 0 and math.isfinite(v), f"efficiency.{k} > 0", f"{v}")
    for k, v in t.energy_scale.items():
        _check(src, k in ("compute", "memory"), "energy_scale keys in ('compute', 'memory')", f"{k!r}")
        _check(src, v >= 0, f"energy_scale.{k} >= 0", f"{v}")
    _check(src, t.active_power_mw >= 0, "active_power_mw >= 0", f"{t.active_power_mw}")
    _check(src, t.threads >= 1, "threads >= 1", f"{t.threads}")
    _check(src, 0 < t.sparse_efficiency <= 1, "0 < sparse_efficiency <= 1", f"{t.sparse_efficiency}")
    for sec in SOURCED:
        if not any(k == sec or k.startswith(sec + ".") for k in t.sources):
            _fail(src, f"missing required field 'sources.{sec}' (every figure needs its provenance)")


# --- registry --------------------------------------------------------------------------------

def _target_files() -> dict[str, Path]:
    return {p.stem: p for p in sorted(TARGETS_DIR.glob("*.yaml"))}


@lru_cache(maxsize=64)
def _load_file(path: str, mtime: float) -> Target:
    p = Path(path)
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise TargetError(f"target file {p}: cannot parse YAML: {str(e).splitlines()[0]}") from None
    return _from_dict(d, str(p))


def load_target(path: str | Path) -> Target:
    """Load and validate a target YAML file."""
    p = Path(path)
    if not p.is_file():
        raise TargetError(f"target file not found: {p}")
    return _load_file(str(p.resolve()), p.stat().st_mtime)


def _aliases() -> dict[str, str]:
    out: dict[str, str] = {}
    for stem, p in _target_files().items():
        try:
            t = load_target(p)
        except TargetError:
            continue
        for a in t.aliases:
            out[a] = stem
    return out


def list_targets() -> list[str]:
    """Names of the shipped targets (aliases not included)."""
    return list(_target_files())


def get_target(name_or_path: "str | Path | Target") -> Target:
    """A target by name, alias or YAML path.

    Raises:
        compressors.registry.UnknownNameError: unknown name (with a did-you-mean hint).
        TargetError: the file is malformed or incomplete (the message names the field).
    """
    if isinstance(name_or_path, Target):
        return name_or_path
    s = str(name_or_path)
    files = _target_files()
    if s in files:
        return load_target(files[s])
    aliases = _aliases()
    if s in aliases:
        return load_target(files[aliases[s]])
    if s.endswith((".yaml", ".yml")) or "/" in s or Path(s).is_file():
        return load_target(s)
    raise UnknownNameError(_did_you_mean(s, list(files) + list(aliases), "target"))


def _did_you_mean(name: str, known: list[str], kind: str) -> str:
    """Like ``compressors.registry.did_you_mean``, preferring a transposition (``a27`` -> ``a72``)."""
    scored = sorted(((difflib.SequenceMatcher(None, name, k).ratio(), sorted(k) == sorted(name), k) for k in known),
                    key=lambda x: (-x[0] - (0.5 if x[1] else 0.0), x[2]))
    hint = f"; did you mean {scored[0][2]!r}?" if scored and (scored[0][0] >= 0.5 or scored[0][1]) else ""
    return f"unknown {kind} {name!r}{hint} known: {', '.join(sorted(known))}"


def save_target(target: Target, path: str | Path) -> Path:
    """Write ``target`` as YAML (loadable with :func:`get_target`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    chunks = []
    for k, v in target.to_dict().items():
        # sources/calibration/memory one entry per line; numeric tables compact
        block = k in ("sources", "calibration", "memory", "runtime") or not isinstance(v, (dict, list))
        chunks.append(yaml.safe_dump({k: v}, sort_keys=False, default_flow_style=False if block else None,
                                     width=1000 if block else 110))
    path.write_text(f"# squeezer hardware target {target.name!r} (written by save_target)\n" + "".join(chunks))
    _load_file.cache_clear()
    return path


def describe_target(name: str | Path | Target) -> dict[str, Any]:
    """A summary of a target, for ``squeezer targets`` / ``squeezer cost`` (plain JSON types)."""
    t = get_target(name)
    return {
        "name": t.name, "aliases": list(t.aliases), "description": t.description, "device_class": t.device_class,
        "path": t.path, "clock_mhz": t.clock_mhz, "threads": t.threads,
        "storage_bits": list(t.storage_bits), "compute_bits": list(t.compute_bits),
        "peak_gmacs": {b: max(v.values()) for b, v in t.throughput_gmacs.items()},
        "memory": [{"name": m.name, "size_bytes": m.size_bytes, "bandwidth_gbps": m.bandwidth_gbps}
                   for m in t.memory],
        "capacity": dict(t.capacity), "sparse_kernels": t.sparse_kernels,
        "calibrated": bool(t.calibration), "calibration": _plain(t.calibration),
    }
