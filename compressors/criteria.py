"""Structured-pruning criteria: the registry :data:`PRUNING_CRITERIA` and every criterion in it.

* ``l1``, ``l2``, ``random`` — Torch-Pruning's magnitude and random importances.

* ``bn_scale`` — network slimming (Liu et al. 2017): |gamma| of the group's BatchNorms
  (train with the ``slimming`` regulariser to push unimportant gammas to zero).
* ``taylor`` — first-order Taylor expansion of the loss on BN scale and shift
  (|gamma dL/dgamma + beta dL/dbeta|, accumulated over batches; Molchanov et al. 2019);
  layers without BN use their weights (|sum w dL/dw| per output channel).
* ``saliency`` — gradient-times-weight |w dL/dw| of every weight a channel carries,
  accumulated over training batches and normalised per group, for one *global* rate
  (``PruningConfig.global_ratio``) that yields per-layer rates automatically.
* ``hardware_balanced`` — magnitude divided by the channel's cost, with conv groups costed
  by MACs and fully-connected groups by parameters, each kind pruned to the global rate
  separately (so FC layers lose parameters and convs lose computation).
* ``lasso`` — LASSO channel selection with least-squares feature reconstruction of the
  next layer (He et al. 2017) on sampled activations.

Data-driven criteria read up to ``ctx.batches`` batches of ``ctx.data`` (a
:class:`~evaluators.datasets.TensorData` or any iterable of ``(x, y)``); without data they
fall back to L1 (enough to replay a resolved policy's shapes on a fresh model).

Example:
    >>> from squeezer.compressors.pruning import PRUNING_CRITERIA
    >>> all(n in PRUNING_CRITERIA for n in ("bn_scale", "taylor", "saliency", "hardware_balanced", "lasso"))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner import function as F

from .registry import Registry


@dataclass
class PruneContext:
    """What a criterion may use: the model, a few batches of training data and the loss."""

    model: nn.Module
    data: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = nn.functional.cross_entropy
    batches: int = 8
    config: Any = None
    input_shape: tuple[int, ...] | None = None
    groups: Any = None  # compressors.pruning.ChannelGroups


#: Importance criteria: ``factory(ctx) -> callable(group) -> 1-D scores`` (higher = keep).
PRUNING_CRITERIA: Registry[Callable[[PruneContext], Callable[[Any], torch.Tensor]]] = Registry("pruning criterion")


@PRUNING_CRITERIA.register("l1", summary="L1 norm of the coupled weights (Li et al. 2017)")
def _l1(ctx: PruneContext):
    return tp.importance.GroupMagnitudeImportance(p=1)


@PRUNING_CRITERIA.register("l2", summary="L2 norm of the coupled weights")
def _l2(ctx: PruneContext):
    return tp.importance.GroupMagnitudeImportance(p=2)


@PRUNING_CRITERIA.register("random", summary="random channels (a baseline)")
def _random(ctx: PruneContext):
    return tp.importance.RandomImportance()


def normalize_group_scores(scores: torch.Tensor) -> torch.Tensor:
    """Scores divided by their group mean, so groups of different layers compare (global ranking)."""
    m = scores.abs().mean()
    return scores / m if float(m) > 0 else torch.ones_like(scores)



_BN = nn.modules.batchnorm._BatchNorm


def iter_batches(data: Any, n: int, batch_size: int = 128) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Up to ``n`` ``(x, y)`` batches from a TensorData-like object or an iterable of batches."""
    if data is None:
        return
    it = data.batches(batch_size, shuffle=True, seed=0) if hasattr(data, "batches") else iter(data)
    for i, (xb, yb) in enumerate(it):
        if i >= n:
            break
        yield xb, yb


def _fns():
    return F


