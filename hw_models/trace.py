"""Trace a model once into a :class:`LayerTable`: every op that costs time, energy or memory.

The table lists, in execution order, the compressible ops (conv, depthwise conv, linear) and
the memory-bound ops around them (batch norm, activations, pooling, element-wise adds and
multiplies, concatenation, flatten/view), with their shapes, multiply-accumulates, producers
(for liveness / peak memory) and, for conv/linear, the channel segments of
:func:`compressors.pruning.channel_groups`, so that a cost model can predict the shapes of any
structured-pruning policy without tracing again. Ops the table cannot price from shapes alone
(a functional linear or matmul, attention, any other function) are kind ``"other"`` with the
multiply-accumulates ``torch.utils.flop_counter`` counts while they run; parameters read
outside their module (layer scales, position embeddings, the weights of a functional linear)
belong to the first op that reads them.

Tracing uses ``torch.fx`` symbolic tracing plus shape propagation on a zero input; models that
FX cannot trace (data-dependent control flow) fall back to forward hooks on leaf modules, which
see modules but not functional ops (adds, concatenations).

Example:
    >>> from squeezer.evaluators.models import build_model
    >>> t = trace(build_model("resnet20", in_channels=3, num_classes=10), (3, 32, 32))
    >>> t["conv1"].kind, t["conv1"].macs
    ('conv2d', 442368)
    >>> sum(l.macs for l in t) == t.macs
    True
"""

from __future__ import annotations

import math
import operator
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..compressors.layers import tensor_graph
from ..compressors.pruning import ChannelGroups, channel_groups
from ..compressors.registry import UnknownNameError, did_you_mean

Segment = tuple  # (group id | None, channels, group size), as compressors.pruning.Segment

KINDS = ("conv2d", "dwconv2d", "linear", "bn", "act", "pool", "gap", "add", "concat", "mul",
         "flatten", "other")
#: Kinds whose weights a policy compresses.
COMPRESSIBLE = ("conv2d", "dwconv2d", "linear")


