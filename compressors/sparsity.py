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


def attach_mask_(module: nn.Module, sparsity: float, method: str = "magnitude") -> WeightMask:
    from torch.nn.utils import parametrize

    m = SPARSITY_METHODS.get(method)(module.weight.detach(), sparsity)
    parametrize.register_parametrization(module, "weight", m)
    return m


def weight_mask(module: nn.Module) -> WeightMask | None:
    plist = getattr(getattr(module, "parametrizations", None), "weight", None)
    if plist is None:
        return None
    return next((p for p in plist if isinstance(p, WeightMask)), None)