class _Accumulating:
    """Base: runs backward passes over ``ctx.data`` in :meth:`prepare` (eval mode: BN stats untouched)."""

    def __init__(self) -> None:
        self.ready = False

    def accumulate(self, model: nn.Module) -> None:  # after each backward
        raise NotImplementedError

    def prepare(self, ctx: PruneContext) -> None:
        if ctx.data is None:
            return
        model = ctx.model
        was = model.training
        model.eval()  # batch statistics would move the running stats the model keeps
        saved = [(p, p.grad) for p in model.parameters()]
        try:
            n = 0
            for xb, yb in iter_batches(ctx.data, ctx.batches):
                model.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    ctx.loss_fn(model(xb), yb).backward()
                self.accumulate(model)
                n += 1
            self.ready = n > 0
        finally:
            for p, g in saved:
                p.grad = g
            model.train(was)

    def __call__(self, group) -> torch.Tensor | None:
        if not self.ready:
            return None
        return self.score(group)

    def score(self, group) -> torch.Tensor | None:
        raise NotImplementedError


def _reduce(items: list[tuple[torch.Tensor, list[int]]], size: int) -> torch.Tensor | None:
    if not items:
        return None
    out = torch.zeros(size)
    for imp, root_idxs in items:
        if any(r is None for r in root_idxs):
            continue
        out.scatter_add_(0, torch.tensor(root_idxs), imp.detach().float().cpu())
    return out


# --- network slimming ------------------------------------------------------------------------

@PRUNING_CRITERIA.register("bn_scale", summary="BN scaling factor |gamma| (network slimming, Liu et al. 2017)")
def _bn_scale(ctx: PruneContext):
    return tp.importance.BNScaleImportance()


# --- first-order Taylor on BN scale and shift -------------------------------------------------

class TaylorBNImportance(_Accumulating):
    """|gamma dL/dgamma + beta dL/dbeta| per channel, |.| per batch then summed over batches."""

    def __init__(self) -> None:
        super().__init__()
        self.bn: dict[nn.Module, torch.Tensor] = {}
        self.out: dict[nn.Module, torch.Tensor] = {}

    def accumulate(self, model: nn.Module) -> None:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, _BN) and m.affine and m.weight.grad is not None:
                    t = (m.weight * m.weight.grad + m.bias * m.bias.grad).abs()
                    self.bn[m] = self.bn.get(m, 0) + t
                elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.grad is not None:
                    t = (m.weight * m.weight.grad).flatten(1).sum(1)
                    if m.bias is not None and m.bias.grad is not None:
                        t = t + m.bias * m.bias.grad
                    self.out[m] = self.out.get(m, 0) + t.abs()

    def score(self, group) -> torch.Tensor | None:
        F = _fns()
        size = len(group[0].idxs)
        bn_items, w_items = [], []
        for item in group:
            dep, idxs = item.dep, item.idxs
            layer, fn = dep.target.module, dep.handler
            if fn == F.prune_batchnorm_out_channels and layer in self.bn:
                bn_items.append((self.bn[layer][idxs], item.root_idxs))
            elif fn in (F.prune_conv_out_channels, F.prune_linear_out_channels) and layer in self.out:
                w_items.append((self.out[layer][idxs], item.root_idxs))
        return _reduce(bn_items or w_items, size)


@PRUNING_CRITERIA.register("taylor", summary="first-order Taylor on BN scale and shift, over data batches (Molchanov et al. 2019)")
def _taylor(ctx: PruneContext):
    return TaylorBNImportance()


# --- global gradient x weight saliency ---------------------------------------------------------