@dataclass(frozen=True)
class LayerSpec:
    """One cost-bearing op of the traced graph (shapes are for one input, batch 1).

    Attributes:
        name: module FQN (``"layer1.0.conv1"``) or, for functional ops, the FX node name
            (``"add_3"``); a module called twice gets ``"relu:1"`` for its second call.
        kind: one of :data:`KINDS`.
        in_channels: channels of the (first) input; features for linear.
        out_channels: channels of the output; features for linear.
        kernel: ``(kh, kw)`` for conv and pooling, else ``(1, 1)``.
        stride: ``(sh, sw)`` for conv and pooling, else ``(1, 1)``.
        groups: conv groups (1 otherwise).
        in_hw: spatial size of the input (tokens for a linear on 3-D input, ``(1, 1)`` if none).
        out_hw: spatial size of the output.
        macs: multiply-accumulates (conv, linear and ``"other"`` ops; 0 for memory-bound ops).
        params: parameter elements of the module (weights, bias, affine), or that the op reads.
        bias: whether the conv/linear has a bias.
        inputs: producer names of the tensor inputs (``"input"`` = the model input).
        out_segments: channel segments of the output (see ``compressors.pruning``); for
            memory-bound ops they are propagated from the inputs.
        in_segments: channel segments of the input (conv/linear: the layer's input channels).
        bn_folded_into: for ``bn``, the conv/linear it folds into (its only producer with no
            other consumer), else ``None``.
        padding: ``(ph, pw)`` of conv/pooling.
        module_type: class name of the module or the function name.
        scalar: the number a one-tensor add, subtract, multiply or divide applies (``x * 0.0``,
            ``0 + x``; ``None`` otherwise): what lets :mod:`hw_models.graph` see a multiply by
            zero or an identity.
    """

    name: str
    kind: str
    in_channels: int
    out_channels: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    groups: int = 1
    in_hw: tuple[int, int] = (1, 1)
    out_hw: tuple[int, int] = (1, 1)
    macs: int = 0
    params: int = 0
    bias: bool = False
    inputs: tuple[str, ...] = ()
    out_segments: tuple[Segment, ...] = ()
    in_segments: tuple[Segment, ...] = ()
    bn_folded_into: str | None = None
    padding: tuple[int, int] = (0, 0)
    module_type: str = ""
    scalar: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"`kind in {KINDS}` must hold, but got kind={self.kind!r}")
        for f in ("kernel", "stride", "in_hw", "out_hw", "padding", "inputs"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
        object.__setattr__(self, "out_segments", tuple(tuple(s) for s in self.out_segments))
        object.__setattr__(self, "in_segments", tuple(tuple(s) for s in self.in_segments))

    @property
    def is_compressible(self) -> bool:
        return self.kind in COMPRESSIBLE

    @property
    def makes_zero(self) -> bool:
        """A multiply by zero (``x * 0``, ``zeros_like(x)``): a zero tensor whatever ``x`` holds."""
        return self.module_type == "zeros_like" or (self.module_type in _MUL_FNS - _DIV_FNS and self.scalar == 0)

    @property
    def is_identity(self) -> bool:
        """``x + 0``, ``x - 0``, ``x * 1``, ``x / 1``: the input itself."""
        return (self.module_type in _ADD_FNS and self.scalar == 0) or (self.module_type in _MUL_FNS
                                                                         and self.scalar == 1)

    @property
    def out_elems(self) -> int:
        """Output elements (unpruned)."""
        return self.out_channels * self.out_hw[0] * self.out_hw[1]

    @property
    def in_elems(self) -> int:
        return self.in_channels * self.in_hw[0] * self.in_hw[1]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for f in ("kernel", "stride", "in_hw", "out_hw", "padding", "inputs"):
            d[f] = list(d[f])
        d["out_segments"] = [list(s) for s in self.out_segments]
        d["in_segments"] = [list(s) for s in self.in_segments]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerSpec":
        return cls(**{**d, "out_segments": tuple(tuple(s) for s in d.get("out_segments", ())),
                      "in_segments": tuple(tuple(s) for s in d.get("in_segments", ()))})


@dataclass(frozen=True, eq=False)
class LayerTable:
    """The traced graph of a model: :class:`LayerSpec` rows in execution order.

    Attributes:
        layers: the rows.
        input_shape: ``(C, H, W)`` of one input.
        outputs: names of the producers of the model's outputs.
        group_members: channel-group id -> conv/linear FQNs whose outputs it holds.
        group_sizes: channel-group id -> channels.
        method: ``"fx"`` or ``"hooks"`` (how the table was traced).
    """

    layers: tuple[LayerSpec, ...]
    input_shape: tuple[int, ...]
    outputs: tuple[str, ...] = ()
    group_members: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    group_sizes: Mapping[str, int] = field(default_factory=dict)
    method: str = "fx"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        object.__setattr__(self, "_index", {l.name: i for i, l in enumerate(self.layers)})

    def __iter__(self) -> Iterator[LayerSpec]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, key: int | str) -> LayerSpec:
        if isinstance(key, str):
            try:
                return self.layers[self._index[key]]  # type: ignore[attr-defined]
            except KeyError:
                raise UnknownNameError(did_you_mean(key, list(self._index), "layer")) from None  # type: ignore[attr-defined]
        return self.layers[key]

    def __contains__(self, name: object) -> bool:
        return name in self._index  # type: ignore[attr-defined]

    @property
    def macs(self) -> int:
        return sum(l.macs for l in self.layers)

    @property
    def params(self) -> int:
        return sum(l.params for l in self.layers)

    def compressible(self) -> list[str]:
        """FQNs of conv/linear layers (what a policy addresses), in execution order."""
        return [l.name for l in self.layers if l.is_compressible]

    def channel_groups(self):
        """A :class:`compressors.pruning.ChannelGroups` view (for ``kept`` channel counts)."""
        return ChannelGroups(out_segments={l.name: [tuple(s) for s in l.out_segments] for l in self.layers},
                             in_segments={l.name: [tuple(s) for s in l.in_segments] for l in self.layers},
                             members={g: list(m) for g, m in self.group_members.items()},
                             sizes=dict(self.group_sizes))

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "squeezer.layertable/1", "input_shape": list(self.input_shape),
                "outputs": list(self.outputs), "method": self.method,
                "group_members": {g: list(m) for g, m in self.group_members.items()},
                "group_sizes": dict(self.group_sizes), "layers": [l.to_dict() for l in self.layers]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LayerTable":
        return cls(layers=tuple(LayerSpec.from_dict(x) for x in d["layers"]), input_shape=tuple(d["input_shape"]),
                   outputs=tuple(d.get("outputs", ())), method=d.get("method", "fx"),
                   group_members={g: tuple(m) for g, m in d.get("group_members", {}).items()},
                   group_sizes=dict(d.get("group_sizes", {})))


