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


def rank_for_energy(weight: torch.Tensor, energy: float) -> int:
    """Smallest rank keeping ``energy`` of the squared singular values of ``weight`` (O x rest).

    Example:
        >>> w = torch.diag(torch.tensor([3.0, 1.0, 0.1]))
        >>> rank_for_energy(w, 0.8), rank_for_energy(w, 0.9999)
        (1, 3)
    """
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"`0 < energy <= 1` must hold, but got energy={energy}")
    s = torch.linalg.svdvals(weight.detach().reshape(weight.shape[0], -1).float())
    cum = torch.cumsum(s**2, 0) / (s**2).sum().clamp_min(1e-30)
    return int(min(len(s), int(torch.searchsorted(cum, torch.tensor(energy - 1e-9)).item()) + 1))


def ratio_for_energy(weight: torch.Tensor, energy: float) -> float:
    """``rank_ratio`` for a policy such that :func:`svd_rank` gives :func:`rank_for_energy`'s rank."""
    full = min(weight.shape[0], weight[0].numel())
    return rank_for_energy(weight, energy) / full


def tucker2_ranks(out_channels: int, in_channels: int, rank_ratio: float) -> tuple[int, int]:
    """(output rank, input rank) of Tucker-2: ``max(1, round(rank_ratio * C))`` per mode."""
    return (max(1, int(round(rank_ratio * out_channels))), max(1, int(round(rank_ratio * in_channels))))


def _unfold(t: torch.Tensor, mode: int) -> torch.Tensor:
    return t.movedim(mode, 0).reshape(t.shape[mode], -1)


def _linear_or_check(layer: nn.Module, method: str) -> bool:
    """True for a Linear (conv-only methods fall back to SVD); raise unless a non-grouped Conv2d."""
    if isinstance(layer, nn.Linear):
        return True
    if not isinstance(layer, nn.Conv2d) or layer.groups != 1:
        raise ValueError(f"{method} decomposition needs a Linear or a non-grouped Conv2d, got {layer}")
    return False


def _leading(m: torch.Tensor, r: int) -> torch.Tensor:
    u, _, _ = torch.linalg.svd(m, full_matrices=False)
    return u[:, :r]


@DECOMPOSITIONS.register("tucker2", summary="Tucker-2 (HOSVD + HOOI): 1x1 in-projection, kxk core, 1x1 out-projection")
def tucker2_decompose(layer: nn.Module, rank_ratio: float, *, hooi_iters: int = 5) -> nn.Sequential:
    """Tucker-2 on the channel modes of a conv (Kim et al. 2016); linear layers fall back to SVD."""
    if _linear_or_check(layer, "tucker2"):
        return svd_decompose(layer, rank_ratio)
    with torch.no_grad():
        w = layer.weight.detach().double()
        o, i, kh, kw = w.shape
        ro, ri = tucker2_ranks(o, i, rank_ratio)
        u_out, u_in = _leading(_unfold(w, 0), ro), _leading(_unfold(w, 1), ri)  # HOSVD init
        for _ in range(hooi_iters):  # HOOI refinement: each factor against the other's projection
            u_out = _leading(_unfold(torch.einsum("oihw,ir->orhw", w, u_in), 0), ro)
            u_in = _leading(_unfold(torch.einsum("oihw,or->rihw", w, u_out), 1), ri)
        core = torch.einsum("oihw,or,is->rshw", w, u_out, u_in)
        first = nn.Conv2d(i, ri, 1, bias=False)
        mid = nn.Conv2d(ri, ro, (kh, kw), layer.stride, layer.padding, layer.dilation, bias=False,
                        padding_mode=layer.padding_mode)
        last = nn.Conv2d(ro, o, 1, bias=layer.bias is not None)
        first.weight.copy_(u_in.T.reshape(ri, i, 1, 1).float())
        mid.weight.copy_(core.float())
        last.weight.copy_(u_out.reshape(o, ro, 1, 1).float())
        if layer.bias is not None:
            last.bias.copy_(layer.bias)
    return nn.Sequential(first, mid, last)