class SaliencyImportance(_Accumulating):
    """Gradient-times-weight saliency of a channel, accumulated over training batches.

    Per batch, for every layer a channel touches (its producer's output weights and bias,
    its BatchNorm scale and shift, its consumers' input weights) the first-order estimate of
    the loss change when those weights vanish, ``|sum w dL/dw|``, is taken per channel; the
    magnitudes are summed over layers and batches (Molchanov et al. 2017, generalised to
    coupled groups). Per-weight ``|w dL/dw|`` would mostly add up gradient noise.
    """

    def __init__(self) -> None:
        super().__init__()
        self.acc: dict[tuple[nn.Module, str], torch.Tensor] = {}

    def accumulate(self, model: nn.Module) -> None:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, _BN) and m.affine and m.weight.grad is not None:
                    self._add((m, "bn"), (m.weight * m.weight.grad + m.bias * m.bias.grad).abs())
                elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.grad is not None:
                    wg = m.weight * m.weight.grad
                    out = wg.flatten(1).sum(1)
                    if m.bias is not None and m.bias.grad is not None:
                        out = out + m.bias * m.bias.grad
                    self._add((m, "out"), out.abs())
                    self._add((m, "in"), wg.transpose(0, 1).flatten(1).sum(1).abs())

    def _add(self, key, t: torch.Tensor) -> None:
        self.acc[key] = self.acc.get(key, 0) + t

    def score(self, group) -> torch.Tensor | None:
        F = _fns()
        size = len(group[0].idxs)
        items = []
        for item in group:
            dep, idxs = item.dep, item.idxs
            layer, fn = dep.target.module, dep.handler
            if fn in (F.prune_conv_out_channels, F.prune_linear_out_channels) and (layer, "out") in self.acc:
                imp = self.acc[(layer, "out")][idxs]
            elif fn in (F.prune_conv_in_channels, F.prune_linear_in_channels) and (layer, "in") in self.acc:
                imp = self.acc[(layer, "in")]
                if fn == F.prune_conv_in_channels and layer.groups not in (1, layer.in_channels):
                    imp = imp.repeat(layer.groups)
                imp = imp[idxs]
            elif fn == F.prune_batchnorm_out_channels and (layer, "bn") in self.acc:
                imp = self.acc[(layer, "bn")][idxs]
            else:
                continue
            items.append((imp, item.root_idxs))
        return _reduce(items, size)

    def global_scores(self, gid: str, scores: torch.Tensor) -> torch.Tensor:
        return normalize_group_scores(scores)


@PRUNING_CRITERIA.register("saliency", summary="gradient-x-weight saliency |sum w dL/dw| over training data, normalised per group; "
                                               "one global_ratio yields per-layer ratios")
def _saliency(ctx: PruneContext):
    return SaliencyImportance()


# --- hardware-balanced ------------------------------------------------------------------------

class HardwareBalancedImportance:
    """L1 importance per unit cost: conv groups costed by MACs, FC groups by parameters."""

    def __init__(self, ctx: PruneContext) -> None:
        self.l1 = tp.importance.GroupMagnitudeImportance(p=1, normalizer=None)
        self.cost: dict[str, float] = {}
        self.kind: dict[str, str] = {}

    def prepare(self, ctx: PruneContext) -> None:
        model, cg = ctx.model, ctx.groups
        if cg is None or ctx.input_shape is None:
            return
        macs: dict[str, int] = {}
        names = {m: n for n, m in model.named_modules()}
        hooks = []

        def hook(mod, inp, out):
            hw = out.shape[2] * out.shape[3] if out.dim() == 4 else 1
            macs[names[mod]] = mod.weight.numel() * hw

        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                hooks.append(m.register_forward_hook(hook))
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                p = next(model.parameters())
                model(torch.zeros(1, *ctx.input_shape, device=p.device))
        finally:
            model.train(was)
            for h in hooks:
                h.remove()
        mods = dict(model.named_modules())
        for gid in cg.sizes:
            self.kind[gid] = "linear" if isinstance(mods[gid], nn.Linear) else "conv"
        per: dict[str, float] = {g: 0.0 for g in cg.sizes}
        for segs_by_layer in (cg.out_segments, cg.in_segments):
            for fqn, segs in segs_by_layer.items():
                if fqn not in macs:
                    continue
                total = sum(n for _, n, _ in segs)
                for g, n, size in segs:
                    if g is None or g not in per:
                        continue
                    c = macs[fqn] if self.kind[g] == "conv" else mods[fqn].weight.numel()
                    per[g] += c * n / total / size  # cost of one of the group's channels
        for kind in ("conv", "linear"):
            gs = [g for g in per if self.kind[g] == kind and per[g] > 0]
            if gs:
                mean = sum(per[g] for g in gs) / len(gs)
                for g in gs:
                    self.cost[g] = per[g] / mean

    def __call__(self, group) -> torch.Tensor | None:
        return self.l1(group)

    def pool(self, gid: str) -> str:
        return self.kind.get(gid, "conv")

    def global_scores(self, gid: str, scores: torch.Tensor) -> torch.Tensor:
        return normalize_group_scores(scores) / self.cost.get(gid, 1.0)