# --- classification of ops -----------------------------------------------------------------

_MODULE_KINDS = [
    ((nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), "bn"),
    ((nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
      nn.Sigmoid, nn.Tanh, nn.Softmax, nn.Mish, nn.Hardtanh, nn.SELU, nn.CELU, nn.Softplus,
      nn.LocalResponseNorm, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d), "act"),
    ((nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d), "pool"),
    ((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d), "gap"),
    ((nn.Flatten, nn.Unflatten), "flatten"),
]


def _alias_module(m: Any) -> bool:
    return isinstance(m, (nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout))


_ADD_FNS = {"add", "add_", "iadd", "sub", "sub_", "isub"}
_MUL_FNS = {"mul", "mul_", "imul", "truediv", "div", "div_", "itruediv"}
_DIV_FNS = {"truediv", "div", "div_", "itruediv"}
#: Functions whose result does not depend on the values of their input.
_ZERO_FNS = {"zeros_like"}
_CAT_FNS = {"cat", "concat", "concatenate", "stack"}
_VIEW_FNS = {"flatten", "view", "reshape", "permute", "transpose", "contiguous", "squeeze", "unsqueeze",
             "view_as", "reshape_as", "expand", "expand_as", "t"}
_ACT_FNS = {"relu", "relu_", "relu6", "hardtanh", "hardtanh_", "silu", "hardswish", "hardsigmoid", "sigmoid",
            "sigmoid_", "tanh", "gelu", "softmax", "log_softmax", "leaky_relu", "elu", "mish", "clamp", "clamp_",
            "clip", "neg", "exp", "layer_norm", "batch_norm", "dropout", "normalize"}
_POOL_FNS = {"max_pool2d", "avg_pool2d", "max_pool1d", "avg_pool1d"}
_GAP_FNS = {"adaptive_avg_pool2d", "adaptive_max_pool2d", "adaptive_avg_pool1d", "mean", "amax", "sum"}
_ALIAS_FNS = {"dropout", "identity", "clone", "detach", "float", "to"}
#: Functions the table prices from shapes (every other function: multiply-accumulates as counted).
_KNOWN_FNS = (_ADD_FNS | _MUL_FNS | _CAT_FNS | _VIEW_FNS | _ACT_FNS | _POOL_FNS | _GAP_FNS | _ALIAS_FNS
              | _ZERO_FNS | {"getitem"})
#: Modules the table prices from shapes.
_PRICED_MODULES = (nn.modules.conv._ConvNd, nn.Linear, *(types for types, _ in _MODULE_KINDS))


def _fn_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    if target in (operator.add, operator.iadd):
        return "add"
    if target in (operator.mul, operator.imul):
        return "mul"
    if target in (operator.truediv, operator.itruediv):
        return "truediv"
    if target in (operator.sub, operator.isub):
        return "sub"
    if target is operator.getitem:
        return "getitem"
    return getattr(target, "__name__", str(target))


def _shape_info(shape: Sequence[int]) -> tuple[int, tuple[int, int]]:
    """(channels, spatial) of a batch-1 shape: [N,C,H,W] -> C,(H,W); [N,F] -> F,(1,1); [N,C,L] -> C,(L,1)."""
    s = list(shape)[1:]
    if not s:
        return 1, (1, 1)
    if len(s) == 1:
        return int(s[0]), (1, 1)
    if len(s) == 2:
        return int(s[0]), (int(s[1]), 1)
    c = int(s[0])
    h = int(s[1])
    w = 1
    for d in s[2:]:
        w *= int(d)
    return c, (h, w)


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1]))
    return (int(v), int(v))


def _module_params(m: Any) -> int:
    """Parameter elements of a module (the float original of a parametrized weight, not its quantizer)."""
    n = 0
    plist = getattr(getattr(m, "parametrizations", None), "weight", None)
    for pname, p in m.named_parameters(recurse=True):
        if pname.startswith("parametrizations.weight.") and not pname.endswith(".original"):
            continue  # quantizer internals (LSQ step), not model parameters
        if pname.startswith("act_quant."):
            continue
        n += p.numel()
    if plist is not None and n == 0:
        n = plist.original.numel()
    return n


# --- the tracer ------------------------------------------------------------------------------

