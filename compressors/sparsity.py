"""Unstructured sparsity: a weight mask kept as a parametrization (``weight = original * mask``).

Methods (registry :data:`SPARSITY_METHODS`) decide the mask: ``magnitude`` (Han et al. 2015)
zeroes the smallest weights once; during fine-tune the mask stays fixed. Other methods (e.g.
dynamic network surgery) update ``mask`` during training via ``update(original)``.

Example:
    >>> from torch import nn
    >>> lin = nn.Linear(100, 10)
    >>> m = attach_mask_(lin, 0.9)
    >>> int((lin.weight == 0).sum())
    900
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from .registry import Registry


class WeightMask(nn.Module):
    """Binary mask parametrization; ``mask`` is a buffer saved with the model."""

    def __init__(self, weight: torch.Tensor, sparsity: float) -> None:
        super().__init__()
        self.sparsity = sparsity
        self.register_buffer("mask", magnitude_mask(weight.detach(), sparsity))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask

    @torch.no_grad()
    def update(self, original: torch.Tensor) -> None:  # fixed mask: nothing to do
        return None


def n_zero(numel: int, sparsity: float) -> int:
    """Number of weights zeroed: ``floor(numel * sparsity)`` (the size model's rule)."""
    return int(math.floor(numel * sparsity + 1e-9))


def magnitude_mask(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = n_zero(w.numel(), sparsity)
    mask = torch.ones_like(w)
    if k > 0:
        idx = torch.argsort(w.abs().flatten())[:k]
        mask.view(-1)[idx] = 0
    return mask


#: ``cls(weight, sparsity) -> WeightMask`` by name.
SPARSITY_METHODS: Registry[Callable[[torch.Tensor, float], WeightMask]] = Registry("sparsity method")
SPARSITY_METHODS.add("magnitude", WeightMask, summary="magnitude pruning with retraining, fixed mask (Han et al. 2015)")


@SPARSITY_METHODS.register("dns", summary="dynamic network surgery: prune and splice during training (Guo et al. 2016)")
class DNSMask(WeightMask):
    """Dynamic network surgery: the mask follows the dense weights during training.

    The layer keeps its dense weights and trains all of them: the forward pass uses
    ``w * mask`` but the gradient reaches every weight (straight-through), so a weight pruned
    by mistake can grow back. :meth:`update` (called every ``interval`` steps from
    :func:`sparsity_step_hook`) re-decides the mask with hysteresis: an active weight is cut
    when ``|w| < a`` and a cut weight is spliced back when ``|w| > b = (1 + margin) a``, where
    ``a`` is chosen so that exactly ``n_zero(numel, sparsity)`` weights stay cut (the size
    model's count holds at every step).
    """

    def __init__(self, weight: torch.Tensor, sparsity: float, *, margin: float = 0.1, interval: int = 1) -> None:
        super().__init__(weight, sparsity)
        self.margin = margin
        self.interval = interval

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return w * self.mask
        return w + (w * self.mask - w).detach()  # value w * mask, gradient to the dense w

    @torch.no_grad()
    def update(self, original: torch.Tensor) -> int:
        """Re-decide the mask from the dense weights; returns how many weights were spliced back."""
        k = n_zero(original.numel(), self.sparsity)
        if k == 0:
            return 0
        # Hysteresis: active weights look (1 + margin) times larger, so a cut weight must beat
        # the threshold by that margin to come back, and tiny fluctuations do not flip masks.
        score = original.abs() * (1.0 + self.margin * self.mask)
        new = torch.ones_like(self.mask)
        new.view(-1)[torch.argsort(score.flatten())[:k]] = 0
        spliced = int(((new > 0) & (self.mask == 0)).sum())
        self.mask.copy_(new)
        return spliced


def sparsity_step_hook(model: nn.Module, *, interval: int = 1) -> Callable[[nn.Module, int], None]:
    """A ``train(..., step_hook=)`` callback that updates every dynamic mask of ``model``.

    Fixed masks (``magnitude``) ignore it, so it is safe to pass always.

    Example:
        >>> from torch import nn
        >>> lin = nn.Linear(20, 5)
        >>> m = attach_mask_(lin, 0.5, "dns")
        >>> hook = sparsity_step_hook(lin)
        >>> hook(lin, 1); int((lin.weight == 0).sum())
        50
    """
    def hook(m: nn.Module, step: int) -> None:
        for mod in model.modules():
            wm = weight_mask(mod)
            if isinstance(wm, DNSMask) and step % max(1, wm.interval * interval) == 0:
                wm.update(mod.parametrizations.weight.original)
    return hook


def attach_mask_(module: nn.Module, sparsity: float, method: str = "magnitude") -> WeightMask:
    m = SPARSITY_METHODS.get(method)(module.weight.detach(), sparsity)
    parametrize.register_parametrization(module, "weight", m)
    return m


def weight_mask(module: nn.Module) -> WeightMask | None:
    plist = getattr(getattr(module, "parametrizations", None), "weight", None)
    if plist is None:
        return None
    return next((p for p in plist if isinstance(p, WeightMask)), None)
