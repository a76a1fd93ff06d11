"""Weight and activation quantizers.

A weight quantizer is an ``nn.Module`` registered as a ``torch.nn.utils.parametrize``
parametrization of a layer's ``weight``: ``forward(w)`` returns the fake-quantized weight
(gradients pass by the straight-through estimator), ``encode(w)`` returns the integers the
layer really stores (:class:`QuantizedTensor`), which the packer and the exporters use.

Every quantizer registered in :data:`QUANTIZERS` takes ``(bits, weight)`` in its constructor,
declares the widths it can encode in ``supported_bits`` and must pass
``tests/test_quantizer_contract.py``. Activation quantizers are in :data:`ACT_QUANTIZERS`
(``cls(bits)``), attached with :func:`attach_act_quant_`.

Example:
    >>> import torch
    >>> q = QUANTIZERS.get("uniform")(4, torch.randn(8, 3, 3, 3))
    >>> qt = q.encode(torch.randn(8, 3, 3, 3))
    >>> int(qt.codes.abs().max()) <= 8
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn.utils import parametrize

from .coding import huffman_bytes
from .registry import Registry


@dataclass
class QuantizedTensor:
    """What a quantized weight stores.

    ``values = scale[c] * codes`` (``codebook is None``, ``scale`` per output channel, shape
    ``[O]``) or ``values = scale[c] * codebook[codes]`` (weight sharing / non-uniform levels:
    binary, ternary, power-of-two, k-means; ``codes`` are then unsigned indices into the
    1-D ``codebook``). ``codes`` are signed integers in ``[-(2**(bits-1)), 2**(bits-1) - 1]``
    when ``signed``, else ``[0, 2**bits - 1]``; they have the weight's shape.

    Storage (what :meth:`storage_bytes` counts, and what the packer should count): the codes
    at ``bits`` each (or their Huffman encoding, :func:`compressors.coding.huffman_bytes`, when
    ``coding="huffman"``), plus ``scale`` and ``codebook`` as float32. Subclasses with another
    layout (:class:`compressors.sharing.ProductQuantizedTensor`) override both methods.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    bits: int
    signed: bool = True
    codebook: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        shape = (-1,) + (1,) * (self.codes.dim() - 1)
        base = self.codes.float() if self.codebook is None else self.codebook[self.codes.long()]
        return base * self.scale.reshape(shape)

    @property
    def code_range(self) -> tuple[int, int]:
        """Inclusive (min, max) a code may take."""
        if self.signed:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2 ** self.bits - 1

    def storage_bytes(self, coding: str | None = None) -> int:
        """Bytes to store this tensor: codes (fixed width or Huffman) + float32 scale/codebook.

        Example:
            >>> qt = QuantizedTensor(torch.zeros(4, 8, dtype=torch.int8), torch.ones(4), bits=2)
            >>> qt.storage_bytes()  # 32 codes * 2 bits + 4 scales * 4 bytes
            24
        """
        if coding == "huffman":
            code_bytes = huffman_bytes(self.codes)
        elif coding is None:
            code_bytes = math.ceil(self.codes.numel() * self.bits / 8)
        else:
            raise ValueError(f"`coding in (None, 'huffman')` must hold, but got coding={coding!r}")
        extra = self.scale.numel() * 4 + (0 if self.codebook is None else self.codebook.numel() * 4)
        return int(code_bytes + extra)


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """round() with identity gradient (straight-through estimator); the value is exact."""
    return x.detach().round() + (x - x.detach())


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Value of ``q`` (exactly), gradient of ``x`` (straight-through)."""
    return q.detach() + (x - x.detach())


def _per_channel_absmax(w: torch.Tensor) -> torch.Tensor:
    return w.detach().abs().reshape(w.shape[0], -1).amax(dim=1).clamp_min(1e-8)


def _bcast(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Per-output-channel vector ``[O]`` reshaped to broadcast against ``w``."""
    return v.reshape((-1,) + (1,) * (w.dim() - 1))


def _int_dtype(bits: int) -> torch.dtype:
    return torch.int8 if bits <= 7 else (torch.int16 if bits <= 15 else torch.int32)


