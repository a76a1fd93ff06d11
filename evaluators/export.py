"""Export a compressed model to deployable artifacts, and prove each one right after writing.

Formats (registry :data:`evaluators.formats.EXPORT_FORMATS`; this module holds what they share:
the deploy model, the ONNX writer, the runtime runners and the verification):

- ``policy``: the ``squeezer.policy/1`` file (JSON, or YAML by extension), replayable with
  ``squeezer apply``.
- ``onnx``: the pruned, decomposed model with real integer weights. BatchNorm is folded into
  the preceding conv; input normalisation is folded into the graph (``1/std`` into the first
  conv, ``- mean`` as one ``Sub``), so the input is the image scaled to ``[0, 1]``. Quantized
  weights are int8 (or opset-21 INT4 for ``<= 4``-bit policies) initializers with per-channel
  scales feeding ``DequantizeLinear``; activations with ``act_bits`` get ``QuantizeLinear`` /
  ``DequantizeLinear`` (with a ``Clip`` first below 8 bits). Sparse layers store their zeros.
  ``metadata_props`` record the policy JSON, target and accuracy. Each layer gets the form that
  runs fastest in ONNX Runtime and computes the same numbers: a weight whose
  ``DequantizeLinear`` ORT fuses into an int8 kernel (``QLinearConv``: int8 weights, a
  quantized input and a quantized consumer) stays QDQ; any other integer weight is written as
  ``Cast -> Mul(scale)``, which ORT constant-folds to fp32 once at load instead of
  dequantizing at every inference (bit-identical values; see :func:`fold_unfused_weight_dq_`).
  ``squeezer.onnx_weights`` in the metadata counts both kinds.
- ``torchscript``: ``torch.jit.trace`` of the same float-baked deploy model (weights are the
  dequantized values, activation fake-quant is kept), input in ``[0, 1]``.
- ``state_dict``: the ``squeezer.model/1`` checkpoint (state dict + policy), loadable with
  ``torch.load(..., weights_only=True)`` and :func:`evaluators.checkpoint.load_checkpoint`.
- ``pte``: ExecuTorch program via XNNPACK with PT2E int8 quantization
  (:mod:`evaluators.export_pte`, optional extra ``squeezer[executorch]``).

Every artifact is verified by its own runtime on the test set when ``data`` is given: its
accuracy must be within :data:`ACCURACY_TOLERANCE` of the PyTorch compressed model (and of the
accuracy the search reported, when given), else :class:`VerificationError`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnxruntime as ort
import torch
import torch.fx
from torch import nn
from torch.nn.utils import parametrize

from ..compressors import packing
from ..compressors.policy import Policy
from ..compressors.quantize import QuantizedTensor, weight_quantizer
from .splits import inference_batch

#: Allowed difference between an artifact's test accuracy and the reference, in [0, 1] (0.5 pp).
ACCURACY_TOLERANCE = 0.005
#: Allowed relative difference between an int8 ONNX file and the size model's bytes.
SIZE_TOLERANCE = 0.15
#: Fixed allowance for the ONNX graph itself (nodes, names, metadata: ~2-3 kB for LeNet-5),
#: which dominates the 15% rule only for models of a few tens of kB.
SIZE_SLACK_BYTES = 4096
ONNX_OPSET = 21  # first opset with INT4/UINT4 QuantizeLinear/DequantizeLinear


class ExportError(ValueError):
    """An export cannot be done as asked (unsupported format, layer or missing extra)."""


class VerificationError(ExportError):
    """An artifact, run by its own runtime, disagrees with the compressed model beyond tolerance."""


class MissingExtraError(ExportError):
    """An optional dependency is not installed; the message names the extra."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_model` wrote and what the verification measured.

    Attributes:
        path: the artifact written.
        format: export format name.
        file_bytes: size of the artifact on disk.
        runtime_test_accuracy: top-1 test accuracy of the artifact run by its own runtime (``None``: no data).
        torch_test_accuracy: top-1 test accuracy of the PyTorch compressed model on the same inputs.
        reported_test_accuracy: the test accuracy the search reported (``best/metrics.json``), if
            given and its metric is top-1 accuracy.
        expected_bytes: the size model's bytes for this model, if available.
        expected_source: what ``expected_bytes`` came from.
        max_logit_diff: largest |artifact - PyTorch| logit difference on the test inputs.
        notes: choices the exporter made that a user should know (e.g. int4 stored as int8).
        extra_paths: further files written (e.g. the policy next to a state dict).
    """

    path: Path
    format: str
    file_bytes: int
    runtime_test_accuracy: float | None = None
    torch_test_accuracy: float | None = None
    reported_test_accuracy: float | None = None
    expected_bytes: int | None = None
    expected_source: str | None = None
    max_logit_diff: float | None = None
    notes: tuple[str, ...] = ()
    extra_paths: tuple[Path, ...] = ()

    @property
    def size_ratio(self) -> float | None:
        """``file_bytes / expected_bytes`` (``None`` when no size model is available)."""
        return None if not self.expected_bytes else self.file_bytes / self.expected_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": self.format, "file_bytes": self.file_bytes,
                "runtime_test_accuracy": self.runtime_test_accuracy, "torch_test_accuracy": self.torch_test_accuracy,
                "reported_test_accuracy": self.reported_test_accuracy, "expected_bytes": self.expected_bytes,
                "expected_source": self.expected_source, "size_ratio": self.size_ratio,
                "max_logit_diff": self.max_logit_diff, "notes": list(self.notes),
                "extra_paths": [str(p) for p in self.extra_paths]}


# ---------------------------------------------------------------------------------------------
# The deploy model: float module with baked weights, folded BN and normalisation
# ---------------------------------------------------------------------------------------------
class ActQDQ(nn.Module):
    """Activation fake-quant that exports as ``[Clip ->] QuantizeLinear -> DequantizeLinear``.

    Equals :class:`~compressors.quantize.ActQuantizer` in eval mode:
    ``(clamp(round(x / s) + zp, 0, 2**bits - 1) - zp) * s``. Below 8 bits the range is
    enforced by a clamp first (ONNX's uint8 QDQ saturates at 255, not ``2**bits - 1``).
    """

    def __init__(self, scale: float, zero_point: int, bits: int, code_range: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.scale, self.zero_point, self.bits = float(scale), int(zero_point), int(bits)
        self.code_range = code_range or (0, 2 ** bits - 1)
        self.lo = (self.code_range[0] - self.zero_point) * self.scale
        self.hi = (self.code_range[1] - self.zero_point) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.code_range != (0, 255):
            x = torch.clamp(x, self.lo, self.hi)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, 0, 255)


class Normalize(nn.Module):
    """``model((x - mean) * inv_std)`` for inputs in ``[0, 1]`` (``inv_std`` may be folded away)."""

    def __init__(self, model: nn.Module, mean: Sequence[float], inv_std: Sequence[float] | None) -> None:
        super().__init__()
        self.model = model
        c = len(mean)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).reshape(1, c, 1, 1))
        self.register_buffer("inv_std", None if inv_std is None else
                             torch.tensor(list(inv_std), dtype=torch.float32).reshape(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - self.mean
        if self.inv_std is not None:
            x = x * self.inv_std
        return self.model(x)


@dataclass
class DeployModel:
    """A float module equal to the compressed model, plus what its weights really store.

    ``module`` takes images in ``[0, 1]`` (``normalized_input=False``) and its conv/linear
    weights equal ``quant[fqn].dequantize()`` for quantized layers. FQNs are those of the
    compressed model prefixed with ``model.`` (the :class:`Normalize` wrapper).
    """

    module: nn.Module
    quant: dict[str, QuantizedTensor] = field(default_factory=dict)
    fp16: set[str] = field(default_factory=set)
    sparse: set[str] = field(default_factory=set)
    act: dict[str, tuple[float, int, int, tuple[int, int]]] = field(default_factory=dict)
    folded_bn: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()


def _act_code_range(aq: nn.Module, zp: int) -> tuple[int, int]:
    """Codes an activation quantizer can produce, as unsigned ``round(x / s) + zp``."""
    for attr in ("_levels", "_range"):  # HWGQ / LSQ: signed or unsigned integer ranges
        if hasattr(aq, attr):
            lo, hi = getattr(aq, attr)()
            return int(lo) + (zp if lo < 0 else 0), int(hi) + (zp if lo < 0 else 0)
    return 0, 2 ** aq.bits - 1


def _effective_input(module: nn.Module, upto: nn.Module) -> torch.Tensor:
    """The weight as the parametrization chain sees it just before ``upto`` (masks applied)."""
    plist = module.parametrizations.weight
    w = plist.original
    for p in plist:
        if p is upto:
            break
        w = p(w)
    return w


def _fx_trace(model: nn.Module):
    try:
        return torch.fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001 - dynamic control flow: no BN folding, ORT runs BN itself
        return None


@torch.no_grad()
def deploy_model(model: nn.Module, *, mean: Sequence[float] = (), std: Sequence[float] = (),
                 fold_bn: bool = True) -> DeployModel:
    """Bake a compressed model (parametrizations, act quant hooks) into a plain float module.

    Args:
        model: the compressed model (not modified; a deep copy is made).
        mean, std: the dataset normalisation; when given, the returned module takes ``[0, 1]``
            images. Empty: the module takes normalised inputs.
        fold_bn: fold ``BatchNorm2d`` that follows a conv (its only consumer) into the conv.

    Returns:
        A :class:`DeployModel`.
    """

    m = copy.deepcopy(model).eval()
    dep = DeployModel(module=m, mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))
    _bake_weights_(m, dep)
    first_conv = _fold_batchnorms_(m, dep) if fold_bn else None
    if mean:
        _absorb_normalisation_(m, dep, mean, std, first_conv)
    dep.module.eval()
    return dep


def _bake_weights_(m: nn.Module, dep: DeployModel) -> None:
    """Each parametrized conv/linear of ``m`` becomes a plain layer running its dequantized
    weights (the integers go to ``dep.quant``); activation quantizers become fixed QDQ."""
    for name, mod in list(m.named_modules()):
        if not isinstance(mod, (nn.Conv2d, nn.Linear)):
            continue
        if parametrize.is_parametrized(mod, "weight"):
            mod = _plain_layer_(m, name, mod, dep)
        aq = getattr(mod, "act_quant", None)
        if aq is not None and hasattr(aq, "qparams"):
            s, zp = aq.qparams()
            rng = _act_code_range(aq, zp)
            dep.act[name] = (s, zp, aq.bits, rng)
            mod.act_quant = ActQDQ(s, zp, aq.bits, rng)


def _plain_layer_(m: nn.Module, name: str, mod: nn.Module, dep: DeployModel) -> nn.Module:
    """Replace the parametrized layer ``name`` of ``m`` by a plain one; returns it."""
    q = weight_quantizer(mod)
    plist = mod.parametrizations.weight
    is_fp16 = any(type(p).__name__ == "_Fp16" for p in plist)
    if any(type(p).__name__ == "WeightMask" or hasattr(p, "mask") for p in plist):
        dep.sparse.add(name)
    if q is not None:
        qt = q.encode(_effective_input(mod, q))
        w = qt.dequantize().to(mod.weight.dtype)
        if not torch.allclose(w, mod.weight, rtol=1e-4, atol=1e-6 * float(qt.scale.max())):
            raise ExportError(f"layer {name}: quantizer {type(q).__name__}.encode() disagrees with its "
                              f"forward (max diff {float((w - mod.weight).abs().max()):.3g})")
        dep.quant[name] = qt
    else:
        w = mod.weight.detach().clone()
        if is_fp16:
            dep.fp16.add(name)
    # A fresh plain layer: remove_parametrizations would edit the parametrized class,
    # which deepcopy shares with the original model.
    plain = _plain_like(mod, w)
    plain._forward_pre_hooks.update(mod._forward_pre_hooks)
    if hasattr(mod, "act_quant"):
        plain.act_quant = mod.act_quant
    _set_module(m, name, plain)
    return plain


def _fold_batchnorms_(m: nn.Module, dep: DeployModel) -> str | None:
    """Fold each BatchNorm2d that is a conv's only consumer into the conv; returns the name of
    the conv that reads the input, if any (``None`` also when ``m`` is not fx-traceable)."""
    gm = _fx_trace(m)
    if gm is None:
        dep.notes.append("model is not fx-traceable: BatchNorm kept as a separate op")
        return None
    mods = dict(m.named_modules())
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(mods.get(node.target), nn.BatchNorm2d):
            continue
        src = node.args[0]
        if getattr(src, "op", None) != "call_module" or not isinstance(mods.get(src.target), nn.Conv2d) \
                or len(src.users) != 1:
            continue
        _fold_bn_(mods[src.target], mods[node.target], dep.quant.get(src.target))
        _set_module(m, node.target, nn.Identity())
        dep.folded_bn.append(node.target)
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.args and getattr(node.args[0], "op", None) == "placeholder":
            return node.target if isinstance(mods.get(node.target), nn.Conv2d) else None
    return None


def _absorb_normalisation_(m: nn.Module, dep: DeployModel, mean: Sequence[float], std: Sequence[float],
                           first_conv: str | None) -> None:
    """``dep.module`` takes ``[0, 1]`` images: 1/std goes into the first conv where that is
    exact, - mean (and 1/std otherwise) into one :class:`Normalize` in front."""
    inv_std: list[float] | None = [1.0 / float(s) for s in std]
    same = all(abs(s - std[0]) < 1e-12 for s in std)
    conv = m.get_submodule(first_conv) if first_conv else None
    # Codes stay exact only when one scalar multiplies all input channels.
    per_channel_ok = conv is not None and conv.groups == 1 and first_conv not in dep.quant \
        and first_conv not in dep.act
    if conv is not None and (same or per_channel_ok):
        if same:
            conv.weight.mul_(inv_std[0])
        else:
            conv.weight.mul_(torch.tensor(inv_std, dtype=torch.float32).reshape(1, -1, 1, 1))
        if first_conv in dep.quant:
            dep.quant[first_conv].scale.mul_(inv_std[0])
        if first_conv in dep.act:  # its input is now (x - mean), std times larger
            s, zp, b, rng = dep.act[first_conv]
            dep.act[first_conv] = (s * float(std[0]), zp, b, rng)
            conv.act_quant = ActQDQ(s * float(std[0]), zp, b, rng)
        inv_std = None
    dep.module = Normalize(m, mean, inv_std)
    dep.quant = {f"model.{k}": v for k, v in dep.quant.items()}
    dep.fp16 = {f"model.{k}" for k in dep.fp16}
    dep.sparse = {f"model.{k}" for k in dep.sparse}
    dep.act = {f"model.{k}": v for k, v in dep.act.items()}


def _plain_like(mod: nn.Module, weight: torch.Tensor) -> nn.Module:
    if isinstance(mod, nn.Conv2d):
        new: nn.Module = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding,
                                   mod.dilation, mod.groups, mod.bias is not None, mod.padding_mode)
    else:
        new = nn.Linear(mod.in_features, mod.out_features, mod.bias is not None)
    new.weight = nn.Parameter(weight.detach().clone())
    if mod.bias is not None:
        new.bias = nn.Parameter(mod.bias.detach().clone())
    return new.eval()


def _set_module(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, attr = fqn.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def _fold_bn_(conv: nn.Conv2d, bn: nn.BatchNorm2d, qt: QuantizedTensor | None) -> None:
    """conv <- bn(conv): per-output-channel factor; integer codes unchanged, scales absorb it."""
    f = (bn.weight if bn.affine else torch.ones_like(bn.running_var)) / torch.sqrt(bn.running_var + bn.eps)
    beta = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
    b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    new_b = (b - bn.running_mean) * f + beta
    if qt is not None and qt.codebook is not None:
        qt.scale = (qt.scale * f).float()  # values = scale * codebook[codes]: a Mul, any sign works
        conv.weight.data = qt.dequantize().to(conv.weight.dtype)
    elif qt is not None:
        neg = f < 0
        if bool(neg.any()):
            # Scales stay positive: flip the codes of channels with a negative BN gamma.
            lo, hi = (-(2 ** (qt.bits - 1)), 2 ** (qt.bits - 1) - 1) if qt.signed else (0, 2 ** qt.bits - 1)
            if not qt.signed:
                raise ExportError("cannot fold a negative BatchNorm scale into unsigned integer weights")
            codes = qt.codes.clone()
            codes[neg] = torch.clamp(-codes[neg].to(torch.int32), lo, hi).to(codes.dtype)
            qt.codes = codes
        qt.scale = (qt.scale * f.abs()).float()
        conv.weight.data = qt.dequantize().to(conv.weight.dtype)
    else:
        conv.weight.data = conv.weight * f.reshape(-1, 1, 1, 1)
    conv.bias = nn.Parameter(new_b.detach().clone())


# ---------------------------------------------------------------------------------------------
# ONNX
# ---------------------------------------------------------------------------------------------
def _pack_int4(codes: np.ndarray, signed: bool) -> bytes:
    flat = codes.astype(np.int16).reshape(-1) & 0xF
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int16)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()


def _int4_supported() -> bool:
    """Does this ONNX Runtime run per-channel INT4 DequantizeLinear (opset 21)?"""
    try:
        from onnx import TensorProto, helper

        w = helper.make_tensor("q", TensorProto.INT4, [2, 2], _pack_int4(np.array([[-8, 7], [1, -1]]), True), raw=True)
        s = helper.make_tensor("s", TensorProto.FLOAT, [2], [0.5, 2.0])
        g = helper.make_graph([helper.make_node("DequantizeLinear", ["q", "s"], ["y"], axis=0)], "t", [],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])], [w, s])
        mdl = helper.make_model(g, opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
        y = ort.InferenceSession(mdl.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
        return bool(np.allclose(y, [[-4.0, 3.5], [2.0, -2.0]]))
    except Exception:  # noqa: BLE001 - any failure means: store int8
        return False


def _quant_initializers(name: str, qt: QuantizedTensor, *, transpose: bool, int4: bool):
    """(initializers, DequantizeLinear node) producing float ``name`` from stored integers."""
    from onnx import TensorProto, helper, numpy_helper

    codes = qt.codes.cpu().numpy()
    scale = qt.scale.detach().cpu().float().numpy()
    axis = 0
    if transpose:
        codes, axis = codes.T.copy(), 1
    inits = []
    if qt.codebook is not None:
        # Shared weights: values = scale[c] * codebook[codes]; stored as small indices + codebook.
        cb = numpy_helper.from_array(qt.codebook.detach().cpu().float().numpy(), f"{name}cb")
        sc = numpy_helper.from_array(scale.reshape((-1,) + (1,) * (codes.ndim - 1)) if axis == 0 else
                                     scale.reshape(1, -1), f"{name}s")
        if int4 and qt.codebook.numel() <= 16:
            # Indices as UINT4 (two per byte); Gather needs int64, so DequantizeLinear(scale 1) + Cast.
            idx = helper.make_tensor(f"{name}q", TensorProto.UINT4, list(codes.shape), _pack_int4(codes, False),
                                     raw=True)
            one = numpy_helper.from_array(np.array(1.0, np.float32), f"{name}one")
            first = [helper.make_node("DequantizeLinear", [idx.name, one.name], [f"{name}f"]),
                     helper.make_node("Cast", [f"{name}f"], [f"{name}i"], to=TensorProto.INT64)]
            inits.append(one)
        else:
            idx = numpy_helper.from_array(codes.astype(np.uint8 if qt.codebook.numel() <= 256 else np.int32),
                                          f"{name}q")
            first = [helper.make_node("Cast", [idx.name], [f"{name}i"], to=TensorProto.INT64)]
        nodes = first + [
                 helper.make_node("Gather", [cb.name, f"{name}i"], [f"{name}l"], axis=0),
                 helper.make_node("Mul", [f"{name}l", sc.name], [name])]
        return inits + [idx, cb, sc], nodes
    if int4 and qt.bits <= 4:
        dtype = TensorProto.INT4 if qt.signed else TensorProto.UINT4
        q = helper.make_tensor(f"{name}q", dtype, list(codes.shape), _pack_int4(codes, qt.signed), raw=True)
    else:
        q = numpy_helper.from_array(codes.astype(np.int8 if qt.signed else np.uint8), f"{name}q")
    s = numpy_helper.from_array(scale.astype(np.float32), f"{name}s")
    inits += [q, s]
    return inits, [helper.make_node("DequantizeLinear", [q.name, s.name], [name], axis=axis)]


def _prune_dead(graph) -> None:
    """Remove nodes and initializers whose outputs nothing uses."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        for n in dead:
            graph.node.remove(n)
        if not dead:
            break
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def _shorten_names(graph) -> None:
    """Short value names and no node names: the exporter's scope paths cost kilobytes."""
    keep = {i.name for i in graph.input} | {o.name for o in graph.output} | {i.name for i in graph.initializer}
    ren: dict[str, str] = {}
    for n in graph.node:
        n.name = ""
        n.doc_string = ""
        for k, o in enumerate(n.output):
            if o and o not in keep:
                ren[o] = ren.get(o) or f"t{len(ren)}"
                n.output[k] = ren[o]
        for k, i in enumerate(n.input):
            if i in ren:
                n.input[k] = ren[i]
    del graph.value_info[:]


def export_onnx(dep: DeployModel, out_path: str | os.PathLike, input_shape: Sequence[int], *,
                metadata: Mapping[str, str] | None = None, fold_weights: bool = True) -> list[str]:
    """Write ``dep`` as ONNX with integer weights (see module docstring). Returns notes.

    ``fold_weights=False`` keeps every weight as ``DequantizeLinear`` (the plain QDQ form,
    slower in ONNX Runtime; for comparisons, see :func:`fold_unfused_weight_dq_`).
    """
    import onnx

    out_path = Path(out_path)
    _torch_onnx_export(dep.module, out_path, input_shape)
    model = onnx.load(str(out_path))
    g = model.graph
    int4, notes = _int4_storage(dep)
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits, nodes = _integer_weights(dep, consumers, int4)
    fp16_inits, fp16_nodes = _fp16_weights(g, dep, consumers)
    g.initializer.extend(inits + fp16_inits)
    # Dequantize nodes first: a valid topological order without re-sorting the exporter's graph.
    old = list(g.node)
    del g.node[:]
    g.node.extend(nodes + fp16_nodes + old)
    _prune_dead(g)
    _shorten_names(g)
    fused, folded = fold_unfused_weight_dq_(model) if fold_weights else (0, 0)
    if folded:
        notes.append(f"{folded} weight tensor(s) outside an int8 kernel stored as integers but dequantized "
                     f"once when ONNX Runtime loads the file (Cast + Mul, constant-folded); {fused} run as "
                     f"int8 kernels (QDQ)")
    md = dict(metadata or {})
    if fold_weights:
        md["squeezer.onnx_weights"] = json.dumps({"int8_kernels": fused, "dequantized_at_load": folded})
    for k, v in md.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=str(v)))
    onnx.checker.check_model(model)
    onnx.save(model, str(out_path))
    return notes