def trace(model: Any, input_shape: Sequence[int] = (3, 224, 224), *,
          groups: ChannelGroups | bool = True) -> LayerTable:
    """Trace ``model`` into a :class:`LayerTable` (batch 1, ``input_shape = (C, H, W)``).

    Args:
        model: an ``nn.Module`` (not modified; run in eval mode on a zero input).
        input_shape: one input's shape, without the batch dimension.
        groups: the channel groups through which a pruning policy changes the estimated
            shapes. ``True`` finds them (:func:`compressors.pruning.channel_groups`, bounded in
            time and memory; a model it cannot group is traced without them, with one warning);
            ``False`` skips them (pricing without pruning needs none: prune ratios then change
            nothing); or precomputed :class:`compressors.pruning.ChannelGroups`.

    Returns:
        The layer table, in execution order.

    Example:
        >>> from squeezer.evaluators.models import build_model
        >>> len(trace(build_model("lenet5", in_channels=1, num_classes=10), (1, 28, 28))) > 5
        True
    """
    input_shape = tuple(int(x) for x in input_shape)
    if len(input_shape) < 1 or any(x <= 0 for x in input_shape):
        raise ValueError(f"`input_shape` of positive (C, H, W) must hold, but got input_shape={input_shape}")
    model = tensor_graph(model)  # a detector: its backbone and head (no resizing, anchors or box decoding)
    if groups is True:
        groups = _groups_or_none(model, input_shape)
    elif groups is False:
        groups = None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                rows, outputs = _trace_fx(model, input_shape)
                method = "fx"
            except Exception as e:  # noqa: BLE001 - any FX failure: fall back to hooks
                warnings.warn(f"torch.fx could not trace {type(model).__name__} ({_first_line(e)}); "
                              "tracing with module hooks (functional adds/concats are not seen)", stacklevel=2)
                rows, outputs = _trace_hooks(model, input_shape)
                method = "hooks"
    finally:
        model.train(was_training)
    rows = _attach_segments(rows, groups, input_shape)
    members = {g: tuple(m) for g, m in (groups.members.items() if groups is not None else ())}
    sizes = dict(groups.sizes) if groups is not None else {}
    return LayerTable(layers=tuple(rows), input_shape=input_shape, outputs=tuple(outputs),
                      group_members=members, group_sizes=sizes, method=method)


def _groups_or_none(model: Any, input_shape: tuple[int, ...]) -> ChannelGroups | None:
    """The model's channel groups, or ``None`` and one warning line, whatever the failure."""
    try:
        with warnings.catch_warnings():
            # Torch-Pruning's own notes (unwrapped parameters, recursion depth) are noise to a
            # price: the one line below says what matters
            warnings.simplefilter("ignore")
            return channel_groups(model, input_shape)
    except Exception as e:  # noqa: BLE001 - out of memory or a Torch-Pruning error: the model is still priced
        warnings.warn(f"no channel groups for {type(model).__name__} ({_first_line(e)}); priced unpruned: "
                      "prune ratios do not change its estimate", stacklevel=3)
        return None