def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value in sorted 1-D ``levels`` for every element of ``x``."""
    if levels.numel() == 1:
        return torch.zeros_like(x, dtype=torch.long)
    mids = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(x.contiguous(), mids.contiguous())


class WeightQuantizer(nn.Module):
    """Base class: per-output-channel symmetric uniform quantizer with STE.

    Subclasses set ``supported_bits`` (the widths whose codes they can store) and override
    ``forward`` / ``encode`` as needed; ``encode(w).dequantize()`` must equal ``forward(w)``
    in eval mode.
    """

    signed = True
    #: Bit widths this quantizer can encode (a policy asking for another raises ValueError).
    supported_bits: ClassVar[frozenset[int]] = frozenset(range(2, 17))

    def __init__(self, bits: int, weight: torch.Tensor) -> None:
        super().__init__()
        if not 1 <= bits <= 16:
            raise ValueError(f"`1 <= bits <= 16` must hold, but got bits={bits}")
        if bits not in self.supported_bits:
            raise ValueError(f"`bits in {sorted(self.supported_bits)}` must hold for quantizer "
                             f"{type(self).__name__}, but got bits={bits}")
        self.bits = bits

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.bits > 1 else 1

    @property
    def qmin(self) -> int:
        return -self.qmax - (0 if self.bits == 1 else 1)

    def scale(self, w: torch.Tensor) -> torch.Tensor:  # [O]
        return _per_channel_absmax(w) / self.qmax

    def _eval_scale(self, w: torch.Tensor) -> torch.Tensor:
        return self.scale(w).detach().abs().clamp_min(1e-8)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s = _bcast(self.scale(w), w)
        q = torch.clamp(ste_round(w / s), self.qmin, self.qmax)
        return q * s

    @torch.no_grad()
    def encode(self, w: torch.Tensor) -> QuantizedTensor:
        s = self._eval_scale(w)
        q = torch.clamp(torch.round(w / _bcast(s, w)), self.qmin, self.qmax)
        return QuantizedTensor(codes=q.to(_int_dtype(self.bits)), scale=s.float(), bits=self.bits)


#: Weight quantizers by name: ``cls(bits, weight) -> WeightQuantizer``.
QUANTIZERS: Registry[type[WeightQuantizer]] = Registry("quantizer")


@QUANTIZERS.register("uniform", summary="uniform symmetric per-channel, max-abs scale, STE (PTQ/QAT)")
class UniformQuantizer(WeightQuantizer):
    pass


@QUANTIZERS.register("lsq", summary="uniform per-channel with learned step size (LSQ, Esser et al. 2020)")
class LSQQuantizer(WeightQuantizer):
    def __init__(self, bits: int, weight: torch.Tensor) -> None:
        super().__init__(bits, weight)
        # LSQ's init: 2 * mean|w| / sqrt(qmax), per channel.
        init = 2 * weight.detach().abs().reshape(weight.shape[0], -1).mean(1) / max(self.qmax, 1) ** 0.5
        self.step = nn.Parameter(init.clamp_min(1e-8))

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        g = 1.0 / (w[0].numel() * max(self.qmax, 1)) ** 0.5
        # Gradient scaling from the LSQ paper, value unchanged.
        return (self.step - self.step * g).detach() + self.step * g if self.training else self.step.abs().clamp_min(1e-8)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s = _bcast(self.scale(w).abs().clamp_min(1e-8), w)
        q = torch.clamp(ste_round(w / s), self.qmin, self.qmax)
        return q * s


@QUANTIZERS.register("least_squares",
                     summary="per-channel scale minimising ||W - aQ||^2 by alternating optimisation, 1-4 bits")
class LeastSquaresQuantizer(WeightQuantizer):
    """Per-channel scale ``a`` and integer codes ``Q`` minimising ``||W - a Q||^2``.

    Alternates ``Q = clip(round(W / a))`` and ``a = <W, Q> / <Q, Q>`` (each step cannot
    increase the error) from the best of several starting clips. 1 bit is the closed form
    ``Q = sign(W)``, ``a = mean|W|`` (codes stored as a ``[-1, 1]`` codebook).
    """

    supported_bits = frozenset({1, 2, 3, 4})
    iters = 40

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        w2 = w.detach().reshape(w.shape[0], -1)
        if self.bits == 1:
            return w2.abs().mean(1).clamp_min(1e-8)
        absmax = w2.abs().amax(1, keepdim=True).clamp_min(1e-8)
        best_a, best_err = None, None
        # Several starting clips (max-abs ones make a fixed point of an already quantized W).
        for div in (self.qmax, self.qmax + 1, self.qmax * 0.75, self.qmax * 0.5, self.qmax * 0.35):
            a = absmax / max(div, 0.5)
            prev = None
            for _ in range(self.iters):
                q = torch.clamp(torch.round(w2 / a), self.qmin, self.qmax)
                if prev is not None and torch.equal(q, prev):
                    break  # a fixed point: Q optimal for a, a least-squares for Q
                qq = (q * q).sum(1, keepdim=True)
                a = torch.where(qq > 0, (w2 * q).sum(1, keepdim=True) / qq.clamp_min(1e-12), a).clamp_min(1e-8)
                prev = q
            q = torch.clamp(torch.round(w2 / a), self.qmin, self.qmax)
            err = ((w2 - a * q) ** 2).sum(1, keepdim=True)
            if best_a is None:
                best_a, best_err = a, err
            else:
                better = err < best_err
                best_a, best_err = torch.where(better, a, best_a), torch.where(better, err, best_err)
        return best_a.squeeze(1)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.bits == 1:
            a = _bcast(self.scale(w), w)
            return ste(w, torch.where(w >= 0, a, -a))
        return super().forward(w)

    @torch.no_grad()
    def encode(self, w: torch.Tensor) -> QuantizedTensor:
        if self.bits == 1:
            return _sign_tensor(w, self.scale(w))
        return super().encode(w)


def _sign_tensor(w: torch.Tensor, a: torch.Tensor) -> QuantizedTensor:
    codes = (w >= 0).to(torch.int8)  # 0 -> -1, 1 -> +1
    return QuantizedTensor(codes=codes, scale=a.detach().float(), bits=1, signed=False,
                           codebook=torch.tensor([-1.0, 1.0]))


@QUANTIZERS.register("binary", summary="binary weights sign(W) * mean|W| per channel (BWN, Rastegari et al. 2016)")
class BinaryQuantizer(WeightQuantizer):
    supported_bits = frozenset({1})
    signed = False

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        return w.detach().abs().reshape(w.shape[0], -1).mean(1).clamp_min(1e-8)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        a = _bcast(self.scale(w), w)
        return ste(w, torch.where(w >= 0, a, -a))

    @torch.no_grad()
    def encode(self, w: torch.Tensor) -> QuantizedTensor:
        return _sign_tensor(w, self.scale(w))


@QUANTIZERS.register("ternary",
                     summary="ternary {-a, 0, a}, threshold 0.7*mean|W|, a = mean kept |W| (TWN, Li et al. 2016)")
class TernaryQuantizer(WeightQuantizer):
    supported_bits = frozenset({2})
    delta_ratio = 0.7

    def _parts(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        wd = w.detach()
        w2 = wd.reshape(w.shape[0], -1).abs()
        delta = self.delta_ratio * w2.mean(1, keepdim=True)
        kept = w2 > delta
        a = (w2 * kept).sum(1) / kept.sum(1).clamp_min(1)
        codes = (torch.sign(wd) * kept.reshape(wd.shape)).to(torch.int8)
        return codes, a.clamp_min(1e-8)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        codes, a = self._parts(w)
        return ste(w, codes.float() * _bcast(a, w))

    @torch.no_grad()
    def encode(self, w: torch.Tensor) -> QuantizedTensor:
        codes, a = self._parts(w)
        return QuantizedTensor(codes=codes, scale=a.float(), bits=2)


class _TTQFn(torch.autograd.Function):
    """TTQ's gradients: scaled STE to the float weight, summed gradients to the two scales."""

    @staticmethod
    def forward(ctx, w, wp, wn, delta):  # type: ignore[override]
        pos, neg = w > delta, w < -delta
        ctx.save_for_backward(pos, neg, wp, wn)
        return wp * pos - wn * neg

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        pos, neg, wp, wn = ctx.saved_tensors
        gw = torch.where(pos, wp * g, torch.where(neg, wn * g, g))
        # Mean rather than sum over the weights of each sign: same direction as the paper's
        # gradient, a step size that does not grow with the layer (SGD diverges otherwise).
        gp = (g * pos).sum() / pos.sum().clamp_min(1)
        gn = -(g * neg).sum() / neg.sum().clamp_min(1)
        return gw, gp.reshape(wp.shape), gn.reshape(wn.shape), None