def _torch_onnx_export(module: nn.Module, out_path: Path, input_shape: Sequence[int]) -> None:
    x = torch.rand(1, *input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript-based exporter keeps parameter names as initializer names, which is
        # what maps a layer to its weight; do_constant_folding=False keeps them untouched.
        torch.onnx.export(module, (x,), str(out_path), dynamo=False, opset_version=ONNX_OPSET,
                          do_constant_folding=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})


def _int4_storage(dep: DeployModel) -> tuple[bool, list[str]]:
    """Whether <=4-bit weights are stored as INT4 (where this ONNX Runtime runs it), and the
    notes that say how weights of widths ONNX has no type for are stored."""
    notes = []
    int4 = any(qt.bits <= 4 for qt in dep.quant.values())
    if int4 and not _int4_supported():
        notes.append("this ONNX Runtime cannot run INT4 DequantizeLinear: <=4-bit weights stored as int8")
        int4 = False
    elif int4:
        notes.append("<=4-bit weights stored as opset-21 INT4 (two per byte)")
    if any(qt.bits < 4 or 4 < qt.bits < 8 for qt in dep.quant.values()):
        notes.append("ONNX has no 1-3 or 5-7 bit types: such weights are stored in the next wider type "
                     "(int4 or int8) with their exact integer values")
    return int4, notes


