"""Weight sharing: a layer's weights take values from a small learned codebook.

Methods (registry :data:`SHARING`, each ``cls(bits, weight, clusters=None)`` returning a
:class:`~compressors.quantize.WeightQuantizer` parametrization whose ``encode`` gives the
codes and the codebook):

- ``kmeans``: Deep Compression's k-means codebook (k-means++ seeding, centroids fine-tuned).
- ``birch``: BIRCH chooses the number of clusters from the data (at most ``clusters``),
  then k-means seeded with k-means++.
- ``spectral``: spectral clustering of the non-zero weights (a subsample), the rest assigned
  to the nearest center; zeros stay zero (sparse quantization).
- ``pq``: product quantization (Gong et al. 2014): the weight matrix is cut into
  sub-vectors of ``subvector`` weights, k-means per sub-space; one ``bits``-wide index per
  sub-vector, so ``bits / subvector`` bits per weight plus the sub-codebooks
  (:class:`ProductQuantizedTensor` reports its storage).

Exact zeros (weights pruned by a sparsity mask applied before sharing) keep a reserved zero
code in the scalar methods, so sharing never undoes pruning.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from squeezer.compressors.policy import LayerPolicy
    >>> lin = nn.Linear(64, 16)
    >>> q = attach_sharing_(lin, LayerPolicy(sharing="kmeans", weight_bits=3))
    >>> int(lin.weight.unique().numel()) <= 8
    True
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from .coding import huffman_bytes
from .policy import LayerPolicy
from .quantize import CodebookQuantizer, KMeansQuantizer, QuantizedTensor, WeightQuantizer, kmeans1d
from .registry import Registry

#: Weight-sharing methods by name: ``cls(bits, weight, clusters=None) -> WeightQuantizer``.
SHARING: Registry[type[WeightQuantizer]] = Registry("sharing method")
SHARING.add("kmeans", KMeansQuantizer,
            summary="k-means codebook, k-means++ seeds, centroids fine-tuned by gradient (Deep Compression)")


def _subsample(x: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    if x.numel() <= n:
        return x
    g = torch.Generator().manual_seed(seed)
    return x[torch.randperm(x.numel(), generator=g)[:n]]


@SHARING.register("birch", summary="BIRCH picks the number of clusters from the data, then k-means++ seeded k-means")
class BirchSharing(CodebookQuantizer):
    """Adaptive cluster count: BIRCH subclusters of radius ``threshold_ratio * std(w)``
    (at most ``clusters`` / ``2**bits``), then k-means from k-means++ seeds.

    After construction ``n_clusters`` holds the chosen count and ``bits`` shrinks to the
    narrowest width that stores it.
    """

    threshold_ratio = 0.1
    max_points = 5000

    def init_centroids(self, x: torch.Tensor, k: int) -> torch.Tensor:
        from sklearn.cluster import Birch

        xs = _subsample(x, self.max_points).double().numpy().reshape(-1, 1)
        thr = max(self.threshold_ratio * float(np.std(xs)), 1e-12)
        birch = Birch(threshold=thr, n_clusters=None, branching_factor=50).fit(xs)
        self.n_clusters = max(1, min(k, len(birch.subcluster_centers_)))
        return kmeans1d(x, self.n_clusters)

    def __init__(self, bits: int, weight: torch.Tensor, clusters: int | None = None) -> None:
        super().__init__(bits, weight, clusters)
        self.bits = max(1, math.ceil(math.log2(self.n_clusters + int(self.has_zero))))


@SHARING.register("spectral", summary="spectral-clustering sparse quantization: cluster non-zero weights "
                                      "(subsample), assign the rest to the nearest center; zeros kept")
class SpectralSharing(CodebookQuantizer):
    """Centers are the means of spectral clusters of the non-zero weights (RBF affinity on a
    subsample); every weight then takes its nearest center, pruned zeros stay zero."""

    max_points = 1500

    def init_centroids(self, x: torch.Tensor, k: int) -> torch.Tensor:
        from sklearn.cluster import SpectralClustering

        xs = _subsample(x, self.max_points).double().numpy().reshape(-1, 1)
        k = min(k, len(np.unique(xs)))
        if k <= 1:
            return torch.tensor([float(xs.mean())])
        # Bandwidth from the spacing k clusters would have: neighbours inside a cluster link.
        gamma = 1.0 / (2 * (float(np.std(xs)) * 4 / k) ** 2 + 1e-12)
        with warnings.catch_warnings():  # ARPACK -> LOBPCG fallback notices; the labels are still fine
            warnings.simplefilter("ignore")
            labels = SpectralClustering(n_clusters=k, affinity="rbf", gamma=gamma, assign_labels="cluster_qr",
                                        random_state=0).fit_predict(xs)
        centers = [float(xs[labels == c].mean()) for c in np.unique(labels)]
        return torch.tensor(sorted(centers))


@dataclass
class ProductQuantizedTensor(QuantizedTensor):
    """Product-quantized weight.

    ``codes[j, i]`` (shape ``[m, n]``) indexes ``codebook[j]`` (shape ``[m, k, d]``): sub-space
    ``j`` covers output rows ``j*d .. j*d+d-1`` of the ``[O, n]`` reshaped weight, sub-vector
    ``i`` is its column ``i``. Storage: ``m*n`` indices of ``bits`` each + ``m*k*d`` float32
    codebook entries (``scale`` is all ones and not stored).
    """

    shape: tuple[int, ...] = ()

    def dequantize(self) -> torch.Tensor:
        m, n = self.codes.shape
        d = self.codebook.shape[2]
        vecs = torch.gather(self.codebook, 1, self.codes.long().unsqueeze(-1).expand(m, n, d))  # [m, n, d]
        return vecs.permute(0, 2, 1).reshape(m * d, n).reshape(self.shape)

    def storage_bytes(self, coding: str | None = None) -> int:
        if coding == "huffman":
            code_bytes = huffman_bytes(self.codes)
        else:
            code_bytes = math.ceil(self.codes.numel() * self.bits / 8)
        return int(code_bytes + self.codebook.numel() * 4)


def _kmeans_vectors(x: torch.Tensor, k: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """k-means (k-means++ seeds) of the rows of ``x`` ``[n, d]``; returns ``[k, d]``."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    if n <= k:
        return torch.cat([x, x[:1].expand(k - n, -1)]) if n < k else x.clone()
    c = [x[torch.randint(n, (1,), generator=g)].squeeze(0)]
    d2 = ((x - c[0]) ** 2).sum(1)
    for _ in range(1, k):
        tot = float(d2.sum())
        i = torch.multinomial(d2 / tot, 1, generator=g).item() if tot > 0 else 0
        c.append(x[i])
        d2 = torch.minimum(d2, ((x - x[i]) ** 2).sum(1))
    c = torch.stack(c)
    for _ in range(iters):
        a = torch.cdist(x, c).argmin(1)
        sums = torch.zeros_like(c).index_add_(0, a, x)
        cnt = torch.zeros(k).index_add_(0, a, torch.ones(n))
        new = torch.where(cnt[:, None] > 0, sums / cnt.clamp_min(1)[:, None], c)
        if torch.allclose(new, c):
            break
        c = new
    return c