@QUANTIZERS.register("ttq", summary="trained ternary {-Wn, 0, Wp} with learned per-layer scales (TTQ, Zhu et al. 2017)")
class TTQQuantizer(WeightQuantizer):
    """Trained ternary quantization: threshold ``t * max|W|``; ``Wp``, ``Wn`` are Parameters."""

    supported_bits = frozenset({2})
    signed = False
    threshold_ratio = 0.05

    def __init__(self, bits: int, weight: torch.Tensor) -> None:
        super().__init__(bits, weight)
        w = weight.detach()
        d = self.threshold_ratio * w.abs().max()
        pos, neg = w[w > d], w[w < -d]
        self.wp = nn.Parameter((pos.mean() if pos.numel() else w.abs().mean()).reshape(1).clone())
        self.wn = nn.Parameter(((-neg).mean() if neg.numel() else w.abs().mean()).reshape(1).clone())

    def _delta(self, w: torch.Tensor) -> torch.Tensor:
        return self.threshold_ratio * w.detach().abs().max()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return _TTQFn.apply(w, self.wp.abs(), self.wn.abs(), self._delta(w))

    @torch.no_grad()
    def encode(self, w: torch.Tensor) -> QuantizedTensor:
        d = self._delta(w)
        codes = torch.ones_like(w, dtype=torch.int8)  # 0: -Wn, 1: 0, 2: +Wp
        codes[w > d] = 2
        codes[w < -d] = 0
        book = torch.cat([-self.wn.detach().abs(), torch.zeros(1), self.wp.detach().abs()]).float()
        return QuantizedTensor(codes=codes, scale=torch.ones(w.shape[0]), bits=2, signed=False, codebook=book)