def _integer_weights(dep: DeployModel, consumers: Mapping[str, list[Any]], int4: bool) -> tuple[list, list]:
    """Initializers and DequantizeLinear nodes of every quantized weight; its readers are rewired
    to the dequantized tensor."""
    new_inits, new_nodes = [], []
    for fqn, qt in dep.quant.items():
        wname = f"{fqn}.weight"
        # Conv, Gemm, MatMul; or Transpose -> MatMul for a bias-free Linear (kept: DQ then Transpose).
        users = list(consumers.get(wname, []))
        if not users:
            raise ExportError(f"internal: no ONNX node reads weight {wname!r}; cannot attach its integers")
        transpose = any(n.op_type == "Gemm" and not any(a.name == "transB" and a.i == 1 for a in n.attribute)
                        or n.op_type == "MatMul" for n in users)
        deq = f"{fqn}.w"
        inits, nodes = _quant_initializers(deq, qt, transpose=transpose, int4=int4)
        for n in users:
            n.input[list(n.input).index(wname)] = deq
        new_inits += inits
        new_nodes += nodes
    return new_inits, new_nodes


def _fp16_weights(g: Any, dep: DeployModel, consumers: Mapping[str, list[Any]]) -> tuple[list, list]:
    """fp16 initializers and their Cast-to-float nodes for the fp16 weights; readers rewired."""
    import onnx
    from onnx import TensorProto, helper

    new_inits, new_nodes = [], []
    for fqn in sorted(dep.fp16):  # a set: sorted, so the file is the same from run to run
        wname = f"{fqn}.weight"
        init = next((i for i in g.initializer if i.name == wname), None)
        if init is None:
            continue
        arr = onnx.numpy_helper.to_array(init).astype(np.float16)
        h = onnx.numpy_helper.from_array(arr, f"{wname}_fp16")
        for n in consumers.get(wname, []):
            n.input[list(n.input).index(wname)] = f"{wname}_fp32"
        new_inits.append(h)
        new_nodes.append(helper.make_node("Cast", [h.name], [f"{wname}_fp32"], to=TensorProto.FLOAT))
    return new_inits, new_nodes


