"""Pack what a compressed model really stores into bytes (the ground truth of the size model).

``hw_models`` predicts ``Cost.size_bytes`` from a traced table and a policy;
``len(pack_model(compressed_model))`` is what it must equal (tests/test_packing.py).

Format (a flat payload, modules in ``named_modules()`` order; the architecture is not in it:
it is rebuilt from the model name and the policy, as export does):

- **conv / linear weight** (``numel`` elements, ``O`` output channels; the mask and quantizer
  are read from the ``weight`` parametrizations):

  - float (no quantizer): fp32, 4 B per stored element;
  - fp16 (``weight_bits=16``): 2 B per stored element;
  - quantized (``QuantizedTensor`` from the quantizer's ``encode``): the codes bit-packed
    little-endian at ``bits`` each, ``ceil(n * bits / 8)`` bytes, then the fp32 per-output-
    channel scale (``4 * O``); with a codebook (weight sharing) also the fp32 codebook (``4 * K``).
    Codebook quantizers whose scale is all ones (:func:`unit_scale`: k-means, BIRCH, spectral,
    TTQ) store no scale unless a BatchNorm folds into the layer.
  - unstructured sparsity (a ``WeightMask`` parametrization): a bitmap of ``ceil(numel / 8)``
    bytes first, then only the non-zeros' values/codes, ``n = numel - floor(numel * sparsity)``;
    with Huffman coding the positions are relative indices instead
    (:func:`compressors.coding.encode_positions`, Deep Compression's format).
- **bias**: fp32, ``4 * O`` if the layer has a bias **or** is followed by a BatchNorm that folds
  into it (the BN's only input is this layer and the layer has no other reader).
- **BatchNorm that does not fold**: scale and shift in fp32, ``8 * C``.
- **activation quantizer** (``ActQuantizer``): fp32 scale + int32 zero point, 8 B.
- **any other parameter**: fp32, 4 B per element (quantizer internals such as the LSQ step are
  not stored: the scale is).
- **product quantization** (``sharing="pq"``): the sub-vector indices bit-packed at ``bits``
  and the float32 sub-codebooks (no per-channel scale), after the bitmap if sparse.
- **Huffman coding** (``coding="huffman"``): each quantized tensor's codes are replaced by
  :func:`compressors.coding.encode_tensor` (header, code-length table, bit stream) and a sparse
  layer's bitmap by Huffman-coded relative indices; the size model only estimates these (from
  the code entropy and geometric gaps), so it is exact at pack time only.

Example:
    >>> from torch import nn
    >>> m = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    >>> len(pack_model(m))    # 8*3*3*3 fp32 weights + folded-BN bias 8*4
    896
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .apply import _Fp16
from .coding import encode_positions, encode_tensor
from .quantize import ActQuantizer, CodebookQuantizer, QuantizedTensor, TTQQuantizer
from .sparsity import WeightMask


def _pack_bits(codes: np.ndarray, bits: int, signed: bool) -> bytes:
    """Bit-pack integer codes (offset to unsigned when signed), little-endian bit order."""
    v = codes.astype(np.int64).ravel()
    if signed:
        v = v + (1 << (bits - 1))
    v = v.astype(np.uint64)
    if bits == 8:
        return v.astype(np.uint8).tobytes()
    planes = ((v[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(planes.ravel(), bitorder="little").tobytes()


def _weight_chain(module: nn.Module) -> tuple[torch.Tensor, Any, Any, bool]:
    """(weight before the quantizer, quantizer-like with ``encode`` or None, mask or None, fp16?)."""

    plist = getattr(getattr(module, "parametrizations", None), "weight", None)
    if plist is None:
        return module.weight.detach(), None, None, module.weight.dtype == torch.float16
    w = plist.original.detach()
    quant, mask, fp16 = None, None, False
    for p in plist:
        if isinstance(p, WeightMask):
            mask = p
        if isinstance(p, _Fp16):
            fp16 = True
        if hasattr(p, "encode") and quant is None:
            quant = p
            break
        w = p(w)
    return w.detach(), quant, mask, fp16


def _folded_bns(model: nn.Module) -> dict[str, str]:
    """BN FQN -> conv/linear FQN it folds into (the BN's only input, read by nothing else)."""

    leaf = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)

    class _T(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, leaf) or super().is_leaf_module(m, qualname)

    mods = dict(model.named_modules())
    out: dict[str, str] = {}
    try:
        graph = _T().trace(model)
    except Exception:  # noqa: BLE001 - untraceable: a conv directly followed by a BN in module order
        prev = None
        for name, m in model.named_modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and prev is not None:
                pm = mods[prev]
                c = pm.out_channels if isinstance(pm, nn.modules.conv._ConvNd) else pm.out_features
                if c == m.num_features:
                    out[name] = prev
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                prev = name
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) or len(list(m.children())) == 0:
                prev = None if not isinstance(m, (nn.Identity,)) else prev
        return out
    for n in graph.nodes:
        if n.op != "call_module" or not isinstance(mods.get(n.target), (nn.BatchNorm1d, nn.BatchNorm2d)):
            continue
        src = n.args[0] if n.args else None
        if not isinstance(src, fx.Node) or src.op != "call_module":
            continue
        if isinstance(mods.get(src.target), (nn.modules.conv._ConvNd, nn.Linear)) and len(src.users) == 1:
            out[str(n.target)] = str(src.target)
    return out