def pow2_levels(bits: int) -> torch.Tensor:
    """Sorted levels ``{0, +-2**-k : k = 0 .. 2**(bits-1) - 2}`` (``2**bits - 1`` values)."""
    n = 2 ** (bits - 1) - 1
    mags = torch.tensor([2.0 ** -k for k in range(n)])
    return torch.cat([-mags, torch.zeros(1), mags.flip(0)]).sort().values


def pow2_scale(w: torch.Tensor) -> torch.Tensor:
    """Per-channel power-of-two scale ``2**floor(log2(4/3 max|w|))`` (INQ's n1)."""
    return torch.exp2(torch.floor(torch.log2(_per_channel_absmax(w) * 4 / 3)))


@QUANTIZERS.register("pow2", summary="power-of-two (logarithmic) levels {0, +-2^-k} * 2^n: multiply = shift")
class Pow2Quantizer(WeightQuantizer):
    """Weights ``2**n_c * {0, +-1, +-1/2, ... }``: a multiply becomes a shift.

    Codes index :func:`pow2_levels` (``codebook``); the per-channel scale is itself a power
    of two, so every stored value is ``+-2**e`` or 0.
    """

    supported_bits = frozenset(range(2, 9))
    signed = False

    def _indices(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels = pow2_levels(self.bits).to(w.device)
        s = pow2_scale(w)
        idx = nearest_level(w.detach() / _bcast(s, w), levels)
        return idx, s, levels

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        idx, s, levels = self._indices(w)
        return ste(w, levels[idx] * _bcast(s, w))

    @torch.no_grad()
    def encode(self, w: torch.Tensor) -> QuantizedTensor:
        idx, s, levels = self._indices(w)
        return QuantizedTensor(codes=idx.to(_int_dtype(self.bits + 1)), scale=s.float(), bits=self.bits,
                               signed=False, codebook=levels.float())


@QUANTIZERS.register("inq", summary="incremental network quantization to powers of two, by magnitude (INQ, Zhou et al. 2017)")
class INQQuantizer(Pow2Quantizer):
    """Incremental network quantization: a growing, largest-magnitude-first fraction of the
    weights is frozen at power-of-two values; the rest stay float and keep training.

    ``advance(fraction)`` freezes more weights (call it between fine-tune stages, e.g.
    0.5, 0.75, 0.875, 1.0). Built with ``fraction=1.0`` (the default, what a policy gets) all
    weights are quantized at once; frozen weights receive no gradient.
    """

    def __init__(self, bits: int, weight: torch.Tensor, fraction: float = 1.0) -> None:
        super().__init__(bits, weight)
        w = weight.detach()
        self.register_buffer("scale_c", pow2_scale(w))  # fixed at the start, as in INQ
        self.register_buffer("frozen", torch.zeros_like(w, dtype=torch.bool))
        self.register_buffer("qvalues", torch.zeros_like(w))
        self.fraction = 0.0
        self.advance(fraction, w)

    def _quantize(self, w: torch.Tensor) -> torch.Tensor:
        levels = pow2_levels(self.bits).to(w.device)
        s = _bcast(self.scale_c, w)
        return levels[nearest_level(w / s, levels)] * s

    @torch.no_grad()
    def advance(self, fraction: float, weight: torch.Tensor | None = None) -> None:
        """Freeze the largest-magnitude float weights until ``fraction`` of all are frozen.

        Args:
            fraction: target frozen fraction in [0, 1], not below the current one.
            weight: the current float weight (default: the values seen at the last forward).
        """
        if not 0.0 <= fraction <= 1.0 or fraction < self.fraction:
            raise ValueError(f"`{self.fraction} <= fraction <= 1` must hold, but got fraction={fraction}")
        w = weight if weight is not None else getattr(self, "_last_w", None)
        if w is None:
            raise ValueError("INQ.advance needs the weight before the first forward")
        w = w.detach().reshape(self.frozen.shape)
        target = int(round(fraction * w.numel()))
        more = target - int(self.frozen.sum())
        if more > 0:
            mag = w.abs().masked_fill(self.frozen, -1.0).flatten()
            idx = torch.topk(mag, more).indices
            self.frozen.view(-1)[idx] = True
            self.qvalues.view(-1)[idx] = self._quantize(w).view(-1)[idx]
        self.fraction = fraction

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        self._last_w = w.detach()
        return torch.where(self.frozen, self.qvalues, w)

    @torch.no_grad()
    def encode(self, w: torch.Tensor) -> QuantizedTensor:
        levels = pow2_levels(self.bits).to(w.device)
        v = torch.where(self.frozen, self.qvalues, w)
        idx = nearest_level(v / _bcast(self.scale_c, w), levels)
        return QuantizedTensor(codes=idx.to(_int_dtype(self.bits + 1)), scale=self.scale_c.float().clone(),
                               bits=self.bits, signed=False, codebook=levels.float())


# --- k-means / codebook quantizers ---------------------------------------------------------
def kmeans_pp_init(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) of 1-D data ``x``."""
    centers = [x[torch.randint(len(x), (1,), generator=generator)].item()]
    d2 = (x - centers[0]) ** 2
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:
            break
        i = torch.multinomial(d2 / total, 1, generator=generator).item()
        centers.append(x[i].item())
        d2 = torch.minimum(d2, (x - centers[-1]) ** 2)
    return torch.tensor(sorted(set(centers)), dtype=x.dtype)


def kmeans1d(x: torch.Tensor, k: int, *, iters: int = 30, seed: int = 0, init: torch.Tensor | None = None,
             max_points: int = 50_000) -> torch.Tensor:
    """Sorted centroids of 1-D ``x`` by Lloyd's algorithm from k-means++ (or ``init``) seeds.

    Example:
        >>> c = kmeans1d(torch.cat([torch.zeros(50), torch.ones(50)]), 2)
        >>> c.tolist()
        [0.0, 1.0]
    """
    x = x.detach().flatten().float()
    g = torch.Generator().manual_seed(seed)
    if len(x) > max_points:  # centroids of a random subsample: same answer, bounded time
        x = x[torch.randperm(len(x), generator=g)[:max_points]]
    # Seeding is O(n k): a 10k subsample gives the same spread of seeds at a fraction of the cost.
    seed_x = x if len(x) <= 10_000 else x[torch.randperm(len(x), generator=g)[:10_000]]
    c = kmeans_pp_init(seed_x, k, g) if init is None else init.detach().float().sort().values
    for _ in range(iters):
        a = nearest_level(x, c)
        sums = torch.zeros_like(c).index_add_(0, a, x)
        cnt = torch.zeros_like(c).index_add_(0, a, torch.ones_like(x))
        new = torch.where(cnt > 0, sums / cnt.clamp_min(1), c).sort().values
        if torch.allclose(new, c):
            c = new
            break
        c = new
    return c


class CodebookQuantizer(WeightQuantizer):
    """Weight sharing: every weight is the nearest entry of a learned per-layer codebook.

    The codebook is a Parameter: during fine-tune each centroid gets the sum of its weights'
    gradients (Deep Compression's update); the float weight also gets the STE gradient, so
    weights may move between clusters. Exact zeros (pruned weights) stay zero through a fixed
    zero entry, so sparsity survives sharing. Subclasses choose the centroids
    (:meth:`init_centroids`).

    Args:
        bits: code width; at most ``2**bits`` codebook entries (zero included).
        weight: the weight to cluster.
        clusters: number of shared non-zero values (default: as many as ``bits`` allows).
    """

    supported_bits = frozenset(range(1, 9))
    signed = False

    def __init__(self, bits: int, weight: torch.Tensor, clusters: int | None = None) -> None:
        super().__init__(bits, weight)
        w = weight.detach().float()
        self.has_zero = bool((w == 0).any())
        cap = 2 ** bits - int(self.has_zero)
        k = cap if clusters is None else min(int(clusters), cap)
        if k < 1:
            raise ValueError(f"`clusters >= 1` must hold after reserving the zero code, but got clusters={k}")
        nz = w[w != 0] if self.has_zero else w.flatten()
        if nz.numel() == 0:
            nz = torch.zeros(1)
        c = self.init_centroids(nz, min(k, int(nz.numel())))
        self.centroids = nn.Parameter(c.float().sort().values.clone())

    def init_centroids(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return kmeans1d(x, k)

    def codebook(self) -> torch.Tensor:
        c = self.centroids
        return torch.cat([torch.zeros(1, device=c.device), c]) if self.has_zero else c

    def _assign(self, w: torch.Tensor) -> torch.Tensor:
        c = self.centroids.detach()
        order = torch.argsort(c)
        idx = order[nearest_level(w.detach(), c[order])]
        if self.has_zero:
            idx = torch.where(w.detach() == 0, torch.full_like(idx, -1), idx) + 1
        return idx

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        idx = self._assign(w)
        book = self.codebook()
        # Each centroid gets the MEAN of its weights' gradients (Deep Compression sums them; the
        # sum over thousands of weights makes plain SGD diverge at usual learning rates).
        count = torch.bincount(idx.flatten(), minlength=book.numel()).clamp_min(1).to(book.dtype)
        book = book.detach() + (book - book.detach()) / count
        # Value from the codebook plus an STE path to the float weight.
        return book[idx] + (w - w.detach())

    @torch.no_grad()
    def encode(self, w: torch.Tensor) -> QuantizedTensor:
        return QuantizedTensor(codes=self._assign(w).to(_int_dtype(self.bits + 1)), scale=torch.ones(w.shape[0]),
                               bits=self.bits, signed=False, codebook=self.codebook().detach().float().clone())


@QUANTIZERS.register("kmeans", summary="k-means codebook of 2^bits shared values per layer, k-means++ init, "
                                       "centroids fine-tuned by gradient (Deep Compression, Han et al. 2016)")
class KMeansQuantizer(CodebookQuantizer):
    pass


# --- activations ---------------------------------------------------------------------------
class ActQuantizer(nn.Module):
    """Unsigned/signed uniform fake-quantizer for activations with an EMA range (QAT, STE).

    Inserted before a layer (``layer.act_quant``, called by a forward pre-hook).
    """

    def __init__(self, bits: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.bits = bits
        self.momentum = momentum
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not bool(self.initialized):
            lo, hi = x.detach().min(), x.detach().max()
            if not bool(self.initialized):
                self.lo.copy_(lo); self.hi.copy_(hi); self.initialized.fill_(True)
            else:
                self.lo.mul_(1 - self.momentum).add_(self.momentum * lo)
                self.hi.mul_(1 - self.momentum).add_(self.momentum * hi)
        lo = torch.minimum(self.lo, torch.zeros_like(self.lo))
        hi = torch.maximum(self.hi, lo + 1e-6)
        levels = 2 ** self.bits - 1
        s = (hi - lo) / levels
        zp = torch.round(-lo / s)
        q = torch.clamp(ste_round(x / s) + zp, 0, levels)
        return (q - zp) * s

    def qparams(self) -> tuple[float, int]:
        """(scale, zero_point) for an unsigned ``bits`` integer encoding."""
        lo = min(float(self.lo), 0.0)
        hi = max(float(self.hi), lo + 1e-6)
        s = (hi - lo) / (2 ** self.bits - 1)
        return s, int(round(-lo / s))


def _optimal_gaussian_step(bits: int, half: bool) -> float:
    """Step of the MSE-optimal uniform quantizer of a unit (half-)Gaussian with ``bits``.

    Half-wave (ReLU output of N(0, 1)): levels ``{0, d, ..., (2**bits - 1) d}``; full-wave:
    ``2**bits - 1`` levels symmetric around 0. Found by a fine grid search on a numerical
    integral (a one-off cost of milliseconds).
    """
    x = torch.linspace(0 if half else -8, 8, 20001, dtype=torch.float64)
    pdf = torch.exp(-x ** 2 / 2)
    pdf = pdf / pdf.sum()
    n = 2 ** bits - 1 if half else 2 ** (bits - 1) - 1
    best, best_err = 1.0, float("inf")
    for d in torch.linspace(0.005, 4.0, 800, dtype=torch.float64):
        q = torch.clamp(torch.round(x / d), -n if not half else 0, n) * d
        err = float((((x - q) ** 2) * pdf).sum())
        if err < best_err:
            best, best_err = float(d), err
    return best


_HWGQ_STEP: dict[tuple[int, bool], float] = {}


class HWGQActQuantizer(nn.Module):
    """Half-wave Gaussian quantizer (Cai et al. 2017): clip ReLU outputs at the MSE-optimal
    point for a half-Gaussian of the observed scale, uniform levels below it.

    The pre-activation std ``sigma`` is estimated as ``sqrt(2 E[x^2])`` of the ReLU output
    (EMA over training batches); step = ``sigma * d*(bits)``. Inputs with negative values
    (a first layer) use the full-Gaussian optimum symmetric around 0 instead.
    """

    def __init__(self, bits: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.bits = bits
        self.momentum = momentum
        self.register_buffer("sigma", torch.tensor(1.0))
        self.register_buffer("signed", torch.tensor(False))
        self.register_buffer("initialized", torch.tensor(False))

    def unit_step(self) -> float:
        key = (self.bits, not bool(self.signed))
        if key not in _HWGQ_STEP:
            _HWGQ_STEP[key] = _optimal_gaussian_step(self.bits, half=key[1])
        return _HWGQ_STEP[key]

    def _levels(self) -> tuple[int, int]:
        if bool(self.signed):
            n = 2 ** (self.bits - 1) - 1
            return -n, n
        return 0, 2 ** self.bits - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not bool(self.initialized):
            xd = x.detach()
            if not bool(self.initialized):
                self.signed.fill_(bool((xd < 0).any()))
            sig = xd.std() if bool(self.signed) else (2 * (xd.clamp_min(0) ** 2).mean()).sqrt()
            sig = sig.clamp_min(1e-8)
            if not bool(self.initialized):
                self.sigma.copy_(sig); self.initialized.fill_(True)
            else:
                self.sigma.mul_(1 - self.momentum).add_(self.momentum * sig)
        s = self.sigma * self.unit_step()
        lo, hi = self._levels()
        return torch.clamp(ste_round(x / s), lo, hi) * s

    def qparams(self) -> tuple[float, int]:
        """(scale, zero_point); unsigned codes when the input is a ReLU output."""
        s = float(self.sigma) * self.unit_step()
        return s, (2 ** (self.bits - 1) if bool(self.signed) else 0)


class LSQActQuantizer(nn.Module):
    """Activation quantizer with a learned step size (LSQ, Esser et al. 2020).

    Unsigned ``[0, 2**bits - 1]`` for non-negative inputs, signed otherwise (decided on the
    first batch, which also initialises ``step = 2 mean|x| / sqrt(qmax)``).
    """

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("signed", torch.tensor(False))
        self.register_buffer("initialized", torch.tensor(False))

    def _range(self) -> tuple[int, int]:
        if bool(self.signed):
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return 0, 2 ** self.bits - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.initialized):
            with torch.no_grad():
                self.signed.fill_(bool((x < 0).any()))
                qmax = self._range()[1]
                self.step.copy_((2 * x.abs().mean() / qmax ** 0.5).clamp_min(1e-6))
                self.initialized.fill_(True)
        lo, hi = self._range()
        g = 1.0 / (x[0].numel() * hi) ** 0.5
        s = ((self.step - self.step * g).detach() + self.step * g).abs().clamp_min(1e-8)
        return torch.clamp(ste_round(x / s), lo, hi) * s

    def qparams(self) -> tuple[float, int]:
        return float(self.step.abs()), (2 ** (self.bits - 1) if bool(self.signed) else 0)


#: Activation quantizers by name: ``cls(bits) -> nn.Module`` with ``forward`` and ``qparams``.
ACT_QUANTIZERS: Registry[type[nn.Module]] = Registry("activation quantizer")
ACT_QUANTIZERS.add("uniform", ActQuantizer, summary="uniform affine, EMA min/max range, STE (PTQ/QAT)")
ACT_QUANTIZERS.add("hwgq", HWGQActQuantizer,
                   summary="half-wave Gaussian: clip ReLU outputs at the optimal half-Gaussian point (Cai et al. 2017)")
ACT_QUANTIZERS.add("lsq", LSQActQuantizer, summary="uniform with learned step size (LSQ, Esser et al. 2020)")


def _act_pre_hook(module: nn.Module, args: tuple) -> tuple:
    return (module.act_quant(args[0]),) + tuple(args[1:])


def attach_act_quant_(module: nn.Module, bits: int, method: str = "uniform") -> nn.Module:
    """Quantize ``module``'s input activations to ``bits`` with ``method`` (``ACT_QUANTIZERS``).

    Example:
        >>> lin = nn.Linear(4, 2)
        >>> aq = attach_act_quant_(lin, 4, "hwgq")
        >>> lin(torch.rand(3, 4)).shape
        torch.Size([3, 2])
    """
    aq = ACT_QUANTIZERS.get(method)(bits)
    module.act_quant = aq
    module.register_forward_pre_hook(_act_pre_hook)
    return aq


def attach_weight_quant_(module: nn.Module, quantizer: str, bits: int) -> WeightQuantizer:
    """Fake-quantize ``module.weight`` with the named quantizer (a parametrization)."""

    q = QUANTIZERS.get(quantizer)(bits, module.weight.detach())
    parametrize.register_parametrization(module, "weight", q)
    return q


def weight_quantizer(module: nn.Module) -> WeightQuantizer | None:
    """The quantizer attached to ``module.weight``, if any."""
    plist = getattr(getattr(module, "parametrizations", None), "weight", None)
    if plist is None:
        return None
    for p in plist:
        if isinstance(p, WeightQuantizer):
            return p
    return None


def raw_weight(module: nn.Module) -> torch.Tensor:
    """The float weight before any parametrization (quantization, masks)."""
    plist = getattr(getattr(module, "parametrizations", None), "weight", None)
    return plist.original if plist is not None else module.weight