def runtime_op_types(model_or_path: Any, *, threads: int = 1) -> list[tuple[str, tuple[str, ...]]]:
    """``(op_type, inputs)`` of every node ONNX Runtime runs per inference (its optimized graph).

    The graph ORT executes after its default optimizations (``ORT_ENABLE_ALL``): constant
    folding, QDQ fusion into ``QLinearConv``/``QGemm``, layout changes. Initializer names of
    nodes it did not rewrite are kept, which is how a weight is traced to its runtime node.

    Example:
        >>> from onnx import helper, TensorProto
        >>> g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
        ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        >>> runtime_op_types(helper.make_model(g))
        [('Relu', ('x',))]
    """

    import onnx

    data = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3  # the "hardware specific optimizations" warning of saving a level-3 graph
        so.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        opt = onnx.load(so.optimized_model_filepath, load_external_data=False)
    return [(n.op_type, tuple(n.input)) for n in opt.graph.node]


def fold_unfused_weight_dq_(model: Any) -> tuple[int, int]:
    """Rewrite the weight ``DequantizeLinear`` nodes ONNX Runtime would run per inference.

    ORT fuses ``DQ(input) + DQ(weight) -> Conv/Gemm -> Q(output)`` into an int8 kernel, but a
    weight DQ outside such a group runs at every inference (ORT never constant-folds a DQ, to
    keep QDQ groups intact) and, worse, makes the weight non-constant, which turns off the
    float conv's blocked-layout (NCHWc) kernels: a pruned MobileNetV2 with int8 weights ran at
    0.34x of its fp32 base. Such a DQ becomes ``Cast(int -> float) -> Mul(scale)``, which ORT
    folds into an fp32 initializer once at load: the file stays integer-sized and the values
    are bit-identical (``DequantizeLinear`` with a zero zero-point is ``float(q) * scale``).
    Which DQs stay is asked of ORT itself (:func:`runtime_op_types`), so it follows whatever
    the installed ORT can fuse.

    The weights ORT does fuse into int8 kernels are stored as uint8 with zero point 128
    (:func:`_unsigned_weights_`): the same numbers, computed by ORT's exact u8u8 kernels.

    Returns:
        ``(weights fused into int8 kernels, weights rewritten to dequantize at load)``.
    """
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    inits = {i.name: i for i in g.initializer}
    weight_dq = [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
                 and len(n.input) == 2 and n.input[1] in inits]
    if not weight_dq:
        return 0, 0
    try:
        runtime = runtime_op_types(model)
    except Exception:  # noqa: BLE001 - no ORT here: keep the portable QDQ form
        return 0, 0
    still = {ins[0] for op, ins in runtime if op == "DequantizeLinear" and ins and ins[0] in inits}
    readers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    folded = 0
    for n in weight_dq:
        if n.input[0] not in still or readers.get(n.input[1], 0) != 1:
            continue
        q_name, s_name, out = n.input[0], n.input[1], n.output[0]
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        scale = numpy_helper.to_array(inits[s_name])
        if scale.ndim == 1 and scale.size > 1:  # per-channel: broadcast along `axis` for Mul
            rank = len(inits[q_name].dims)
            shape = [1] * rank
            shape[axis % rank] = -1
            g.initializer.remove(inits[s_name])
            g.initializer.append(numpy_helper.from_array(scale.reshape(shape).astype(np.float32), s_name))
        idx = list(g.node).index(n)
        g.node.remove(n)
        g.node.insert(idx, helper.make_node("Mul", [f"{out}_f", s_name], [out]))
        g.node.insert(idx, helper.make_node("Cast", [q_name], [f"{out}_f"], to=TensorProto.FLOAT))
        folded += 1
    _unsigned_weights_(g, [n for n in weight_dq if n.input[0] not in still])
    return sum(n.input[0] not in still for n in weight_dq), folded


