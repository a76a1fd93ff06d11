"""Weight and activation quantizers.

A weight quantizer is an ``nn.Module`` registered as a ``torch.nn.utils.parametrize``
parametrization of a layer's ``weight``: ``forward(w)`` returns the fake-quantized weight
(gradients pass by the straight-through estimator), ``encode(w)`` returns the integers the
layer really stores (:class:`QuantizedTensor`), which the packer and the exporters use.

Every quantizer registered in :data:`QUANTIZERS` takes ``(bits, weight)`` in its constructor
and must pass ``tests/test_quantizer_contract.py``.

Example:
    >>> import torch
    >>> q = QUANTIZERS.get("uniform")(4, torch.randn(8, 3, 3, 3))
    >>> qt = q.encode(torch.randn(8, 3, 3, 3))
    >>> int(qt.codes.abs().max()) <= 7
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .registry import Registry


@dataclass
class QuantizedTensor:
    """What a quantized weight stores.

    ``values = scale[c] * codes`` (``codebook is None``, ``scale`` per output channel, shape
    ``[O]``) or ``values = scale[c] * codebook[codes]`` (weight sharing / non-uniform levels).
    ``codes`` are signed integers in ``[-(2**(bits-1)), 2**(bits-1) - 1]`` when ``signed``,
    else ``[0, 2**bits - 1]``; they have the weight's shape.
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


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """round() with identity gradient (straight-through estimator)."""
    return (x.round() - x).detach() + x


def _per_channel_absmax(w: torch.Tensor) -> torch.Tensor:
    return w.detach().abs().reshape(w.shape[0], -1).amax(dim=1).clamp_min(1e-8)


class WeightQuantizer(nn.Module):
    """Base class: per-output-channel symmetric quantizer with STE."""

    signed = True

    def __init__(self, bits: int, weight: torch.Tensor) -> None:
        super().__init__()
        if not 1 <= bits <= 16:
            raise ValueError(f"`1 <= bits <= 16` must hold, but got bits={bits}")
        self.bits = bits

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.bits > 1 else 1

    def scale(self, w: torch.Tensor) -> torch.Tensor:  # [O]
        return _per_channel_absmax(w) / self.qmax

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        s = self.scale(w).reshape((-1,) + (1,) * (w.dim() - 1))
        q = torch.clamp(ste_round(w / s), -self.qmax - (0 if self.bits == 1 else 1), self.qmax)
        return q * s

    @torch.no_grad()
    def encode(self, w: torch.Tensor) -> QuantizedTensor:
        s = self.scale(w).detach()
        q = torch.clamp(torch.round(w / s.reshape((-1,) + (1,) * (w.dim() - 1))),
                        -self.qmax - (0 if self.bits == 1 else 1), self.qmax)
        return QuantizedTensor(codes=q.to(torch.int8 if self.bits <= 8 else torch.int16), scale=s.float(),
                               bits=self.bits)


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
        s = self.scale(w).abs().clamp_min(1e-8).reshape((-1,) + (1,) * (w.dim() - 1))
        q = torch.clamp(ste_round(w / s), -self.qmax - (0 if self.bits == 1 else 1), self.qmax)
        return q * s


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


def _act_pre_hook(module: nn.Module, args: tuple) -> tuple:
    return (module.act_quant(args[0]),) + tuple(args[1:])


def attach_act_quant_(module: nn.Module, bits: int) -> ActQuantizer:
    """Quantize ``module``'s input activations to ``bits`` (fake-quant, QAT-ready)."""
    aq = ActQuantizer(bits)
    module.act_quant = aq
    module.register_forward_pre_hook(_act_pre_hook)
    return aq


def attach_weight_quant_(module: nn.Module, quantizer: str, bits: int) -> WeightQuantizer:
    """Fake-quantize ``module.weight`` with the named quantizer (a parametrization)."""
    from torch.nn.utils import parametrize

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