@PRUNING_CRITERIA.register("hardware_balanced", summary="L1 per unit cost: conv by MACs, FC by params, "
                                                        "pruned separately to the global rate")
def _hardware_balanced(ctx: PruneContext):
    return HardwareBalancedImportance(ctx)


# --- LASSO channel selection with feature reconstruction (He et al. 2017) -------------------

class LassoImportance:
    """Channel selection by LASSO on the next layers' outputs, then least-squares reconstruction.

    For a group, every consumer layer's output on sampled inputs is split into the
    contributions ``Z_c`` of the group's channels; ``min ||sum_c Z_c - sum_c beta_c Z_c||^2 +
    alpha |beta|_1`` (``beta >= 0``) is solved along the regularisation path (scikit-learn's
    ``lasso_path``) and a channel scores by how long it survives as ``alpha`` grows (ties by
    its final ``beta``). After pruning, each conv/linear consumer fed only by one pruned group
    gets its weights refitted by least squares to the original outputs on the kept channels.
    """

    def __init__(self, rows: int = 2048, seed: int = 0) -> None:
        self.rows, self.seed = rows, seed
        self.x: dict[nn.Module, torch.Tensor] = {}  # consumer -> [R, C_in, k] sampled (unfolded) inputs
        self.ready = False

    def prepare(self, ctx: PruneContext) -> None:
        if ctx.data is None:
            return
        model = ctx.model
        g = torch.Generator().manual_seed(self.seed)
        bufs: dict[nn.Module, list[torch.Tensor]] = {}

        def hook(mod, inp, out):
            x = inp[0].detach()
            if isinstance(mod, nn.Linear):
                bufs.setdefault(mod, []).append(x.reshape(-1, x.shape[-1], 1))
                return
            cols = torch.nn.functional.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)
            n, ck, length = cols.shape
            pick = torch.randint(0, length, (n, 8), generator=g)  # 8 positions per image
            cols = torch.gather(cols, 2, pick[:, None, :].expand(n, ck, 8))
            bufs.setdefault(mod, []).append(cols.permute(0, 2, 1).reshape(n * 8, mod.in_channels // mod.groups, -1))

        hooks = [m.register_forward_hook(hook) for m in model.modules()
                 if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)]
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                seen = 0
                for xb, _ in iter_batches(ctx.data, ctx.batches):
                    model(xb)
                    seen += xb.shape[0] * 8
                    if seen >= self.rows:
                        break
        finally:
            model.train(was)
            for h in hooks:
                h.remove()
        self.x = {m: torch.cat(v)[: self.rows] for m, v in bufs.items()}
        self.ready = bool(self.x)

    def _contributions(self, group) -> tuple[torch.Tensor, int] | None:
        F = _fns()
        size = len(group[0].idxs)
        blocks = []
        for item in group:
            layer, fn = item.dep.target.module, item.dep.handler
            if fn not in (F.prune_conv_in_channels, F.prune_linear_in_channels) or layer not in self.x:
                continue
            x = self.x[layer]                                   # [R, Cin, k]
            w = layer.weight.detach().reshape(layer.weight.shape[0], layer.weight.shape[1], -1)  # [O, Cin, k]
            if x.shape[1] != w.shape[1] or any(r is None for r in item.root_idxs):
                continue
            z = torch.einsum("rck,ock->cro", x, w)              # contribution of each input index
            per = torch.zeros(size, z.shape[1], z.shape[2])
            per.index_add_(0, torch.tensor(item.root_idxs), z[item.idxs])
            blocks.append(per.reshape(size, -1))
        if not blocks:
            return None
        return torch.cat(blocks, 1).T, size                    # [rows, C]

    def __call__(self, group) -> torch.Tensor | None:
        if not self.ready:
            return None
        got = self._contributions(group)
        if got is None:
            return None
        z, size = got
        from sklearn.linear_model import lasso_path

        z = z.double().numpy()
        y = z.sum(1)
        scale = np.abs(z).max() or 1.0
        z, y = z / scale, y / scale
        top = float(np.abs(z.T @ y).max()) / len(y) or 1.0  # smallest alpha with all betas zero
        alphas, coefs, _ = lasso_path(z, y, positive=True, alphas=np.geomspace(top, top * 1e-4, 40))
        alive = coefs > 1e-10                                   # [C, n_alphas], alphas decreasing
        first = np.where(alive.any(1), alive.argmax(1), len(alphas))
        score = (len(alphas) - first).astype(np.float64) + np.clip(coefs[:, -1], 0, None) / (coefs[:, -1].max() + 1e-12)
        return torch.from_numpy(score).float()

    @torch.no_grad()
    def after_prune(self, ctx: PruneContext, dropped: dict[str, list[int]]) -> None:
        """Least-squares refit of consumers whose inputs all come from one pruned group."""
        cg = ctx.groups
        if not self.ready or cg is None:
            return
        names = {m: n for n, m in ctx.model.named_modules()}
        for layer, x in self.x.items():
            fqn = names.get(layer)
            segs = cg.in_segments.get(fqn, [])
            if len(segs) != 1 or segs[0][0] not in dropped or segs[0][1] != segs[0][2]:
                continue
            gid = segs[0][0]
            keep_in = [c for c in range(cg.sizes[gid]) if c not in set(dropped[gid])]
            out_segs = cg.out_segments.get(fqn, [])
            if len(out_segs) != 1:
                continue
            og = out_segs[0][0]
            n_out_old = out_segs[0][1]
            keep_out = [c for c in range(n_out_old) if og is None or c not in set(dropped.get(og, []))]
            w = layer.weight
            if w.shape[0] != len(keep_out) or w.shape[1] != len(keep_in) or x.shape[1] != cg.sizes[gid]:
                continue
            w_old = self._old.get(layer)
            if w_old is None:
                continue
            xf = x.reshape(x.shape[0], x.shape[1], -1)
            y = torch.einsum("rck,ock->ro", xf, w_old[keep_out]).double()
            a = xf[:, keep_in].reshape(x.shape[0], -1).double()
            ridge = 1e-4 * (a * a).sum(0).mean().clamp_min(1e-12) * torch.eye(a.shape[1], dtype=a.dtype)
            sol = torch.linalg.solve(a.T @ a + ridge, a.T @ y)   # [K*k, O]
            w.copy_(sol.T.reshape(w.shape).to(w.dtype))

    def snapshot(self, model: nn.Module) -> None:
        self._old = {m: m.weight.detach().clone().reshape(m.weight.shape[0], m.weight.shape[1], -1)
                     for m in self.x}


class _LassoWithSnapshot(LassoImportance):
    def prepare(self, ctx: PruneContext) -> None:
        super().prepare(ctx)
        self.snapshot(ctx.model)


@PRUNING_CRITERIA.register("lasso", summary="LASSO channel selection + least-squares reconstruction of the next "
                                            "layer (He et al. 2017)")
def _lasso(ctx: PruneContext):
    return _LassoWithSnapshot()