def _first_line(e: BaseException, limit: int = 160) -> str:
    """``"Type: first line of the message"`` (a MemoryError's message is empty)."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:limit]


class _Row(dict):
    """Mutable row while tracing (becomes a LayerSpec)."""


def _make_tracer():
    leaf_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.MultiheadAttention)

    class _Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            if isinstance(m, leaf_types):  # incl. parametrized (quantized / masked) layers
                return True
            return super().is_leaf_module(m, qualname)

    return _Tracer()


def _meta(value: Any) -> Any:
    """``value`` with every tensor (also inside a tuple or list) replaced by a meta tensor: its
    shape and dtype without storage."""
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value):
        return tuple(_meta(v) for v in value)
    return value


def _propagate_shapes(gm: fx.GraphModule, model: Any, input_shape: tuple[int, ...],
                      count: Callable[[fx.Node], bool]) -> tuple[dict[str, Any], dict[str, int]]:
    """Every node's value on a zero input, as meta tensors, and the multiply-accumulates torch
    counts (``torch.utils.flop_counter``) in the nodes ``count`` selects.

    Meta tensors because the table needs only shapes: keeping every activation alive to the end
    cost 372 MB above the model for efficientnet_v2_s at 384 px (66 MB with meta tensors: one
    forward's working set).
    """
    shapes: dict[str, Any] = {}
    macs: dict[str, int] = {}

    class _Prop(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            if not count(n):
                r = super().run_node(n)
            else:
                with FlopCounterMode(display=False) as flops:
                    r = super().run_node(n)
                macs[n.name] = flops.get_total_flops() // 2
            shapes[n.name] = _meta(r)
            return r

    p = next(model.parameters(), None)
    x = torch.zeros(1, *input_shape, device=p.device if p is not None else "cpu",
                    dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32)
    _Prop(gm).run(x)
    return shapes, macs


def _trace_fx(model: Any, input_shape: tuple[int, ...]) -> tuple[list[_Row], list[str]]:
    return _FxRows(model, input_shape).rows()


def _arg_nodes(args: Any) -> list[fx.Node]:
    """Every node in (nested) ``args``, in order."""
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return found


def _first_tensor(value: Any) -> torch.Tensor | None:
    """``value`` if a tensor, else the first tensor of a tuple (the parts of a chunk or split, a
    module's (output, weights)), else ``None``."""
    if isinstance(value, tuple):
        value = next((v for v in value if isinstance(v, torch.Tensor)), None)
    return value if isinstance(value, torch.Tensor) else None


class _FxRows:
    """The rows of a model's FX graph: module calls and functional ops, in execution order."""

    def __init__(self, model: Any, input_shape: tuple[int, ...]) -> None:
        tracer = _make_tracer()
        self.graph = tracer.trace(model)
        self.mods = dict(model.named_modules())
        self.shapes, self.macs = _propagate_shapes(fx.GraphModule(tracer.root, self.graph), model, input_shape,
                                                   self.counted)
        self.input_shape = input_shape
        self.params = _ParamLedger(model, self.graph, self.mods)
        self.producer: dict[str, str] = {}      # fx node name -> producing row name (aliases resolved)
        self.used_names: dict[str, int] = {}

    def rows(self) -> tuple[list[_Row], list[str]]:
        rows: list[_Row] = []
        outputs: list[str] = []
        for n in self.graph.nodes:
            held = self.params.take(n)
            if n.op == "output":
                outputs += [self.producer[a.name] for a in _arg_nodes(n.args) if a.name in self.producer]
                continue
            row = self.row(n)
            if row is None:
                self.params.pass_on(n, held)
                continue
            row["params"] = row.get("params", 0) + held
            rows.append(row)
            self.producer[n.name] = row["name"]
        _mark_bn_folding(rows)
        return rows, outputs

    def row(self, n: fx.Node) -> _Row | None:
        """``n``'s row, or ``None`` for a node that makes none (its producer recorded if it passes one on)."""
        if n.op == "placeholder":
            self.producer[n.name] = "input"
            return None
        if n.op == "get_attr":
            self.params.read(n)
            return None
        out = self.shapes.get(n.name)
        if not isinstance(out, torch.Tensor):
            if n.op != "call_module" or _first_tensor(out) is None:
                self.alias(n, self.tensor_inputs(n))  # sizes, the parts of a split: getitem reads them
                return None
            out = _first_tensor(out)  # a module returning a tuple (MultiheadAttention): its output
        ins = [i for i in self.tensor_inputs(n) if i.name in self.producer]
        row = self.base_row(ins, out)
        if n.op == "call_module":
            m = self.mods[n.target]
            if _alias_module(m):
                self.alias(n, ins)
                return None
            row.update(_module_row(m, out, row["in_shapes"]))
            if row["kind"] == "other" and not row.get("macs"):
                row["macs"] = self.macs.get(n.name, 0)
            row["name"] = self.unique(str(n.target))
            return row
        fn = _fn_name(n.target)
        if fn in _ALIAS_FNS or fn == "getitem":
            self.alias(n, ins)
            if fn != "getitem" or not ins:
                return None
            row.update(kind="flatten", module_type=fn)  # a slice of a tuple (chunk/split) or of a tensor: a view
        else:
            row.update(_function_row(fn, n, len(ins), out))
            if row["kind"] == "other":
                row["macs"] = self.macs.get(n.name, 0) or _sdpa_macs(fn, n, self.shapes)
        row["name"] = self.unique(n.name)
        return row

    def counted(self, n: fx.Node) -> bool:
        """Whether torch counts ``n``'s multiply-accumulates: a row of kind "other" with no formula."""
        if n.op == "call_module":
            m = self.mods[n.target]
            # not MultiheadAttention either: under the counter its kernel leaves ~24 MB of heap
            # behind per call (vit_h_14 at 518 px peaked 1.75 GB higher)
            return not isinstance(m, (*_PRICED_MODULES, nn.MultiheadAttention)) and not _alias_module(m)
        return n.op in ("call_function", "call_method") and _fn_name(n.target) not in _KNOWN_FNS

    def shape_of(self, a: fx.Node) -> tuple[int, ...] | None:
        t = _first_tensor(self.shapes.get(a.name))  # a split's parts: the shape its getitem reads
        return tuple(t.shape) if t is not None else None

    def tensor_inputs(self, n: fx.Node) -> list[fx.Node]:
        return list(dict.fromkeys(a for a in _arg_nodes((n.args, n.kwargs)) if self.shape_of(a) is not None))

    def base_row(self, ins: list[fx.Node], out: torch.Tensor) -> _Row:
        in_shapes = [self.shape_of(i) for i in ins]
        c_in, hw_in = _shape_info(in_shapes[0] if ins else (1, *self.input_shape))
        c_out, hw_out = _shape_info(tuple(out.shape))
        return _Row(in_channels=c_in, out_channels=c_out, in_hw=hw_in, out_hw=hw_out,
                    inputs=tuple(dict.fromkeys(self.producer[i.name] for i in ins)), in_shapes=in_shapes,
                    out_shape=tuple(out.shape))

    def alias(self, n: fx.Node, ins: list[fx.Node]) -> None:
        """``n`` passes its first input's tensor on (no row of its own)."""
        if ins and ins[0].name in self.producer:
            self.producer[n.name] = self.producer[ins[0].name]

    def unique(self, name: str) -> str:
        k = self.used_names.get(name, 0)
        self.used_names[name] = k + 1
        return name if k == 0 else f"{name}:{k}"


class _ParamLedger:
    """Parameters that ops read through ``get_attr`` (layer scales, position embeddings, the
    weights of a functional linear in attention) rather than by calling their module: each is
    counted once, in the first row that reads it (directly or through ops that make no row)."""

    def __init__(self, model: Any, graph: fx.Graph, mods: Mapping[str, Any]) -> None:
        called = {id(p) for n in graph.nodes if n.op == "call_module" for p in mods[n.target].parameters()}
        self.params = {k: p for k, p in model.named_parameters(remove_duplicate=False) if id(p) not in called}
        self.seen: set[int] = set()
        self.pending: dict[str, int] = {}   # node -> parameter elements it holds that no row has yet

    def read(self, n: fx.Node) -> None:
        p = self.params.get(str(n.target))
        if p is not None and id(p) not in self.seen:
            self.seen.add(id(p))
            self.pending[n.name] = p.numel()

    def take(self, n: fx.Node) -> int:
        """The pending parameter elements among ``n``'s arguments."""
        return sum(self.pending.pop(a.name, 0) for a in _arg_nodes((n.args, n.kwargs)))

    def pass_on(self, n: fx.Node, held: int) -> None:
        if held:
            self.pending[n.name] = held


def _function_row(fn: str, n: fx.Node, n_inputs: int, out: torch.Tensor) -> dict[str, Any]:
    """Kind (and pooling window) of a functional op."""
    if fn in _ADD_FNS | _MUL_FNS:
        if n_inputs >= 2:
            return {"kind": "add" if fn in _ADD_FNS else "mul", "module_type": fn}
        return {"kind": "act", "module_type": fn, "scalar": _scalar_operand(fn, n)}
    if fn in _ZERO_FNS:
        return {"kind": "act", "module_type": fn}
    if fn in _CAT_FNS:
        return {"kind": "concat", "module_type": fn}
    if fn in _VIEW_FNS:
        return {"kind": "flatten", "module_type": fn}
    if fn in _POOL_FNS:
        ks = n.kwargs.get("kernel_size", n.args[1] if len(n.args) > 1 else 1)
        st = n.kwargs.get("stride", n.args[2] if len(n.args) > 2 else None) or ks
        return {"kind": "pool", "module_type": fn, "kernel": _pair(ks), "stride": _pair(st)}
    if fn in _GAP_FNS:
        _, hw_out = _shape_info(tuple(out.shape))
        return {"kind": "gap" if hw_out == (1, 1) or out.dim() <= 2 else "pool", "module_type": fn}
    if fn in _ACT_FNS:
        return {"kind": "act", "module_type": fn}
    # a functional linear, matmul or attention: its weights are not compressible by a policy
    return {"kind": "other", "module_type": fn}


def _scalar_operand(fn: str, n: fx.Node) -> float | None:
    """The number of ``x op c`` (or ``c + x``, ``c * x``; ``c - x`` and ``c / x`` are no identity)."""
    for k, a in enumerate(n.args):
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            first = k == 0 and len(n.args) > 1
            return None if first and fn in ({"sub", "sub_", "isub"} | _DIV_FNS) else float(a)
    return None


def _sdpa_macs(fn: str, n: fx.Node, shapes: Mapping[str, Any]) -> int:
    """Scaled dot-product attention's two products: torch's flop counter does not see its CPU kernel."""
    if fn != "scaled_dot_product_attention" or len(n.args) < 3:
        return 0
    q, k, v = (shapes.get(a.name) if isinstance(a, fx.Node) else None for a in n.args[:3])
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return 0
    return math.prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1])