def _unsigned_weights_(graph: Any, fused: list[Any]) -> None:
    """Store the int8 weights of int8 kernels as uint8 + 128 with zero point 128 (same values).

    On x86 CPUs without VNNI, ONNX Runtime computes uint8 x int8 products with ``VPMADDUBSW``,
    which adds pairs of products in saturating int16: activations near 255 (or around a large
    zero point, as after a low-rank factor) times large weights overflow it. Measured on a
    low-rank digits model: 34 of 360 predictions flipped and logits off by 5.4. uint8 x uint8
    runs on exact kernels (there: 0 flips, 10% slower).
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    for n in fused:
        q = numpy_helper.to_array(inits[n.input[0]])
        if q.dtype != np.int8 or len(n.input) != 2:
            continue
        graph.initializer.remove(inits[n.input[0]])
        graph.initializer.append(numpy_helper.from_array((q.astype(np.int16) + 128).astype(np.uint8), n.input[0]))
        scale = numpy_helper.to_array(inits[n.input[1]])
        zp = numpy_helper.from_array(np.full(scale.shape, 128, np.uint8), f"{n.input[0]}_zp")
        graph.initializer.append(zp)
        n.input.append(zp.name)


def onnx_runner(path: str | os.PathLike) -> Callable[[np.ndarray], np.ndarray]:
    """A function running the ONNX file with ONNX Runtime (one thread, CPU)."""

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


# ---------------------------------------------------------------------------------------------
# Reference size
# ---------------------------------------------------------------------------------------------
def payload_bytes(dep: DeployModel) -> int:
    """Bytes of what the model must store: integer codes at their bit-width, per-channel fp32
    scales, float weights and biases at 4 bytes (2 for fp16), BatchNorm not folded, codebooks.

    Used when the size model (``compressors.packing`` / ``hw_models``) is not available.
    """
    total = 0
    quant = dep.quant
    for name, mod in dep.module.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            if name in quant:
                qt = quant[name]
                total += math.ceil(qt.codes.numel() * qt.bits / 8) + 4 * qt.scale.numel()
                if qt.codebook is not None:
                    total += 4 * qt.codebook.numel()
            else:
                total += (2 if name in dep.fp16 else 4) * mod.weight.numel()
            if mod.bias is not None:
                total += 4 * mod.bias.numel()
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            total += 4 * 2 * mod.num_features  # inference needs scale and shift
    return total


def size_model_bytes(model: nn.Module, input_shape: Sequence[int], policy: Policy | None,
                     dep: DeployModel) -> tuple[int, str]:
    """(bytes, source): the packed size (``compressors.packing``), else the payload count."""
    try:
        return len(packing.pack_model(model)), "compressors.packing.pack_model"
    except Exception:  # noqa: BLE001 - a model the packer cannot pack: count the payload instead
        pass
    return payload_bytes(dep), "evaluators.export.payload_bytes"


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def compare_runtime(torch_model: nn.Module, run: Callable[[np.ndarray], np.ndarray], data, *,
                    mean: Sequence[float], std: Sequence[float], batch_size: int = 256,
                    raw_input: bool = True) -> tuple[float, float, float]:
    """(artifact accuracy, torch accuracy, max |logit diff|) on ``data`` (a split).

    ``torch_model`` takes normalised inputs; the artifact gets ``x * std + mean`` (images in
    [0, 1]) when ``raw_input``.
    """
    torch_model.eval()
    c = data.input_shape[0]
    m = torch.tensor(list(mean) or [0.0] * c).reshape(1, -1, 1, 1)
    s = torch.tensor(list(std) or [1.0] * c).reshape(1, -1, 1, 1)
    ok_a = ok_t = n = 0
    diff = 0.0
    for xb, yb in data.batches(inference_batch(batch_size, data.input_shape)):
        n += len(yb)
        ref = torch_model(xb)
        inp = xb * s + m if raw_input else xb
        out = torch.as_tensor(np.asarray(run(inp.numpy())))
        ok_a += int((out.argmax(1) == yb).sum())
        ok_t += int((ref.argmax(1) == yb).sum())
        diff = max(diff, float((out.float() - ref).abs().max()))
    n = max(1, n)
    return ok_a / n, ok_t / n, diff


def check_accuracy(fmt: str, acc: float, torch_acc: float, reported: float | None,
                   tol: float = ACCURACY_TOLERANCE) -> None:
    """Raise :class:`VerificationError` when ``acc`` is more than ``tol`` from a reference."""
    for what, ref in (("the PyTorch compressed model", torch_acc), ("the accuracy the search reported", reported)):
        if ref is not None and abs(acc - ref) > tol + 1e-12:
            raise VerificationError(
                f"{fmt} artifact accuracy {acc:.2%} differs from {what} ({ref:.2%}) by "
                f"{abs(acc - ref) * 100:.2f} pp; `|difference| <= {tol * 100:.1f} pp` must hold")


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------
@dataclass
class ExportJob:
    """Everything a format exporter needs (built by :func:`export_model`)."""

    loaded: Any                     # evaluators.checkpoint.Loaded
    out_path: Path
    data: Any = None                # DataSplits or None
    target: str | None = None
    reported: Mapping[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.loaded.normalization.get("mean", ()))

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.loaded.normalization.get("std", ()))

    def metadata(self) -> dict[str, str]:
        pol = self.loaded.policy
        md = {"squeezer.format": "squeezer.export/2", "squeezer.model": self.loaded.model_name,
              "squeezer.policy": json.dumps(pol.to_dict() if pol is not None else None),
              "squeezer.target": self.target or "", "squeezer.input": "image in [0, 1], NCHW float32",
              "squeezer.input_shape": json.dumps(list(self.loaded.input_shape)),
              "squeezer.num_classes": str(self.loaded.num_classes),
              "squeezer.normalization": json.dumps({"mean": list(self.mean), "std": list(self.std)})}
        for k in ("metric", "test_metric", "val_metric", "size_bytes", "latency_ms", "energy_mj"):
            if self.reported.get(k) is not None:
                md[f"squeezer.{k}"] = str(self.reported[k])
        return md


def reported_test_accuracy(job: ExportJob) -> float | None:
    """The search's test metric when it is top-1 accuracy (what an artifact's accuracy is checked
    against); None when the search measured another metric or nothing."""
    v = job.reported.get("test_metric")
    return None if v is None or job.reported.get("metric", "accuracy") != "accuracy" else float(v)


def verify_artifact(job: ExportJob, fmt: str, run: Callable[[np.ndarray], np.ndarray], dep: DeployModel,
            notes: Sequence[str], *, tol: float = ACCURACY_TOLERANCE, check_size: bool = True) -> ExportResult:
    """Measure the written artifact against the PyTorch model and the size model; raise on mismatch."""
    ld = job.loaded
    size = job.out_path.stat().st_size
    expected, source = size_model_bytes(ld.model, ld.input_shape, ld.policy, dep)
    acc = tacc = diff = None
    if job.data is not None:
        acc, tacc, diff = compare_runtime(ld.model, run, job.data.test, mean=job.mean, std=job.std)
        check_accuracy(fmt, acc, tacc, reported_test_accuracy(job), tol)
    if check_size and fmt == "onnx" and is_int8_policy(dep) and expected and \
            abs(size - expected) > SIZE_TOLERANCE * expected + SIZE_SLACK_BYTES:
        raise VerificationError(
            f"onnx file is {size:,} bytes but the size model says {expected:,} ({source}); "
            f"`|file - size model| <= {SIZE_TOLERANCE} * size model + {SIZE_SLACK_BYTES} B` must hold for "
            f"int8 policies, but got ratio={size / expected:.3f}")
    return ExportResult(job.out_path, fmt, size, acc, tacc, reported_test_accuracy(job), expected, source, diff,
                        tuple(dict.fromkeys(notes)))


def is_int8_policy(dep: DeployModel) -> bool:
    """All conv/linear layers store dense uniform 8-bit codes (no float, codebook or sparsity).

    Sparse layers are excluded because ONNX stores their zeros while the packer stores a bitmap
    and the non-zeros.
    """
    layers = [n for n, m in dep.module.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return bool(layers) and not dep.sparse and all(n in dep.quant and dep.quant[n].bits == 8 and dep.quant[n].codebook is None
                                for n in layers)


