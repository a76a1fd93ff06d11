"""Cost models: latency, energy, exact size and peak memory of a traced model under a policy.

Pure Python over a :class:`~hw_models.trace.LayerTable` (no torch work): re-estimating a new
policy takes about a millisecond per hundred layers.

**Policy.** Structured pruning changes every op's channels through the traced channel
segments (the same rule :func:`compressors.pruning.prune_` uses); a layer with ``rank_ratio``
is replaced by its factors (SVD: kxk conv to ``r`` channels, then 1x1 conv); ``weight_bits``
and ``act_bits`` set the compute width (the next width the target computes natively; an
unquantized activation means float compute), the bytes moved and the bytes stored;
unstructured ``sparsity`` shrinks storage (bitmap + non-zeros) and speeds compute only where
the target declares sparse kernels.

**Latency** of an op (milliseconds) is an additive roofline::

    t = overhead_us[kind] / 1e3
      + padded_macs / (throughput_gmacs[bits][class] * efficiency[class]) / 1e6
      + element_ops / (elementwise_gops[bits] * efficiency[class]) / 1e6
      + activation_bytes / (bandwidth_gbps[level] * efficiency["memory"]) / 1e6
      + weight_bytes / (bandwidth_gbps[weight level] * efficiency["weights"]) / 1e6

where ``padded_macs`` rounds output channels up to the SIMD lanes (and input channels to
``input_lanes`` where the runtime uses blocked layouts). Activations move at the bandwidth of
the smallest memory level holding the op's inputs and output; weights at that of the level
holding all the model's weights (each is reused once per inference), or ``weights_level``. Batch
norms that fold into their conv and activations fused into their producer cost nothing
(``target.fusion``). Every term is linear in one fitted parameter (an overhead, or the
reciprocal of an efficiency), which is what :func:`hw_models.calibrate` fits.

**Representation boundaries.** Each op writes its output at the width it computes at (a
folded/fused op or a view as its input was); a reader that needs another width (an int8 conv
reading a float tensor, a float op reading an int8 one, the float logits the caller reads) pays
one elementwise ``quantize``/``dequantize`` op per (tensor, width), shown as its own row
(``"<tensor>:quantize"``). A conv/linear reads its input at ``act_bits`` (float without) and,
when its weights are float, dequantizes it again before the float kernel: every runtime (ONNX
Runtime, XNNPACK, TFLite) pays these conversions, so a float island in an int8 network, or
int8 activations around float weights, costs more than either representation alone. Peak
memory ignores the converted copies.

**Energy** (millijoules) = ``energy_scale.compute`` x (MACs x ``mac_energy_pj`` + element ops
x ``elementwise_energy_pj``) + ``energy_scale.memory`` x bytes x ``energy_pj_per_byte`` of their
level + ``active_power_mw`` x latency.

**Size** is exact: the byte count of :func:`compressors.packing.pack_model` of the compressed
model (see that module for the format). With ``policy.coding == "huffman"`` the size is an
entropy estimate (``Cost.size_exact`` is False): the real Huffman size needs the weights.

**Peak memory** is the largest set of live activations in execution order (MCUNet's
definition): a tensor lives from the op that writes it to its last reader; folded/fused ops,
views and single-consumer activations work in place. Activation bytes use the width of the
tensor's readers (``act_bits`` of the consuming conv/linear; float elsewhere).

Example:
    >>> from squeezer.evaluators.models import build_model
    >>> from squeezer.hw_models.trace import trace
    >>> from squeezer.compressors.policy import Policy, LayerPolicy
    >>> t = trace(build_model("resnet20", in_channels=3, num_classes=10), (3, 32, 32))
    >>> base = estimate_table(t, None, "arm-a72")
    >>> q8 = estimate_table(t, Policy(layers={"_default": LayerPolicy(weight_bits=8, act_bits=8)}), "arm-a72")
    >>> q8.size_bytes < base.size_bytes and q8.latency_ms < base.latency_ms
    True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Protocol, Sequence

from ..compressors.coding import relative_index_estimate
from ..compressors.lowrank import svd_rank
from ..compressors.policy import LayerPolicy, Policy
from ..compressors.pruning import ChannelGroups
from ..compressors.sparsity import n_zero
from .graph import runtime_graph
from .targets import EFFICIENCY_CLASSES, OPTIONAL_CLASSES, Target, get_target
from .trace import COMPRESSIBLE, LayerSpec, LayerTable, trace

#: The schema of :meth:`Cost.to_dict` (``squeezer cost --json``).
COST_SCHEMA = "squeezer.cost/2"


@dataclass(frozen=True)
class LayerCost:
    """Cost of one op as it runs under the policy (decomposed layers give one row per factor).

    Attributes:
        name: op name (a factor of decomposed ``X`` is ``X.0``, ``X.1``).
        kind: op kind (see :data:`hw_models.trace.KINDS`).
        macs: multiply-accumulates after pruning/decomposition.
        latency_ms: time of the op.
        energy_mj: energy of the op.
        size_bytes: stored bytes of its parameters (packing format).
        act_bytes: bytes of its output activation.
        compute_bits: width it computes at on the target.
        weight_bits: stored weight width (``None`` = float32).
        out_channels: output channels after pruning.
        level: memory level its data moves from.
        fused: folded/fused into its producer (costs nothing).
    """

    name: str
    kind: str
    macs: int
    latency_ms: float
    energy_mj: float
    size_bytes: int
    act_bytes: int
    compute_bits: int
    weight_bits: int | None
    out_channels: int
    level: str
    fused: bool = False


@dataclass(frozen=True)
class Cost:
    """What a model costs on a target.

    Attributes:
        latency_ms: batch-1 latency.
        energy_mj: energy per inference.
        size_bytes: stored bytes (exact, see :mod:`compressors.packing`).
        peak_memory_bytes: largest live activation set.
        macs: multiply-accumulates (conv, linear, and the functional matmuls of ``"other"`` ops).
        layers: per-op rows, execution order.
        target: target name.
        params: stored parameter elements (after pruning/decomposition, zeros included).
        size_exact: False when ``size_bytes`` is an entropy estimate (Huffman coding).
        fits: capacity checks (``flash``: size fits flash, ``sram``: peak fits contiguous SRAM).
    """

    latency_ms: float
    energy_mj: float
    size_bytes: int
    peak_memory_bytes: int
    macs: int
    layers: tuple[LayerCost, ...] = ()
    target: str = ""
    params: int = 0
    size_exact: bool = True
    fits: Mapping[str, bool] = field(default_factory=dict)

    def to_dict(self, *, layers: bool = True) -> dict[str, Any]:
        """``squeezer.cost/2`` (``squeezer cost --json``; keys as in the README's "JSON fields")."""
        d: dict[str, Any] = {"schema": COST_SCHEMA, "target": self.target, "latency_ms": self.latency_ms, "energy_mj": self.energy_mj,
                             "size_bytes": self.size_bytes, "peak_memory_bytes": self.peak_memory_bytes,
                             "macs": self.macs, "param_count": self.params, "size_exact": self.size_exact,
                             "fits": dict(self.fits)}
        if layers:
            d["layers"] = [asdict(l) for l in self.layers]
        return d


class CostModel(Protocol):
    """A cost model: a pure function of (layer table, policy)."""

    def estimate(self, table: LayerTable, policy: Policy | None = None) -> Cost: ...


# --- size rules (shared with compressors.packing) -------------------------------------------

def weight_storage_bytes(numel: int, out_channels: int, *, weight_bits: int | None, sparsity: float = 0.0,
                         codebook: int | None = None, scale: bool = True) -> int:
    """Stored bytes of one weight tensor under the packing format (see :mod:`compressors.packing`).

    Args:
        numel: weight elements.
        out_channels: rows that carry a scale.
        weight_bits: code width; ``None`` = fp32, 16 = fp16 (when there is no codebook).
        sparsity: fraction zeroed (``floor(numel * sparsity)`` elements); > 0 adds a bitmap.
        codebook: codebook entries ``K`` (weight sharing, non-uniform levels), or ``None``.
        scale: whether the fp32 per-channel scale is stored (not for unit-scale codebooks
            without a folded BatchNorm, see :func:`unit_scale`).
    """
    nnz, bitmap = numel, 0
    if sparsity > 0:
        nnz = numel - n_zero(numel, sparsity)
        bitmap = (numel + 7) // 8
    if codebook is None and weight_bits is None:
        body = 4 * nnz
    elif codebook is None and weight_bits == 16:
        body = 2 * nnz
    else:
        bits = weight_bits if weight_bits is not None else max(1, math.ceil(math.log2(codebook or 2)))
        body = (nnz * bits + 7) // 8 + 4 * out_channels * scale + (4 * codebook if codebook else 0)
    return body + bitmap


def unit_scale(lp: LayerPolicy) -> bool:
    """Whether the layer's quantizer has an all-ones per-channel scale (the codebook holds the
    values: k-means / BIRCH / spectral sharing, the ``kmeans`` and ``ttq`` quantizers); such
    a scale is stored only where a BatchNorm folds into the layer
    (:func:`compressors.packing.unit_scale` is the packer's side)."""
    if lp.sharing is not None:
        return lp.sharing != "pq"
    return lp.weight_bits is not None and lp.weight_bits != 16 and lp.quantizer in ("kmeans", "ttq")


def _pq_bytes(numel: int, out_channels: int, bits: int, k: int, sparsity: float, subvector: int = 4) -> int:
    d = max(dd for dd in range(1, subvector + 1) if out_channels % dd == 0)
    bitmap = (numel + 7) // 8 if sparsity > 0 else 0
    return (numel // d * bits + 7) // 8 + 4 * out_channels * k + bitmap


_POW2 = ("pow2", "inq")


def weight_layout(lp: LayerPolicy, out_channels: int) -> tuple[int | None, int | None, bool, bool]:
    """How a layer's weight is stored: ``(code bits or None=float/fp16, codebook entries, pq, exact)``.

    Mirrors the quantizers of :mod:`compressors.quantize` / :mod:`compressors.sharing`:
    ``binary`` (1 bit, 2 entries), ``ttq`` (2 bits, 3), ``pow2``/``inq`` (``2**b - 1``
    levels), ``kmeans`` sharing (``min(clusters or 2**b, 2**b - z) + z`` entries, ``z`` = 1
    for the reserved zero code of a sparse layer), ``pq`` (per sub-space codebooks). BIRCH
    picks its cluster count from the data, so its size is an upper bound (``exact`` False).
    """
    sparse = lp.sparsity > 0
    z = int(sparse)
    if lp.sharing is not None:
        if lp.weight_bits is not None and lp.weight_bits != 16:
            bits, clusters = lp.weight_bits, lp.clusters
        else:
            clusters = lp.clusters if lp.clusters is not None else 256
            bits = max(1, math.ceil(math.log2(clusters + z)))
        if lp.sharing == "pq":
            return bits, min(2 ** bits, clusters or 2 ** bits), True, True
        k = min(clusters or 2 ** bits, 2 ** bits - z) + z
        return bits, k, False, lp.sharing in ("kmeans", "spectral")
    if lp.weight_bits is None or lp.weight_bits == 16:
        return None, None, False, True
    b = lp.weight_bits
    q = lp.quantizer
    if q == "binary" or (q == "least_squares" and b == 1):
        return 1, 2, False, True
    if q == "ttq":
        return 2, 3, False, True
    if q in _POW2:
        return b, 2 ** b - 1, False, True
    if q == "kmeans":
        return b, min(lp.clusters or 2 ** b, 2 ** b - z) + z, False, True
    return b, None, False, True


def _code_bits(lp: LayerPolicy) -> int | None:
    bits, _, _, _ = weight_layout(lp, 1)
    if bits is None:
        return 16 if lp.weight_bits == 16 else None
    return bits


def _entropy_bits(bits: int) -> float:
    """Estimated entropy (bits/weight) of ``bits``-bit max-abs-scaled codes of bell-shaped weights.

    For Gaussian weights quantized with a step of ``3 sigma / qmax``, the code entropy is
    ``log2(sqrt(2 pi e) / 3) + log2(qmax)`` ~ ``0.46 + log2(2**(b-1) - 1)``; never above ``bits``.
    """
    if bits <= 1:
        return 1.0
    qmax = 2 ** (bits - 1) - 1
    return max(1.0, min(float(bits), 0.46 + math.log2(max(qmax, 1))))


# --- expansion of a table under a policy -----------------------------------------------------

@dataclass
class _Op:
    name: str
    kind: str
    inputs: tuple[str, ...]
    out_channels: int
    out_hw: tuple[int, int]
    macs: int = 0
    cls: str | None = None            # efficiency class
    numel: int = 0                    # weight elements
    lp: LayerPolicy | None = None
    stored: int = 0                   # packed bytes (exact size model)
    bias_out: int = 0                 # channels of a stored bias
    bn_folded: bool = False           # a BatchNorm folds into this op (its scale is stored)
    kernel: tuple[int, int] = (1, 1)
    zero_cost: bool = False           # folded BN / fused activation / view
    alias: bool = False               # output shares its input's buffer
    elem_ops: float = 0.0
    extra_params: int = 0
    in_per_group: int = 1             # input channels per group (conv/linear), for input padding
    module_type: str = ""

    @property
    def out_elems(self) -> int:
        return self.out_channels * self.out_hw[0] * self.out_hw[1]


def _compute_class(kind: str, kernel: tuple[int, int], groups: int) -> str:
    if kind == "dwconv2d":
        return "dwconv"
    if kind == "linear":
        return "linear"
    return "pointwise" if kernel == (1, 1) and groups == 1 else "conv"


def _producer(by_name: Mapping[str, Any], name: str, fuse_bn: bool) -> Any:
    """The layer whose result ``name`` is as the runtime sees it: a BN folded into its conv is that conv."""
    layer = by_name.get(name)
    if layer is not None and layer.kind == "bn" and layer.bn_folded_into and fuse_bn:
        return by_name.get(layer.bn_folded_into, layer)
    return layer


@dataclass
class _Graph:
    """What pricing one layer needs to know about the rest of the table and the runtime's fusions."""

    by_name: dict[str, Any]
    consumers: dict[str, int]
    folded_into: dict[str, str]    # conv -> the BN folded into it
    fuse_bn: bool
    fuse_act: bool
    fuse_add: bool

    @classmethod
    def of(cls, table: LayerTable, target: Target) -> "_Graph":
        consumers: dict[str, int] = {}
        for l in table:
            for i in l.inputs:
                consumers[i] = consumers.get(i, 0) + 1
        return cls({l.name: l for l in table}, consumers,
                   {l.bn_folded_into: l.name for l in table if l.kind == "bn" and l.bn_folded_into},
                   target.fusion.get("bn", True), target.fusion.get("activation", True),
                   target.fusion.get("add", False))


def _expand(table: LayerTable, policy: Policy, target: Target) -> tuple[list[_Op], dict[str, str]]:
    """Ops as they run under ``policy`` (decomposition expanded), plus a rename map for inputs."""
    # the pruning rule of compressors.pruning (one definition): the group's ratio, then kept_channels
    kept = ChannelGroups(members=dict(table.group_members), sizes=dict(table.group_sizes)).kept_counter(policy)
    g = _Graph.of(table, target)
    rename: dict[str, str] = {}
    ops: list[_Op] = []
    for l in table:
        ins = tuple(rename.get(i, i) for i in l.inputs)
        out_c = kept(l.out_segments) if l.out_segments else l.out_channels
        in_c = kept(l.in_segments) if l.in_segments else l.in_channels
        if l.kind in COMPRESSIBLE:
            new = _compressible_ops(l, ins, in_c, out_c, policy.for_layer(l.name), l.name in g.folded_into)
            if len(new) > 1:  # factored: readers of the layer read its second factor
                rename[l.name] = new[-1].name
            ops += new
        else:
            ops.append(_other_op(l, ins, in_c, out_c, g))
    return ops, rename


def _compressible_ops(l: LayerSpec, ins: tuple[str, ...], in_c: int, out_c: int, lp: LayerPolicy,
                      bn_folded: bool) -> list[_Op]:
    """A conv/linear as it runs: one op, or two when a low-rank policy factors it."""
    kh, kw = l.kernel
    hw = l.out_hw[0] * l.out_hw[1]
    bias_c = out_c if (l.bias or bn_folded) else 0
    if l.kind == "dwconv2d":
        groups, per_out = out_c, kh * kw
    else:
        groups, per_out = l.groups, max(1, in_c // l.groups) * kh * kw
    decomposable = l.kind == "linear" or (l.kind == "conv2d" and l.groups == 1)
    if lp.rank_ratio is not None and lp.rank_ratio < 1.0 and decomposable:
        if l.kind == "linear":
            r = svd_rank(out_c, in_c, rank_ratio=lp.rank_ratio)
        else:
            r = svd_rank(out_c, in_c, kh, kw, 1, lp.rank_ratio)
        a = _Op(f"{l.name}.0", l.kind, ins, r, l.out_hw, macs=r * hw * in_c * kh * kw,
                cls=_compute_class(l.kind, l.kernel, 1), numel=r * in_c * kh * kw, lp=lp, kernel=l.kernel,
                in_per_group=in_c)
        b = _Op(f"{l.name}.1", l.kind, (a.name,), out_c, l.out_hw, macs=out_c * hw * r,
                cls=_compute_class(l.kind, (1, 1), 1), numel=out_c * r, lp=lp, bias_out=bias_c,
                in_per_group=r, bn_folded=bn_folded)
        return [a, b]
    return [_Op(l.name, l.kind, ins, out_c, l.out_hw, macs=out_c * hw * per_out,
                cls=_compute_class(l.kind, l.kernel, groups), numel=out_c * per_out, lp=lp,
                bias_out=bias_c, kernel=l.kernel, bn_folded=bn_folded,
                in_per_group=1 if l.kind == "dwconv2d" else max(1, in_c // max(1, groups)))]


def _other_op(l: LayerSpec, ins: tuple[str, ...], in_c: int, out_c: int, g: _Graph) -> _Op:
    """Any other layer as it runs: folded or fused into its producer (free), a view, or the
    elementwise / pooling / copy work it does."""
    op = _Op(l.name, l.kind, ins, out_c, l.out_hw, kernel=l.kernel, module_type=l.module_type)
    if l.kind == "bn":
        if l.bn_folded_into is not None and g.fuse_bn:
            op.zero_cost = op.alias = True
        else:
            op.cls, op.elem_ops = "elementwise", 2.0 * op.out_elems
        if l.bn_folded_into is None:
            op.stored = 8 * out_c
        return op
    if l.kind == "act":
        src = _producer(g.by_name, l.inputs[0], g.fuse_bn) if l.inputs else None
        single = bool(l.inputs) and g.consumers.get(l.inputs[0], 0) == 1
        if g.fuse_act and single and src is not None and src.kind in COMPRESSIBLE + ("add", "bn"):
            op.zero_cost = op.alias = True
        else:
            op.cls, op.elem_ops, op.alias = "elementwise", float(op.out_elems), single
    elif l.kind == "add" and g.fuse_add and any(
            _producer(g.by_name, i, g.fuse_bn).kind in COMPRESSIBLE and g.consumers.get(i, 0) == 1
            for i in l.inputs if i in g.by_name):
        op.zero_cost = op.alias = True  # the conv accumulates into the sum (ONNX Runtime's NCHWc Conv + Add)
    elif l.kind in ("add", "mul"):
        op.cls, op.elem_ops = "elementwise", float(op.out_elems * max(1, len(l.inputs) - 1))
    elif l.kind == "pool":
        op.cls, op.elem_ops = "pool", float(op.out_elems * l.kernel[0] * l.kernel[1])
    elif l.kind == "gap":
        op.cls, op.elem_ops = "pool", float(in_c * l.in_hw[0] * l.in_hw[1])
    elif l.kind == "concat":
        op.cls, op.elem_ops = "copy", float(op.out_elems)
    elif l.kind == "flatten":
        op.alias = True
    elif l.macs:  # a functional linear / matmul / attention: multiply-accumulates at full width
        op.cls, op.macs = "linear", l.macs
    else:
        op.cls, op.elem_ops = "elementwise", float(op.out_elems)
    # parameters outside conv/linear/BN (activations, layer scales, embeddings): fp32
    op.extra_params = l.params
    op.stored = 4 * op.extra_params
    return op


def _act_bits(op: _Op, target: Target) -> int | None:
    """The width a conv/linear reads its input at: its policy's ``act_bits``, or 8 where the
    deployment flow quantizes the whole graph (``runtime.integer_kernels.whole_graph``)."""
    if op.lp is None:
        return None
    return 8 if target.runtime.integer_kernels.whole_graph else op.lp.act_bits


def _tensor_bits(ops: list[_Op], outputs: Iterable[str], target: Target) -> dict[str, int]:
    """Bits per element of each tensor: the widest width any reader needs (float by default)."""
    bits: dict[str, int] = {o: 32 for o in outputs}
    for op in reversed(ops):
        if op.name not in bits:
            bits[op.name] = 0
        if op.lp is not None:
            act = _act_bits(op, target)
            need = act if act is not None else 32
        else:
            need = bits[op.name] or 32
        for i in op.inputs:
            bits[i] = max(bits.get(i, 0), need)
    return {k: (v or 32) for k, v in bits.items()}


def _level(target: Target, working_set: float):
    for m in target.memory:
        if working_set <= m.size_bytes:
            return m
    return target.memory[-1]


def _weight_bytes_moved(op: _Op, target: Target, integer: bool = True) -> float:
    lp = op.lp
    if lp is None:
        return 0.0
    ik = target.runtime.integer_kernels
    at_load = not integer and ik.dequantize_at_load
    w = op.numel * (32 if at_load else 8 if ik.whole_graph else target.storage_width(_code_bits(lp))) / 8.0
    if lp.sparsity > 0 and target.sparse_kernels:
        w = w * (1.0 - lp.sparsity) + op.numel / 8.0
    return w


def _op_terms(op: _Op, target: Target, in_bytes: float, out_bytes: float, cbits: int,
              model_weight_bytes: float = 0.0) -> tuple[list[tuple[str, float]], float, float, int, str, int]:
    """Latency terms ``[(parameter, ms at coefficient 1)]``, energy (pJ, without static), bytes, level, bits.

    ``cbits`` is the width the op computes at (:func:`_compute_bits`); a conv/linear below 32
    bits runs an integer kernel, priced with the target's ``<class>_int`` efficiency and
    ``<kind>_int`` overhead where it has them.
    """
    terms: list[tuple[str, float]] = []
    if op.zero_cost:
        return terms, 0.0, 0.0, 0, "-", cbits
    kind = op.kind
    integer = op.lp is not None and cbits < 32
    if integer and f"{kind}_int" in target.overhead_us:
        kind = f"{kind}_int"
    okey = "overhead_us." + (kind if kind in target.overhead_us else "default")
    terms.append((okey, 1e-3))
    e_pj = 0.0
    if op.lp is not None:  # conv / linear
        lp = op.lp
        cls = f"{op.cls}_int" if integer and f"{op.cls}_int" in target.efficiency else op.cls
        lanes = target.vector_lanes.get(cbits, 1)
        oc = max(1, op.out_channels)
        padded = op.macs * (math.ceil(oc / lanes) * lanes / oc) if lanes > 1 else float(op.macs)
        ilanes = target.input_lanes.get(cbits, 1)
        if ilanes > 1 and op.in_per_group > 1:  # blocked layouts pad input channels too
            ic = op.in_per_group
            padded *= math.ceil(ic / ilanes) * ilanes / ic
        w_moved = _weight_bytes_moved(op, target, integer)
        macs_run = float(op.macs)
        if lp.sparsity > 0 and target.sparse_kernels:
            factor = min(1.0, (1.0 - lp.sparsity) / target.sparse_efficiency)
            padded *= factor
            macs_run *= 1.0 - lp.sparsity
        peak = target.throughput_gmacs[cbits][op.cls]  # type: ignore[index]
        terms.append(("efficiency." + cls, padded / (peak * 1e6)))
        e_pj += macs_run * target.mac_energy_pj[cbits]
        moved = w_moved + in_bytes + out_bytes
        # Weights are reused once per inference: between two uses the whole model's weights pass
        # through the caches, so they come from the level that holds all of them (or weights_level).
        wl = target.level(target.weights_level) if target.weights_level is not None else \
            _level(target, model_weight_bytes)
        al = _level(target, in_bytes + out_bytes)
        e_mem = w_moved * wl.energy_pj_per_byte + (in_bytes + out_bytes) * al.energy_pj_per_byte
        level = wl.name if w_moved > in_bytes + out_bytes else al.name
        # conv weight streaming is fitted apart from other traffic: runtimes may reorder (copy)
        # conv weights into blocked layouts per call (eager oneDNN), or keep them resident
        t_w = w_moved / (wl.bandwidth_gbps * 1e6)
        t_a = (in_bytes + out_bytes) / (al.bandwidth_gbps * 1e6)
        if op.kind == "linear":
            terms.append(("efficiency.memory", t_w + t_a))
        else:
            terms.append(("efficiency.weights", t_w))
            terms.append(("efficiency.memory", t_a))
        return terms, e_pj, e_mem, int(round(moved)), level, cbits
    if op.macs:  # a functional matmul or linear: no policy compresses it
        terms.append(("efficiency." + str(op.cls), op.macs / (target.throughput_gmacs[cbits][op.cls] * 1e6)))
        e_pj += op.macs * target.mac_energy_pj[cbits]
    if op.elem_ops:
        cls = "convert" if op.kind in ("quantize", "dequantize") and "convert" in target.efficiency else op.cls
        terms.append(("efficiency." + str(cls), op.elem_ops / (target.elementwise_gops[cbits] * 1e6)))
        e_pj += op.elem_ops * target.elementwise_energy_pj.get(cbits, 0.0)
    moved = 0.0 if kind == "flatten" else in_bytes + out_bytes  # views move nothing
    lv = _level(target, in_bytes + out_bytes)
    if moved:
        terms.append(("efficiency.memory", moved / (lv.bandwidth_gbps * 1e6)))
    return terms, e_pj, moved * lv.energy_pj_per_byte, int(round(moved)), lv.name, cbits


def coefficients(target: Target) -> dict[str, float]:
    """The fitted parameters as linear coefficients: ``overhead_us.<kind>`` (us) and ``efficiency.<cls>`` (1/eff)."""
    c = {f"overhead_us.{k}": float(v) for k, v in target.overhead_us.items()}
    for cls in EFFICIENCY_CLASSES + tuple(k for k in OPTIONAL_CLASSES if k in target.efficiency):
        c[f"efficiency.{cls}"] = 1.0 / target.eff(cls)
    return c


@dataclass
class _Breakdown:
    """Per-op pieces of an estimate (what calibration needs as features)."""

    ops: list[_Op]
    terms: list[list[tuple[str, float]]]
    e_compute_pj: list[float]
    e_memory_pj: list[float]
    moved: list[int]
    levels: list[str]
    cbits: list[int]
    out_bytes: list[int]
    size_bytes: int
    size_exact: bool
    peak_bytes: int
    params: int


def _breakdown(table: LayerTable, policy: Policy, target: Target) -> _Breakdown:
    table = runtime_graph(table, target.runtime.graph)
    ops, rename = _expand(table, policy, target)
    outputs = [rename.get(o, o) for o in table.outputs] or ([ops[-1].name] if ops else [])
    bits = _tensor_bits(ops, outputs, target)
    integer = _integer_kernels(ops, outputs, target)
    pr = _Pricer(table, target, bits.get("input", 32), sum(_weight_bytes_moved(op, target, op.name in integer)
                                                           for op in ops))
    size, exact, params = 0, True, 0
    if "call" in target.overhead_us:  # the runtime's fixed cost per inference (session run, input copy)
        pr.add_row(_Op("(call)", "call", (), 0, (1, 1)), ([("overhead_us.call", 1e-3)], 0.0, 0.0, 0,
                                                                         "-", 32), 0)
    for op in ops:
        pr.price(op, _compute_bits(op, target, op.name in integer, bits.get(op.name, 32)))
        if op.lp is not None:
            op.stored, ok = _stored_bytes(op, policy.coding == "huffman")
            exact = exact and ok
            params += op.numel + op.bias_out
        size += op.stored
    for o in outputs:  # the caller reads float logits
        pr.convert(o, pr.float_w)
    peak = _peak_memory(ops, pr.tbytes, outputs)
    b = pr.bd
    b.size_bytes, b.size_exact, b.peak_bytes, b.params = size, exact, peak, params
    return b


class _Pricer:
    """Prices ops in execution order, each tensor at the width it is written at (``domain``),
    with a quantize/dequantize op wherever a reader needs another width."""

    def __init__(self, table: LayerTable, target: Target, input_bits: int, model_weight_bytes: float) -> None:
        self.target, self.model_w = target, model_weight_bytes
        self.bd = _Breakdown([], [], [], [], [], [], [], [], 0, True, 0, 0)
        self.float_w = target.compute_width(32)
        n = math.prod(int(d) for d in table.input_shape)
        self.tbytes: dict[str, int] = {"input": (n * input_bits + 7) // 8}
        self.domain: dict[str, int] = {"input": self.float_w}     # width each tensor is written at
        hw = tuple(int(d) for d in table.input_shape[1:3]) or (1, 1)
        self.elems: dict[str, tuple[int, int, tuple[int, int]]] = {
            "input": (n, int(table.input_shape[0]), hw)}  # type: ignore[dict-item]
        self.converted: dict[tuple[str, int], str] = {}

    def add_row(self, op: _Op, row: tuple, ob: int) -> None:
        terms, epj, emem, moved, level, cbits = row
        b = self.bd
        b.ops.append(op)
        b.terms.append(terms)
        b.e_compute_pj.append(epj)
        b.e_memory_pj.append(emem)
        b.moved.append(moved)
        b.levels.append(level)
        b.cbits.append(cbits)
        b.out_bytes.append(ob)

    def convert(self, t: str, to: int) -> str:
        """``t`` read at width ``to``: one (de)quantize op per (tensor, width), shared by all
        readers at that width (a memory-bound op over the tensor). Returns the tensor read."""
        frm = self.domain.get(t, self.float_w)
        if frm == to:
            return t
        if (t, to) in self.converted:
            return self.converted[(t, to)]
        n, ch, hw = self.elems.get(t, (0, 1, (1, 1)))
        kind = "quantize" if to < frm else "dequantize"
        q = _Op(f"{t}:{kind}", kind, (t,), ch, hw, cls="elementwise", elem_ops=float(n))
        ib, ob = (n * frm + 7) // 8, (n * to + 7) // 8
        self.add_row(q, _op_terms(q, self.target, ib, ob, self.target.compute_width(min(frm, to)), self.model_w), ob)
        self.converted[(t, to)] = q.name
        self.domain[q.name], self.elems[q.name] = to, self.elems.get(t, (0, 1, (1, 1)))
        return q.name

    def price(self, op: _Op, cbits: int) -> None:
        """``op`` computing at ``cbits``: the conversions of its inputs, then the op itself."""
        if op.zero_cost or op.kind == "flatten":  # folded / fused / a view: written as its input was
            self.domain[op.name] = self.domain.get(op.inputs[0], self.float_w) if op.inputs else self.float_w
        else:
            # conv/linear read their input at act_bits (float without); other ops at their width
            act = _act_bits(op, self.target)
            read = cbits if op.lp is None else self.float_w if act is None else self.target.compute_width(act)
            for i in op.inputs:
                t = self.convert(i, read)
                if read != cbits:  # integer activations into a float kernel
                    self.convert(t, cbits)
            self.domain[op.name] = cbits
        ob = (op.out_elems * self.domain[op.name] + 7) // 8
        ib = sum(self.tbytes.get(i, 0) for i in op.inputs)
        self.tbytes[op.name] = ob
        self.elems[op.name] = (op.out_elems, op.out_channels, op.out_hw)
        self.add_row(op, _op_terms(op, self.target, ib, ob, cbits, self.model_w), ob)


def _stored_bytes(op: _Op, huffman: bool) -> tuple[int, bool]:
    """(packed bytes of a conv/linear's parameters, whether exact)."""
    lp = op.lp
    assert lp is not None
    wbits, k, pq, exact = weight_layout(lp, op.out_channels)
    if pq:
        w = _pq_bytes(op.numel, op.out_channels, wbits or 8, k or 2, lp.sparsity)
        exact = exact and not huffman  # the packer Huffman-codes the sub-vector indices and positions too
    else:
        scale = op.bn_folded or not unit_scale(lp)
        if huffman and wbits is not None:
            exact = False
            w = _huffman_estimate(op.numel, op.out_channels, wbits, lp.sparsity, k, scale=scale)
        else:
            w = weight_storage_bytes(op.numel, op.out_channels,
                                     weight_bits=wbits if wbits is not None else lp.weight_bits,
                                     sparsity=lp.sparsity, codebook=k, scale=scale)
    return w + 4 * op.bias_out + (8 if lp.act_bits is not None and lp.act_bits < 16 else 0), exact


def _readers(ops: list[_Op], outputs: Sequence[str], target: Target) -> dict[str, list[_Op | None]]:
    """Tensor -> the ops that read it, looking through folded/fused ops and the ops a quantize
    moves across (``runtime.integer_kernels.through``); ``None``: a model output."""
    direct: dict[str, list[_Op]] = {}
    for op in ops:
        for i in op.inputs:
            direct.setdefault(i, []).append(op)
    outs = set(outputs)
    ik = target.runtime.integer_kernels

    def final(name: str) -> list[_Op | None]:
        found: list[_Op | None] = [None] if name in outs else []
        for r in direct.get(name, []):
            found += final(r.name) if r.zero_cost or ik.moves_across(r.kind, r.module_type) else [r]
        return found

    return {op.name: final(op.name) for op in ops if op.lp is not None}


def _integer_kernels(ops: list[_Op], outputs: Sequence[str], target: Target) -> set[str]:
    """The conv/linear ops that run integer kernels on ``target`` (its ``runtime.integer_kernels``)."""
    ik = target.runtime.integer_kernels
    readers = _readers(ops, outputs, target) if ik.output == "quantized" else {}
    out = set()
    for op in ops:
        lp = op.lp
        if lp is None or op.kind not in ik.ops:
            continue
        if ik.whole_graph:
            out.add(op.name)
            continue
        wb = lp.weight_bits
        if lp.act_bits is None or wb is None or target.compute_width(max(wb, lp.act_bits)) >= 32:
            continue
        if ik.weight_bits and target.storage_width(wb) not in ik.weight_bits:
            continue  # a width the runtime cannot compute: dequantized, a float kernel runs
        if ik.output == "quantized":
            rs = readers.get(op.name, [])
            if len(rs) != 1 or rs[0] is None or _act_bits(rs[0], target) is None:
                continue  # ONNX Runtime's QDQ rule: the result goes to exactly one quantize
        out.add(op.name)
    return out


def _compute_bits(op: _Op, target: Target, integer: bool, read_bits: int) -> int:
    """The width ``op`` computes at: a conv/linear at its weight/activation width when it runs an
    integer kernel, else float; other ops at the width their readers need where the runtime has
    integer kernels of their kind (``runtime.integer_kernels.ops``), else float."""
    ik = target.runtime.integer_kernels
    if op.lp is None:
        integer_op = op.kind in ik.ops or ik.moves_across(op.kind, op.module_type)
        return target.compute_width(read_bits if integer_op else 32)
    if not integer:
        return target.compute_width(32)
    if ik.whole_graph:
        return target.compute_width(8)
    wb = op.lp.weight_bits
    return target.compute_width(max(wb if wb is not None else 32, op.lp.act_bits or 32))


def _huffman_estimate(numel: int, out_channels: int, bits: int, sparsity: float, codebook: int | None,
                      scale: bool = True) -> int:
    """Entropy estimate of a Huffman-coded tensor (:func:`compressors.coding.encode_tensor` layout:
    10-byte header, one length byte per symbol of the span, the bit stream); a sparse tensor's
    positions as Huffman-coded relative indices (:func:`compressors.coding.relative_index_estimate`)."""
    nnz = numel - n_zero(numel, sparsity) if sparsity > 0 else numel
    bitmap = relative_index_estimate(numel, nnz) if sparsity > 0 else 0
    span = codebook if codebook else 2 ** bits
    stream = int(math.ceil(nnz * (_entropy_bits(bits) if not codebook else min(bits, math.log2(max(codebook, 2))))
                           / 8))
    return 10 + span + stream + 4 * out_channels * scale + (4 * codebook if codebook else 0) + bitmap


def _peak_memory(ops: list[_Op], tbytes: Mapping[str, int], outputs: Sequence[str]) -> int:
    """Largest live activation set over the execution order (buffers shared by in-place ops)."""
    n = len(ops)
    buf_of: dict[str, int] = {"input": 0}
    size = [tbytes.get("input", 0)]
    created = [0]
    last = [0]
    for i, op in enumerate(ops):
        for x in op.inputs:
            b = buf_of.get(x)
            if b is not None:
                last[b] = max(last[b], i)
        if op.alias and op.inputs and op.inputs[0] in buf_of:
            buf_of[op.name] = buf_of[op.inputs[0]]
            continue
        buf_of[op.name] = len(size)
        size.append(tbytes.get(op.name, 0))
        created.append(i)
        last.append(i)
    for o in outputs:
        if o in buf_of:
            last[buf_of[o]] = n
    delta = [0] * (n + 2)
    for b, s in enumerate(size):
        delta[created[b]] += s
        delta[last[b] + 1] -= s
    peak = run = 0
    for i in range(n + 1):
        run += delta[i]
        peak = max(peak, run)
    return peak


def estimate_table(table: LayerTable, policy: Policy | None = None, target: "str | Target" = "arm-a72", *,
                   layers: bool = True) -> Cost:
    """Cost of a traced model under ``policy`` on ``target`` (pure Python, milliseconds).

    Args:
        table: from :func:`hw_models.trace`.
        policy: compression policy (``None`` = uncompressed).
        target: name, alias, YAML path or :class:`Target`.
        layers: include per-op rows (slightly slower).

    Returns:
        A :class:`Cost`.

    Example:
        >>> from squeezer.evaluators.models import build_model
        >>> from squeezer.hw_models.trace import trace
        >>> t = trace(build_model("lenet5", in_channels=1, num_classes=10), (1, 28, 28))
        >>> estimate_table(t, None, "arm-m7").size_bytes == 4 * sum(l.params for l in t)
        True
    """
    tgt = get_target(target)
    pol = policy if policy is not None else Policy()
    bd = _breakdown(table, pol, tgt)
    coef = coefficients(tgt)
    es_c = tgt.energy_scale.get("compute", 1.0)
    es_m = tgt.energy_scale.get("memory", 1.0)
    lat_total = 0.0
    energy_total = 0.0
    rows: list[LayerCost] = []
    for i, op in enumerate(bd.ops):
        lat = 0.0
        for p, v in bd.terms[i]:
            lat += coef[p] * v
        e = (es_c * bd.e_compute_pj[i] + es_m * bd.e_memory_pj[i]) * 1e-9 + tgt.active_power_mw * lat * 1e-3
        lat_total += lat
        energy_total += e
        if layers:
            rows.append(LayerCost(name=op.name, kind=op.kind, macs=op.macs, latency_ms=lat, energy_mj=e,
                                  size_bytes=op.stored, act_bytes=bd.out_bytes[i], compute_bits=bd.cbits[i],
                                  weight_bits=(_code_bits(op.lp) if op.lp is not None else None),
                                  out_channels=op.out_channels, level=bd.levels[i], fused=op.zero_cost))
    macs = sum(op.macs for op in bd.ops)
    cap = tgt.capacity
    fits: dict[str, bool] = {}
    if cap.get("flash_bytes"):
        fits["flash"] = bd.size_bytes <= cap["flash_bytes"]
    sram = cap.get("sram_contiguous_bytes") or cap.get("sram_bytes")
    if sram:
        fits["sram"] = bd.peak_bytes <= sram
    return Cost(latency_ms=lat_total, energy_mj=energy_total, size_bytes=bd.size_bytes,
                peak_memory_bytes=bd.peak_bytes, macs=macs, layers=tuple(rows), target=tgt.name,
                params=bd.params, size_exact=bd.size_exact, fits=fits)


def features(table: LayerTable, policy: Policy | None, target: "str | Target") -> dict[str, float]:
    """Latency features: ``{parameter: ms at coefficient 1}`` summed over ops, plus energy parts.

    ``latency_ms = sum(coefficients(target)[p] * f[p])`` over the latency parameters; the
    ``energy.compute_pj`` and ``energy.memory_pj`` entries are the energy terms before scaling.
    """
    tgt = get_target(target)
    bd = _breakdown(table, policy if policy is not None else Policy(), tgt)
    f: dict[str, float] = {}
    for terms in bd.terms:
        for p, v in terms:
            f[p] = f.get(p, 0.0) + v
    f["energy.compute_pj"] = sum(bd.e_compute_pj)
    f["energy.memory_pj"] = sum(bd.e_memory_pj)
    return f


@dataclass(frozen=True)
class TargetCostModel:
    """The :class:`CostModel` of one target."""

    target: Target

    def estimate(self, table: LayerTable, policy: Policy | None = None) -> Cost:
        return estimate_table(table, policy, self.target)


def cost_model(target: "str | Target") -> TargetCostModel:
    """The cost model of ``target`` (name, alias, path or :class:`Target`)."""
    return TargetCostModel(get_target(target))


def estimate(model: Any, input_shape: Sequence[int] = (3, 224, 224), target: "str | Target" = "arm-a72",
             policy: Policy | None = None) -> Cost:
    """Trace ``model`` and estimate its cost on ``target`` under ``policy``.

    Channel groups (Torch-Pruning) are found only when ``policy`` prunes: pricing needs none.

    Example:
        >>> from squeezer.evaluators.models import build_model
        >>> c = estimate(build_model("resnet20", in_channels=3, num_classes=10), (3, 32, 32), "arm")
        >>> c.macs
        40813184
    """
    return estimate_table(trace(model, input_shape, groups=policy is not None and policy.prunes), policy, target)
