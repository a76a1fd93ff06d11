"""Regularised training: methods that shape the weights during training so that a later
pruning / quantization / sharing step loses little (``Policy.regularizer`` selects one).

* ``slimming`` — L1 on BatchNorm scales (network slimming, Liu et al. 2017); prune with
  the ``bn_scale`` criterion afterwards.
* ``sgl_admm`` — sparse group lasso solved with ADMM jointly with a low-bit projection:
  the auxiliary variable ``Z`` is the projection of ``W + U`` onto the set of group-sparse
  (whole output channels zero), element-sparse and quantized tensors, ``U`` the scaled dual;
  training minimises ``loss + rho/2 ||W - Z + U||^2``. At the end ``W := Z``: channels are
  pruned and weights sit on the quantization grid at once.
* ``owl_ap`` — OWL (ordered weighted L1, the OSCAR weights) on the channels' norms: its prox
  pulls correlated channels to equal magnitudes; then affinity propagation (scikit-learn)
  clusters the channels of each layer and the members of a cluster share one weight vector.

A regulariser is ``factory(policy, model, **options) -> Regularizer`` with ``loss(model)``
(added to the training loss), ``step(model, step)`` (after each optimizer step) and
``finish(model) -> dict`` (the final projection / clustering; returns statistics).
:func:`evaluators.finetune.regularized_train` wires it into :func:`evaluators.train.train`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch
from torch import nn

from .layers import classifier_name
from .policy import Policy
from .registry import Registry

_BN = nn.modules.batchnorm._BatchNorm


class Regularizer:
    """Base: no-op hooks."""

    def loss(self, model: nn.Module) -> torch.Tensor | float:
        return 0.0

    def step(self, model: nn.Module, step: int) -> None:
        return None

    @torch.no_grad()
    def finish(self, model: nn.Module) -> dict[str, Any]:
        return {}

    @torch.no_grad()
    def constrain(self, model: nn.Module, step: int = 0) -> None:
        """After :meth:`finish`: put the weights back into the final set (used while retraining)."""
        return None


#: Regularisers by name: ``factory(policy, model, **options) -> Regularizer``.
REGULARIZERS: Registry[Callable[..., Regularizer]] = Registry("regularizer")


def _prunable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv/linear layers except the classifier (its outputs are the classes)."""
    last = classifier_name(model)
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and n != last
            and not (isinstance(m, nn.Conv2d) and m.groups > 1)]


# --- network slimming ---------------------------------------------------------------------------

@REGULARIZERS.register("slimming", summary="L1 on BatchNorm scales (network slimming); prune with bn_scale")
class SlimmingRegularizer(Regularizer):
    def __init__(self, policy: Policy | None = None, model: nn.Module | None = None, *, strength: float = 1e-4) -> None:
        self.strength = strength

    def loss(self, model: nn.Module) -> torch.Tensor | float:
        terms = [m.weight.abs().sum() for m in model.modules() if isinstance(m, _BN) and m.affine]
        return self.strength * torch.stack(terms).sum() if terms else 0.0


# --- sparse group lasso + low-bit projection by ADMM ---------------------------------------

def project_sgl_quant(w: torch.Tensor, *, group_ratio: float, sparsity: float, bits: int | None) -> torch.Tensor:
    """Projection onto {whole output channels zero (``group_ratio`` of them), ``sparsity`` of
    the remaining weights zero, the rest on a symmetric ``bits``-bit grid per channel}.

    The group step keeps the channels of largest L2 norm, the element step the largest
    magnitudes (both exact Euclidean projections onto their sets); the grid step rounds to
    the nearest level with the max-abs scale (the usual approximate projection).

    Example:
        >>> z = project_sgl_quant(torch.randn(8, 4), group_ratio=0.25, sparsity=0.0, bits=2)
        >>> int((z.abs().sum(1) == 0).sum()), len(z.unique()) <= 3 * 8
        (2, True)
    """
    z = w.clone()
    o = w.shape[0]
    n_drop = int(math.floor(o * group_ratio + 1e-9))
    n_drop = min(n_drop, o - 1)
    flat = z.reshape(o, -1)
    if n_drop > 0:
        drop = torch.argsort(flat.norm(dim=1))[:n_drop]
        flat[drop] = 0
    if sparsity > 0:
        alive = flat.abs() > 0
        k = int(math.floor(int(alive.sum()) * sparsity + 1e-9))
        if k > 0:
            vals = flat.abs().masked_fill(~alive, float("inf")).flatten()
            flat.view(-1)[torch.argsort(vals)[:k]] = 0
    if bits is not None and bits < 16:
        qmax = 2 ** (bits - 1) - 1 if bits > 1 else 1
        s = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
        lo = -qmax - (0 if bits == 1 else 1)
        q = torch.clamp(torch.round(flat / s), lo, qmax)
        if bits == 1:  # binary: sign levels, zeros stay zero
            q = torch.sign(flat)
        flat = q * s
    return flat.reshape(w.shape)


