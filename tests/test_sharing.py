"""Weight sharing (k-means, BIRCH, spectral, product quantization) and Huffman coding:
each method's defining claim, on a LeNet-5 trained briefly on a Fashion-MNIST subset."""

from __future__ import annotations

import copy

import pytest
import torch

from squeezer.compressors.apply import apply_policy_, compressible_layers
from squeezer.compressors.coding import (
    decode_tensor,
    encode_tensor,
    fixed_width_bytes,
    huffman_bytes,
    huffman_code,
    huffman_decode,
)
from squeezer.compressors.policy import LayerPolicy, Policy
from squeezer.compressors.quantize import QUANTIZERS, weight_quantizer
from squeezer.compressors.sharing import SHARING, ProductQuantizer, attach_sharing_, sharing_bits
from squeezer.compressors.sparsity import magnitude_mask
from squeezer.evaluators.train import evaluate

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(lenet_4k):
    m, tr, val, acc = lenet_4k
    return copy.deepcopy(m), tr, val, acc


def _rel_err(q: torch.Tensor, w: torch.Tensor) -> float:
    return float(((q.detach() - w) ** 2).sum() / (w ** 2).sum())


def test_kmeans_sharing_keeps_accuracy_at_4_bits(setup) -> None:
    model, _, val, base = setup
    m = copy.deepcopy(model)
    apply_policy_(m, Policy(layers={"_default": LayerPolicy(sharing="kmeans", weight_bits=4)}), (1, 28, 28))
    for n in compressible_layers(m):
        assert m.get_submodule(n).weight.detach().unique().numel() <= 16
    acc = evaluate(m, val)
    assert acc >= base - 0.01, f"4-bit k-means sharing: {acc:.3f} vs float {base:.3f}"


def test_sharing_keeps_pruned_zeros(setup) -> None:
    model, *_ = setup
    m = copy.deepcopy(model)
    apply_policy_(m, Policy(layers={"_default": LayerPolicy(sparsity=0.8, sharing="kmeans", weight_bits=3)}), (1, 28, 28))
    lin = m.classifier[1]
    w = lin.weight.detach()
    assert float((w == 0).float().mean()) >= 0.8 - 1e-3
    qt = weight_quantizer(lin).encode(lin.parametrizations.weight.original)
    assert float(qt.codebook[0]) == 0.0 and qt.codebook.numel() <= 8


@pytest.mark.parametrize("modes", [3, 12])
def test_birch_cluster_count_follows_the_data(modes: int) -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.arange(modes, dtype=torch.float32) - (modes - 1) / 2
    w = (centers[torch.randint(modes, (64, 64), generator=g)] + 0.02 * torch.randn(64, 64, generator=g))
    q = SHARING.get("birch")(6, w)  # room for 64 clusters; BIRCH must pick the count itself
    assert q.n_clusters == modes
    assert q.bits == (2 if modes == 3 else 4)
    assert _rel_err(q(w), w) < 1e-3


def test_birch_count_is_capped_by_the_policy(setup) -> None:
    model, *_ = setup
    lin = copy.deepcopy(model.classifier[1])
    q = attach_sharing_(lin, LayerPolicy(sharing="birch", clusters=8))
    assert 2 <= q.n_clusters <= 8


@pytest.mark.parametrize("bits", [2, 3])
def test_spectral_sparse_quantization_beats_uniform_on_pruned_layer(setup, bits: int) -> None:
    model, *_ = setup
    w = model.classifier[1].weight.detach()
    wp = w * magnitude_mask(w, 0.7)
    s = SHARING.get("spectral")(bits, wp)
    out = s(wp)
    assert torch.equal(out[wp == 0], torch.zeros_like(out[wp == 0])), "sparsity not preserved"
    assert _rel_err(out, wp) < _rel_err(QUANTIZERS.get("uniform")(bits, wp)(wp), wp)


def test_product_quantization_beats_scalar_at_equal_code_bits(setup) -> None:
    # Gong et al. 2014: on fully-connected layers, PQ beats scalar k-means at the same code rate.
    model, *_ = setup
    for lin in (model.classifier[1], model.classifier[3]):
        w = lin.weight.detach()
        pq = ProductQuantizer(4, w, subvector=2)  # one 4-bit index per 2 weights = 2 bits/weight
        qt = pq.encode(w)
        assert qt.codes.numel() * qt.bits == w.numel() * 2
        e_pq = _rel_err(pq(w), w)
        assert e_pq < _rel_err(SHARING.get("kmeans")(2, w)(w), w)
        assert e_pq < _rel_err(QUANTIZERS.get("uniform")(2, w)(w), w)
        assert torch.allclose(qt.dequantize(), pq(w).detach(), atol=1e-6)
        assert qt.storage_bytes() == w.numel() * 2 // 8 + qt.codebook.numel() * 4


def test_sharing_bits_rules() -> None:
    assert sharing_bits(LayerPolicy(sharing="kmeans", weight_bits=3)) == (3, None)
    assert sharing_bits(LayerPolicy(sharing="kmeans", clusters=10)) == (4, 10)
    assert sharing_bits(LayerPolicy(sharing="kmeans", clusters=16), sparse=True) == (5, 16)
    with pytest.raises(ValueError, match="must hold"):
        sharing_bits(LayerPolicy(sharing="kmeans"))
    assert all(SHARING.summary(n) for n in SHARING.names())


# --- Huffman --------------------------------------------------------------------------------
def test_huffman_round_trip_and_exact_size() -> None:
    g = torch.Generator().manual_seed(0)
    codes = torch.multinomial(torch.tensor([0.6, 0.2, 0.1, 0.05, 0.05]), 5000, replacement=True, generator=g) - 2
    book, bits = huffman_code(codes.tolist())
    assert huffman_decode(book, bits, codes.numel()) == codes.tolist()
    # Prefix-free.
    words = sorted(book.values())
    assert not any(b.startswith(a) for a, b in zip(words, words[1:]))
    blob = encode_tensor(codes.reshape(50, 100))
    assert len(blob) == huffman_bytes(codes)
    assert torch.equal(decode_tensor(blob, (50, 100)), codes.reshape(50, 100))
    # Within one bit per symbol of the entropy (Huffman's bound).
    p = torch.bincount(codes + 2).float() / codes.numel()
    entropy_bits = float(-(p[p > 0] * p[p > 0].log2()).sum()) * codes.numel()
    assert entropy_bits / 8 <= len(bits) <= (entropy_bits + codes.numel()) / 8 + 1


def test_huffman_of_pruned_kmeans_indices_beats_fixed_width(setup) -> None:
    model, *_ = setup
    lin = copy.deepcopy(model.classifier[1])
    apply_policy_(torch.nn.Sequential(lin), Policy(layers={"_default": LayerPolicy(sparsity=0.9, sharing="kmeans",
                                                                                   weight_bits=4)}), (400,))
    qt = weight_quantizer(lin).encode(lin.parametrizations.weight.original)
    fixed = fixed_width_bytes(qt.codes, qt.bits)
    huff = huffman_bytes(qt.codes)
    assert huff < 0.5 * fixed, f"Huffman {huff} B vs fixed-width {fixed} B"
    assert qt.storage_bytes("huffman") < qt.storage_bytes()
    assert torch.equal(decode_tensor(encode_tensor(qt.codes), qt.codes.shape), qt.codes.long())