def _module_row(m: Any, out: Any, in_shapes: Sequence[tuple[int, ...]] = ()) -> dict[str, Any]:
    r: dict[str, Any] = {"module_type": type(m).__name__.replace("Parametrized", ""), "params": _module_params(m)}
    if isinstance(m, nn.modules.conv._ConvNd):
        w_shape = tuple(m.weight.shape)
        k = w_shape[2:] if len(w_shape) > 2 else (1,)
        kh, kw = int(k[0]), int(k[-1]) if len(k) > 1 else 1
        per_out = 1
        for d in w_shape[1:]:
            per_out *= int(d)
        out_spatial = out.numel() // out.shape[1]
        dw = m.groups > 1 and m.groups == m.in_channels
        r.update(kind="dwconv2d" if dw else "conv2d", kernel=(kh, kw), stride=_pair(m.stride), groups=int(m.groups),
                 padding=_pair(m.padding) if not isinstance(m.padding, str) else (kh // 2, kw // 2),
                 macs=int(out.shape[1]) * out_spatial * per_out, bias=m.bias is not None)
        return r
    if isinstance(m, nn.MultiheadAttention):
        return {**r, "kind": "other", "macs": _attention_macs(m, in_shapes, out)}
    if isinstance(m, nn.Linear):
        tokens = out.numel() // m.out_features
        r.update(kind="linear", macs=tokens * m.in_features * m.out_features, bias=m.bias is not None,
                 in_channels=m.in_features, out_channels=m.out_features, in_hw=(tokens, 1), out_hw=(tokens, 1))
        return r
    for types, kind in _MODULE_KINDS:
        if isinstance(m, types):
            r["kind"] = kind
            break
    else:
        r["kind"] = "other"
    if r["kind"] == "pool":
        r.update(kernel=_pair(m.kernel_size), stride=_pair(m.stride or m.kernel_size), padding=_pair(m.padding))
    if r["kind"] == "gap" and out.dim() > 2 and tuple(out.shape[2:]) != (1,) * (out.dim() - 2):
        r["kind"] = "pool"
    return r


def _attention_macs(m: nn.MultiheadAttention, in_shapes: Sequence[tuple[int, ...]], out: torch.Tensor) -> int:
    """One MultiheadAttention call: the q, k, v and output projections and the two products
    (scores, weighted sum) over all heads."""
    e = m.embed_dim
    lq = out.numel() // e
    key = in_shapes[1] if len(in_shapes) > 1 else in_shapes[0] if in_shapes else tuple(out.shape)
    lk = math.prod(key) // m.kdim
    return 2 * lq * e * e + lk * (m.kdim + m.vdim) * e + 2 * lq * lk * e


def _mark_bn_folding(rows: list[_Row]) -> None:
    """A BN folds into its producer when that is a conv/linear whose only consumer is the BN."""
    consumers: dict[str, int] = {}
    for r in rows:
        for i in r["inputs"]:
            consumers[i] = consumers.get(i, 0) + 1
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        if r["kind"] != "bn" or len(r["inputs"]) != 1:
            continue
        p = by_name.get(r["inputs"][0])
        if p is not None and p["kind"] in COMPRESSIBLE and consumers.get(p["name"], 0) == 1 \
                and p["out_channels"] == r["out_channels"]:
            r["bn_folded_into"] = p["name"]


def _trace_hooks(model: Any, input_shape: tuple[int, ...]) -> tuple[list[_Row], list[str]]:
    """Fallback: record leaf modules in call order; producers matched by tensor identity."""
    rows: list[_Row] = []
    made_by: dict[int, str] = {}
    used: dict[str, int] = {}
    leaf_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    handles = []

    def hook(name: str):
        def fn(m: nn.Module, args: tuple, out: Any) -> None:
            if not isinstance(out, torch.Tensor) or _alias_module(m):
                return
            x = next((a for a in args if isinstance(a, torch.Tensor)), None)
            in_shape = tuple(x.shape) if x is not None else (1, *input_shape)
            c_in, hw_in = _shape_info(in_shape)
            c_out, hw_out = _shape_info(tuple(out.shape))
            prod = made_by.get(id(x)) if x is not None else None
            if prod is None:
                prod = rows[-1]["name"] if rows else "input"
            k = used.get(name, 0)
            used[name] = k + 1
            row = _Row(in_channels=c_in, out_channels=c_out, in_hw=hw_in, out_hw=hw_out, inputs=(prod,),
                       in_shapes=[in_shape], out_shape=tuple(out.shape))
            row.update(_module_row(m, out))
            row["name"] = name if k == 0 else f"{name}:{k}"
            rows.append(row)
            made_by[id(out)] = row["name"]
        return fn

    for name, m in model.named_modules():
        is_leaf = isinstance(m, leaf_types) or (len(list(m.children())) == 0 and name)
        if is_leaf:
            handles.append(m.register_forward_hook(hook(name)))
    p = next(model.parameters(), None)
    x = torch.zeros(1, *input_shape, device=p.device if p is not None else "cpu")
    made_by[id(x)] = "input"
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    outs = [made_by.get(id(out), rows[-1]["name"] if rows else "input")] if isinstance(out, torch.Tensor) else \
        [rows[-1]["name"]] if rows else []
    _mark_bn_folding(rows)
    return rows, outs


def _attach_segments(rows: list[_Row], groups: Any, input_shape: tuple[int, ...]) -> list[LayerSpec]:
    """Segments: conv/linear from the channel groups; other ops propagate their inputs'."""
    c0, _ = _shape_info((1, *input_shape))
    segs: dict[str, tuple] = {"input": ((None, c0, c0),)}
    out_rows: list[LayerSpec] = []

    def full(c: int) -> tuple:
        return ((None, c, c),)

    def total(s: tuple) -> int:
        return sum(x[1] for x in s)

    for r in rows:
        name, kind = r["name"], r["kind"]
        ins = r["inputs"]
        first = segs.get(ins[0], full(r["in_channels"])) if ins else full(r["in_channels"])
        base = name.split(":")[0]
        in_seg: tuple = ()
        if kind in COMPRESSIBLE:
            if groups is not None and base in groups.out_segments:
                out_seg = tuple(tuple(s) for s in groups.out_segments[base])
                in_seg = tuple(tuple(s) for s in groups.in_segments[base])
            else:
                out_seg, in_seg = full(r["out_channels"]), full(r["in_channels"])
        elif kind == "concat":
            parts = [segs.get(i, ()) for i in ins]
            cat = tuple(s for p in parts for s in p)
            out_seg = cat if total(cat) == r["out_channels"] else full(r["out_channels"])
        elif kind == "flatten":
            hw = r["in_hw"][0] * r["in_hw"][1]
            if total(first) == r["out_channels"]:
                out_seg = first
            elif total(first) * hw == r["out_channels"]:
                # a flattened group keeps n*hw features per kept channel: kept = n*hw*k/size
                out_seg = tuple((g, n * hw, size) if g is not None else (None, n * hw, n * hw)
                                for g, n, size in first)
            else:
                out_seg = full(r["out_channels"])
        else:
            out_seg = first if total(first) == r["out_channels"] else full(r["out_channels"])
        if not in_seg:
            in_seg = first if total(first) == r["in_channels"] else full(r["in_channels"])
        segs[name] = out_seg
        out_rows.append(LayerSpec(
            name=name, kind=kind, in_channels=int(r["in_channels"]), out_channels=int(r["out_channels"]),
            kernel=r.get("kernel", (1, 1)), stride=r.get("stride", (1, 1)), groups=int(r.get("groups", 1)),
            in_hw=r["in_hw"], out_hw=r["out_hw"], macs=int(r.get("macs", 0)), params=int(r.get("params", 0)),
            bias=bool(r.get("bias", False)), inputs=tuple(ins), out_segments=out_seg, in_segments=in_seg,
            bn_folded_into=r.get("bn_folded_into"), padding=r.get("padding", (0, 0)),
            module_type=r.get("module_type", ""), scalar=r.get("scalar")))
    return out_rows