@SHARING.register("pq", summary="product quantization for fully-connected layers: k-means per sub-space of "
                                "sub-vectors, one index per sub-vector (Gong et al. 2014)")
class ProductQuantizer(WeightQuantizer):
    """Product quantization of a ``[O, ...]`` weight viewed as ``[O, n]``.

    Output rows are grouped ``d`` at a time (``d`` = largest divisor of ``O`` not above
    ``subvector``); in each group the ``n`` columns are ``d``-dim sub-vectors clustered into
    ``k = clusters or 2**bits`` centroids. Code storage is ``bits / d`` bits per weight.
    """

    supported_bits = frozenset(range(1, 11))
    signed = False

    def __init__(self, bits: int, weight: torch.Tensor, clusters: int | None = None, subvector: int = 4) -> None:
        super().__init__(bits, weight)
        w = weight.detach().float()
        o = w.shape[0]
        self.d = max(dd for dd in range(1, max(1, subvector) + 1) if o % dd == 0)
        self.k = min(2 ** bits, clusters or 2 ** bits)
        x = self._vectors(w)  # [m, n, d]
        self.codebooks = nn.Parameter(torch.stack([_kmeans_vectors(x[j], self.k, seed=j) for j in range(x.shape[0])]))

    def _vectors(self, w: torch.Tensor) -> torch.Tensor:
        o = w.shape[0]
        return w.reshape(o, -1).reshape(o // self.d, self.d, -1).permute(0, 2, 1)

    def _assign(self, w: torch.Tensor) -> torch.Tensor:
        return torch.cdist(self._vectors(w.detach()), self.codebooks.detach()).argmin(-1)  # [m, n]

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        a = self._assign(w)
        m, n = a.shape
        vecs = torch.gather(self.codebooks, 1, a.unsqueeze(-1).expand(m, n, self.d))
        q = vecs.permute(0, 2, 1).reshape(w.shape)
        return q + (w - w.detach())

    @torch.no_grad()
    def encode(self, w: torch.Tensor) -> ProductQuantizedTensor:
        return ProductQuantizedTensor(codes=self._assign(w).to(torch.int16), scale=torch.ones(w.shape[0]),
                                      bits=self.bits, signed=False, codebook=self.codebooks.detach().float().clone(),
                                      shape=tuple(w.shape))


def sharing_bits(lp: LayerPolicy, *, sparse: bool = False) -> tuple[int, int | None]:
    """``(bits, clusters)`` a layer policy asks of its sharing method.

    ``clusters = lp.clusters or 2**weight_bits`` shared values; without ``weight_bits`` the code
    width is ``ceil(log2(clusters))`` (+1 value for the zero code of a ``sparse`` layer).
    """
    if lp.weight_bits is None and lp.clusters is None:
        raise ValueError("`weight_bits or clusters is set` must hold for weight sharing, but got both None")
    if lp.weight_bits is not None and lp.weight_bits != 16:
        return lp.weight_bits, lp.clusters
    clusters = lp.clusters if lp.clusters is not None else 2 ** 8
    return max(1, math.ceil(math.log2(clusters + int(sparse)))), clusters


def attach_sharing_(layer: nn.Module, layer_policy: LayerPolicy) -> WeightQuantizer:
    """Share ``layer.weight``'s values as ``layer_policy.sharing`` says (a parametrization).

    Called by :func:`compressors.apply.apply_policy_` after any sparsity mask, so pruned zeros
    are seen and kept.

    Example:
        >>> from torch import nn
        >>> lin = nn.Linear(32, 8)
        >>> q = attach_sharing_(lin, LayerPolicy(sharing="birch", clusters=16))
        >>> q.encode(lin.parametrizations.weight.original).codebook.numel() <= 16
        True
    """

    cls = SHARING.get(layer_policy.sharing)
    w = layer.weight.detach()
    bits, clusters = sharing_bits(layer_policy, sparse=bool((w == 0).any()))
    q = cls(bits, w, clusters=clusters)
    parametrize.register_parametrization(layer, "weight", q)
    return q