@REGULARIZERS.register("sgl_admm", summary="sparse group lasso by ADMM with a low-bit projection: prunes channels "
                                           "and quantizes at once")
class SGLADMMRegularizer(Regularizer):
    """ADMM for ``min loss(W) + I_C(Z)`` s.t. ``W = Z``, with ``C`` group-sparse + sparse + quantized.

    Per layer: ``group_ratio`` = the layer's ``prune_ratio`` (else ``default_group_ratio``),
    element sparsity = its ``sparsity``, bits = its ``weight_bits`` (else ``default_bits``).
    A group-lasso term ``lam * sum_c ||W_c||_2`` plus the ADMM penalty drive the dropped
    channels to zero during training; ``Z, U`` update every ``admm_every`` steps.
    """

    def __init__(self, policy: Policy | None, model: nn.Module, *, rho: float = 5.0, rho_growth: float = 1.1,
                 rho_max: float = 20.0, lam: float = 1e-4, admm_every: int = 5, default_group_ratio: float = 0.5,
                 default_bits: int | None = 4) -> None:
        policy = policy or Policy()
        self.rho, self.lam, self.every = rho, lam, admm_every
        self.rho_growth, self.rho_max = rho_growth, rho_max
        self.layers: dict[str, dict[str, Any]] = {}
        for name, m in _prunable(model):
            lp = policy.for_layer(name)
            group = lp.prune_ratio if lp.prune_ratio > 0 else default_group_ratio
            bits = lp.weight_bits if lp.weight_bits is not None else default_bits
            w = m.weight.detach()
            cfg = {"group_ratio": group, "sparsity": lp.sparsity, "bits": bits}
            self.layers[name] = {**cfg, "Z": project_sgl_quant(w, **cfg), "U": torch.zeros_like(w)}

    def loss(self, model: nn.Module) -> torch.Tensor | float:
        total: torch.Tensor | float = 0.0
        for name, st in self.layers.items():
            w = model.get_submodule(name).weight
            total = total + self.rho / 2 * (w - st["Z"] + st["U"]).pow(2).sum()
            total = total + self.lam * w.reshape(w.shape[0], -1).norm(dim=1).sum()  # group lasso
        return total

    @torch.no_grad()
    def step(self, model: nn.Module, step: int) -> None:
        if step % self.every:
            return
        for name, st in self.layers.items():
            w = model.get_submodule(name).weight
            cfg = {k: st[k] for k in ("group_ratio", "sparsity", "bits")}
            st["Z"] = project_sgl_quant(w + st["U"], **cfg)
            st["U"] = st["U"] + w - st["Z"]
        # Increasing rho (with U rescaled, U is the *scaled* dual) tightens W = Z as training ends.
        new_rho = min(self.rho * self.rho_growth, self.rho_max)
        for st in self.layers.values():
            st["U"] = st["U"] * (self.rho / new_rho)
        self.rho = new_rho

    @torch.no_grad()
    def finish(self, model: nn.Module) -> dict[str, Any]:
        """``W := proj(W)``: zero channels (and their biases) and grid weights; returns counts."""
        zero_channels = 0
        for name, st in self.layers.items():
            m = model.get_submodule(name)
            cfg = {k: st[k] for k in ("group_ratio", "sparsity", "bits")}
            z = project_sgl_quant(m.weight, **cfg)
            m.weight.copy_(z)
            dead = z.reshape(z.shape[0], -1).abs().sum(1) == 0
            if m.bias is not None:
                m.bias[dead] = 0
            zero_channels += int(dead.sum())
            st["mask"] = (z != 0).to(z.dtype)
        return {"zero_channels": zero_channels, "layers": len(self.layers)}

    @torch.no_grad()
    def constrain(self, model: nn.Module, step: int = 0) -> None:
        """Masked, quantized retraining: same zeros, weights back on the grid."""
        for name, st in self.layers.items():
            if "mask" not in st:
                continue
            m = model.get_submodule(name)
            m.weight.copy_(project_sgl_quant(m.weight * st["mask"], group_ratio=0.0, sparsity=0.0, bits=st["bits"]))


# --- OWL + affinity propagation ----------------------------------------------------------------

def owl_weights(n: int, lam1: float, lam2: float) -> torch.Tensor:
    """OSCAR-style OWL weights, non-increasing: ``lam1 + lam2 * (n - i)`` for rank ``i``."""
    return lam1 + lam2 * torch.arange(n - 1, -1, -1, dtype=torch.float32)