def cp_rank(out_channels: int, in_channels: int, kh: int, kw: int, rank_ratio: float) -> int:
    """CP rank: same rule as :func:`svd_rank` (``rank_ratio`` of ``min(O, I*kh*kw)``)."""
    return svd_rank(out_channels, in_channels, kh, kw, 1, rank_ratio)


def cp_als(w: torch.Tensor, rank: int, *, iters: int = 30, seed: int = 0) -> list[torch.Tensor]:
    """Rank-``rank`` CP factors ``[A (O x R), B (I x R), C (kh x R), D (kw x R)]`` of a 4-D tensor by ALS."""
    g = torch.Generator().manual_seed(seed)
    w = w.double()
    factors = []
    for mode in range(4):
        u, s, _ = torch.linalg.svd(_unfold(w, mode), full_matrices=False)
        f = torch.randn(w.shape[mode], rank, generator=g, dtype=torch.float64) * 0.1
        r = min(rank, u.shape[1])
        f[:, :r] += u[:, :r] * s[:r].sqrt() / s[0].sqrt()
        factors.append(f)
    eqs = ["oihw,ir,hr,wr->or", "oihw,or,hr,wr->ir", "oihw,or,ir,wr->hr", "oihw,or,ir,hr->wr"]
    eye = torch.eye(rank, dtype=torch.float64)
    for _ in range(iters):
        for mode in range(4):
            others = [factors[m] for m in range(4) if m != mode]
            gram = others[0].T @ others[0] * (others[1].T @ others[1]) * (others[2].T @ others[2])
            mttkrp = torch.einsum(eqs[mode], w, *others)
            # Tiny ridge: CP-ALS normal equations are often ill-conditioned (degenerate components).
            factors[mode] = torch.linalg.solve(gram + 1e-9 * gram.diagonal().mean() * eye, mttkrp.T).T
    return factors


@DECOMPOSITIONS.register("cp", summary="CP (ALS): 1x1, kx1 depthwise, 1xk depthwise, 1x1 (four factors)")
def cp_decompose(layer: nn.Module, rank_ratio: float, *, iters: int = 30) -> nn.Sequential:
    """CP decomposition of a conv (Lebedev et al. 2015); linear layers fall back to SVD."""
    if _linear_or_check(layer, "cp"):
        return svd_decompose(layer, rank_ratio)
    with torch.no_grad():
        o, i, kh, kw = layer.weight.shape
        r = cp_rank(o, i, kh, kw, rank_ratio)
        a, b, c, d = cp_als(layer.weight.detach(), r, iters=iters)
        # Balance the scale between the factors (each column of A absorbs the norms of B, C, D).
        nb, nc, nd = b.norm(dim=0).clamp_min(1e-12), c.norm(dim=0).clamp_min(1e-12), d.norm(dim=0).clamp_min(1e-12)
        b, c, d, a = b / nb, c / nc, d / nd, a * (nb * nc * nd)
        (sh, sw), (ph, pw), (dh, dw) = layer.stride, layer.padding, layer.dilation
        pad = layer.padding_mode
        f1 = nn.Conv2d(i, r, 1, bias=False)
        f2 = nn.Conv2d(r, r, (kh, 1), (sh, 1), (ph, 0), (dh, 1), groups=r, bias=False, padding_mode=pad)
        f3 = nn.Conv2d(r, r, (1, kw), (1, sw), (0, pw), (1, dw), groups=r, bias=False, padding_mode=pad)
        f4 = nn.Conv2d(r, o, 1, bias=layer.bias is not None)
        f1.weight.copy_(b.T.reshape(r, i, 1, 1).float())
        f2.weight.copy_(c.T.reshape(r, 1, kh, 1).float())
        f3.weight.copy_(d.T.reshape(r, 1, 1, kw).float())
        f4.weight.copy_(a.reshape(o, r, 1, 1).float())
        if layer.bias is not None:
            f4.bias.copy_(layer.bias)
    return nn.Sequential(f1, f2, f3, f4)
