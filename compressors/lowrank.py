"""Low-rank decomposition of conv/linear layers (a layer becomes an ``nn.Sequential`` of factors).

A decomposed layer ``X`` keeps its FQN: it is replaced by ``nn.Sequential`` whose children
(``X.0``, ``X.1``...) are the factors, so policies keyed by FQN still apply (the factors
inherit ``X``'s bits and sparsity).

Example:
    >>> import torch
    >>> from torch import nn
    >>> conv = nn.Conv2d(16, 32, 3, padding=1)
    >>> seq = DECOMPOSITIONS.get("svd")(conv, 0.25)
    >>> [type(m).__name__ for m in seq]
    ['Conv2d', 'Conv2d']
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .registry import Registry

#: ``fn(layer, rank_ratio) -> nn.Sequential`` of factor layers.
DECOMPOSITIONS: Registry[Callable[[nn.Module, float], nn.Sequential]] = Registry("decomposition")


def svd_rank(out_channels: int, in_channels: int, kh: int = 1, kw: int = 1, groups: int = 1,
             rank_ratio: float = 1.0) -> int:
    """Rank kept by SVD: ``max(1, round(rank_ratio * min(out, in/groups*kh*kw)))``."""
    full = min(out_channels, in_channels // groups * kh * kw)
    return max(1, int(round(rank_ratio * full)))


@DECOMPOSITIONS.register("svd", summary="truncated SVD: kxk conv to r channels, then 1x1 conv (two factors)")
def svd_decompose(layer: nn.Module, rank_ratio: float) -> nn.Sequential:
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            w = layer.weight.detach()
            r = svd_rank(layer.out_features, layer.in_features, rank_ratio=rank_ratio)
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            sq = s[:r].sqrt()
            a = nn.Linear(layer.in_features, r, bias=False)
            b = nn.Linear(r, layer.out_features, bias=layer.bias is not None)
            a.weight.copy_(sq[:, None] * vh[:r])
            b.weight.copy_(u[:, :r] * sq[None, :])
            if layer.bias is not None:
                b.bias.copy_(layer.bias)
            return nn.Sequential(a, b)
        if not isinstance(layer, nn.Conv2d) or layer.groups != 1:
            raise ValueError(f"svd decomposition needs a Linear or a non-grouped Conv2d, got {layer}")
        o, i, kh, kw = layer.weight.shape
        r = svd_rank(o, i, kh, kw, 1, rank_ratio)
        w = layer.weight.detach().reshape(o, i * kh * kw)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        sq = s[:r].sqrt()
        first = nn.Conv2d(i, r, (kh, kw), layer.stride, layer.padding, layer.dilation, bias=False,
                          padding_mode=layer.padding_mode)
        second = nn.Conv2d(r, o, 1, bias=layer.bias is not None)
        first.weight.copy_((sq[:, None] * vh[:r]).reshape(r, i, kh, kw))
        second.weight.copy_((u[:, :r] * sq[None, :]).reshape(o, r, 1, 1))
        if layer.bias is not None:
            second.bias.copy_(layer.bias)
        return nn.Sequential(first, second)


def can_decompose(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.groups == 1)