def prox_owl(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Prox of the OWL norm ``sum_i w_i |v|_[i]`` (Zeng & Figueiredo 2014; stack-based PAVA).

    Equal-valued outputs are the point: entries whose magnitudes are close are pulled to the
    same value (a cluster).

    Example:
        >>> [round(x, 3) for x in prox_owl(torch.tensor([3.0, 2.95, 0.5]), torch.tensor([0.3, 0.2, 0.1])).tolist()]
        [2.725, 2.725, 0.4]
    """
    sign, a = torch.sign(v), v.abs()
    order = torch.argsort(a, descending=True)
    z = (a[order] - w).tolist()
    # Pool adjacent violators to make z non-increasing, then clip at zero.
    blocks: list[list[float]] = []  # [sum, count]
    for val in z:
        blocks.append([val, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] <= blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    out = []
    for s, c in blocks:
        out += [max(s / c, 0.0)] * c
    res = torch.empty_like(a)
    res[order] = torch.tensor(out, dtype=a.dtype)
    return sign * res


@REGULARIZERS.register("owl_ap", summary="OWL regulariser ties correlated channels, then affinity propagation "
                                         "clusters them to share weights")
class OWLAPRegularizer(Regularizer):
    """OWL (GrOWL) on output-channel vectors + affinity-propagation weight tying.

    During training, every ``prox_every`` steps the proximal step of the group-OWL norm is
    applied to each layer's channel norms (channel vectors are rescaled to the prox of their
    norms): channels with similar norms are pulled to equal norms and weak ones to zero.
    :meth:`finish` clusters each layer's channel vectors with affinity propagation on their
    negative squared distances (``preference`` controls how many clusters) and replaces every
    channel by its cluster's mean, so the layer stores one vector per cluster.
    """

    def __init__(self, policy: Policy | None, model: nn.Module, *, lam1: float = 1e-4, lam2: float = 1e-5,
                 prox_every: int = 1, lr: float = 0.05, preference_quantile: float = 0.9) -> None:
        self.lam1, self.lam2, self.every, self.lr = lam1, lam2, prox_every, lr
        self.q = preference_quantile
        self.names = [n for n, _ in _prunable(model)]
        self.clusters: dict[str, list[torch.Tensor]] = {}

    @torch.no_grad()
    def step(self, model: nn.Module, step: int) -> None:
        if step % self.every:
            return
        for name in self.names:
            w = model.get_submodule(name).weight
            flat = w.reshape(w.shape[0], -1)
            norms = flat.norm(dim=1)
            target = prox_owl(norms, owl_weights(len(norms), self.lam1, self.lam2) * self.lr * self.every)
            flat.mul_((target / norms.clamp_min(1e-12))[:, None])

    @torch.no_grad()
    def finish(self, model: nn.Module) -> dict[str, Any]:
        from sklearn.cluster import AffinityPropagation
        from sklearn.exceptions import ConvergenceWarning

        before = after = 0
        for name in self.names:
            m = model.get_submodule(name)
            flat = m.weight.reshape(m.weight.shape[0], -1)
            x = flat.double().numpy()
            sim = -((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
            off = sim[~torch.eye(len(x), dtype=torch.bool).numpy()]
            pref = float(torch.quantile(torch.from_numpy(off), self.q)) if off.size else 0.0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                ap = AffinityPropagation(affinity="precomputed", preference=pref, random_state=0,
                                         max_iter=500).fit(sim)
            labels = torch.as_tensor(ap.labels_)
            before += len(x)
            if (labels < 0).any():  # did not converge: leave the layer untied
                after += len(x)
                continue
            self.clusters[name] = [(labels == c).nonzero().flatten() for c in labels.unique()]
            after += len(self.clusters[name])
        self.constrain(model)
        return {"channels": before, "unique_channels": after}

    @torch.no_grad()
    def constrain(self, model: nn.Module, step: int = 0) -> None:
        """Tie: every channel of a cluster takes the cluster's mean vector (and bias)."""
        for name, groups in self.clusters.items():
            m = model.get_submodule(name)
            flat = m.weight.reshape(m.weight.shape[0], -1)
            for idx in groups:
                if len(idx) > 1:
                    flat[idx] = flat[idx].mean(0, keepdim=True)
                    if m.bias is not None:
                        m.bias[idx] = m.bias[idx].mean()


def make_regularizer(policy: Policy, model: nn.Module, **options: Any) -> Regularizer:
    """The regulariser ``policy.regularizer`` names (a no-op :class:`Regularizer` for ``None``)."""
    if policy.regularizer is None:
        return Regularizer()
    return REGULARIZERS.get(policy.regularizer)(policy, model, **options)