def _pack_weight(module: nn.Module, coding: str | None, bn_scale: np.ndarray | None = None) -> bytes:
    """One weight; a folded BN's per-channel scale multiplies the float values or the quantizer scale."""
    w, quant, mask, fp16 = _weight_chain(module)
    keep = None
    parts: list[bytes] = []
    if mask is not None:
        keep = mask.mask.detach().reshape(-1).bool().cpu().numpy()
        if coding == "huffman":
            parts.append(encode_positions(keep))
        else:
            parts.append(np.packbits(keep.astype(np.uint8), bitorder="little").tobytes())
    if quant is None:
        if bn_scale is not None:
            w = w * torch.as_tensor(bn_scale, dtype=w.dtype).reshape((-1,) + (1,) * (w.dim() - 1))
        vals = w.reshape(-1).cpu().numpy()
        if keep is not None:
            vals = vals[keep]
        parts.append(vals.astype(np.float16 if fp16 else np.float32).tobytes())
        return b"".join(parts)
    qt: QuantizedTensor = quant.encode(w)
    if type(qt).storage_bytes is not QuantizedTensor.storage_bytes:
        # another layout (product quantization): its codes and codebooks, no per-channel scale
        # (a folded BN scale goes into the codebooks of its rows).
        codes = qt.codes.reshape(-1).cpu().numpy()
        parts.append(_encode_codes(codes, qt.bits, qt.signed, coding))
        book = qt.codebook.detach().float()
        if bn_scale is not None and book.dim() == 3:  # [m, k, d]: rows j*d+i of sub-space j
            book = book * torch.as_tensor(bn_scale, dtype=book.dtype).reshape(book.shape[0], 1, book.shape[2])
        parts.append(book.reshape(-1).cpu().numpy().astype(np.float32).tobytes())
        return b"".join(parts)
    codes = qt.codes.reshape(-1).cpu().numpy()
    if keep is not None:
        codes = codes[keep]
    parts.append(_encode_codes(codes, qt.bits, qt.signed, coding))
    if not (unit_scale(quant) and bn_scale is None):
        scale = qt.scale.detach().reshape(-1).float().cpu().numpy()
        if bn_scale is not None:
            scale = scale * bn_scale
        parts.append(scale.astype(np.float32).tobytes())
    if qt.codebook is not None:
        parts.append(qt.codebook.detach().reshape(-1).float().cpu().numpy().astype(np.float32).tobytes())
    return b"".join(parts)


def unit_scale(quant: Any) -> bool:
    """Whether ``quant``'s per-channel scale is all ones by construction (k-means / BIRCH /
    spectral codebooks, trained ternary): the codebook holds the values, so no scale is
    stored unless a BatchNorm folds into the layer (then the BN's per-channel scale is)."""

    return isinstance(quant, (CodebookQuantizer, TTQQuantizer))


def _encode_codes(codes: np.ndarray, bits: int, signed: bool, coding: str | None) -> bytes:
    if coding == "huffman":
        return encode_tensor(codes.astype(np.int64))
    return _pack_bits(codes, bits, signed)


def pack_model(model: nn.Module, *, coding: str | None = None) -> bytes:
    """The bytes a compressed model stores (format in the module docstring).

    Args:
        model: a model after ``apply_policy_`` (pruned, decomposed, masked, quantized).
        coding: ``None`` or ``"huffman"`` (entropy-code quantized codes).

    Returns:
        The payload; its length is the model's exact storage size.
    """
    if coding not in (None, "huffman"):
        raise ValueError(f"`coding in (None, 'huffman')` must hold, but got coding={coding!r}")
    folded = _folded_bns(model)
    bn_of = {conv: bn for bn, conv in folded.items()}
    mods = dict(model.named_modules())
    parts: list[bytes] = []
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, ActQuantizer):
                s, zp = m.qparams()
                parts.append(np.array([s], np.float32).tobytes() + np.array([zp], np.int32).tobytes())
                continue
            if "parametrizations" in name.split("."):
                continue  # the weight chain (original, mask, quantizer) is packed with its layer
            if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                o = m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
                bn = mods[bn_of[name]] if name in bn_of else None
                scale, shift = _bn_affine(bn) if bn is not None else (None, None)
                parts.append(_pack_weight(m, coding, scale))
                if m.bias is not None or bn is not None:
                    bias = m.bias.detach().float().cpu().numpy() if m.bias is not None else np.zeros(o, np.float32)
                    if bn is not None:
                        bias = bias * scale + shift
                    parts.append(bias.astype(np.float32).tobytes())
                continue
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                if name in folded:
                    continue  # folded into its producer's weight scale and bias
                scale, shift = _bn_affine(m)
                parts.append(scale.astype(np.float32).tobytes() + shift.astype(np.float32).tobytes())
                continue
            for _, p in m.named_parameters(recurse=False):
                parts.append(p.detach().float().reshape(-1).cpu().numpy().astype(np.float32).tobytes())
    return b"".join(parts)


def _bn_affine(bn: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    var = bn.running_var if bn.running_var is not None else torch.ones(bn.num_features)
    mean = bn.running_mean if bn.running_mean is not None else torch.zeros(bn.num_features)
    g = bn.weight if bn.weight is not None else torch.ones(bn.num_features)
    b = bn.bias if bn.bias is not None else torch.zeros(bn.num_features)
    scale = (g / torch.sqrt(var + bn.eps)).detach().float()
    shift = (b - mean * scale).detach().float()
    return scale.cpu().numpy(), shift.cpu().numpy()


def packed_size(model: nn.Module, *, coding: str | None = None) -> int:
    """``len(pack_model(model))`` (convenience)."""
    return len(pack_model(model, coding=coding))
