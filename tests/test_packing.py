"""The size model is exact: hw_models' size_bytes == len(pack_model(compressed model))."""

from __future__ import annotations

import copy

import pytest
import torch

from squeezer import hw_models
from squeezer.compressors.apply import apply_policy_
from squeezer.compressors.packing import pack_model
from squeezer.compressors.policy import LayerPolicy as LP
from squeezer.compressors.policy import Policy

POLICIES = {
    "none": Policy(),
    "w8a8": Policy(layers={"_default": LP(weight_bits=8, act_bits=8)}),
    "prune30_w4_lsq": Policy(layers={"_default": LP(prune_ratio=0.3, weight_bits=4, quantizer="lsq")}),
    "lowrank25_w3": Policy(layers={"_default": LP(rank_ratio=0.25, weight_bits=3)}),
    "prune_lowrank_sparse_fp16": Policy(layers={"_default": LP(prune_ratio=0.2, rank_ratio=0.5, sparsity=0.3,
                                                              weight_bits=16)}),
    "sparse90_w5": Policy(layers={"_default": LP(sparsity=0.9, weight_bits=5)}),
    "sparse50_float": Policy(layers={"_default": LP(sparsity=0.5)}),
    "ternary": Policy(layers={"_default": LP(weight_bits=2, quantizer="ternary")}),
    "binary": Policy(layers={"_default": LP(weight_bits=1, quantizer="binary")}),
    "pow2": Policy(layers={"_default": LP(weight_bits=4, quantizer="pow2")}),
    "kmeans_codebook": Policy(layers={"_default": LP(weight_bits=4, quantizer="kmeans")}),
    "sharing_sparse": Policy(layers={"_default": LP(sharing="kmeans", weight_bits=3, sparsity=0.5)}),
    "mixed": Policy(layers={"_default": LP(weight_bits=8), "re:.*conv1": LP(prune_ratio=0.5, weight_bits=2),
                            "fc": LP(weight_bits=4, sparsity=0.6)}),
}


@pytest.fixture(scope="module")
def resnet20():
    from squeezer.evaluators.models import build_model

    torch.manual_seed(0)
    m = build_model("resnet20", in_channels=3, num_classes=10)
    # a few SGD steps so weights and BN statistics are not at their init values
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    for _ in range(3):
        x = torch.randn(16, 3, 32, 32)
        loss = torch.nn.functional.cross_entropy(m(x), torch.randint(0, 10, (16,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval(), hw_models.trace(m, (3, 32, 32))


@pytest.mark.parametrize("name", list(POLICIES))
def test_size_model_equals_packed_bytes_resnet20(resnet20, name):
    base, table = resnet20
    pol = POLICIES[name]
    m = copy.deepcopy(base)
    apply_policy_(m, pol, (3, 32, 32))
    assert hw_models.estimate_table(table, pol, "arm-m7").size_bytes == len(pack_model(m))


@pytest.mark.parametrize("name", ["none", "prune30_w4_lsq", "lowrank25_w3", "sparse90_w5", "sharing_sparse"])
def test_size_model_equals_packed_bytes_trained_lenet(trained_lenet, name):
    pol = POLICIES[name]
    table = hw_models.trace(trained_lenet, (1, 28, 28))
    m = copy.deepcopy(trained_lenet)
    apply_policy_(m, pol, (1, 28, 28))
    assert hw_models.estimate_table(table, pol, "arm-a72").size_bytes == len(pack_model(m))


def test_size_model_depthwise_mobilenet():
    from squeezer.evaluators.models import build_model

    base = build_model("mobilenet_v2_050", in_channels=3, num_classes=10)
    table = hw_models.trace(base, (3, 32, 32))
    for pol in (POLICIES["prune30_w4_lsq"], POLICIES["prune_lowrank_sparse_fp16"]):
        m = copy.deepcopy(base)
        apply_policy_(m, pol, (3, 32, 32))
        assert hw_models.estimate_table(table, pol, "arm-a72").size_bytes == len(pack_model(m))


def test_format_rules_by_hand():
    from torch import nn

    conv = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1),
                         nn.ReLU(), nn.BatchNorm2d(4))
    # conv0: 216 fp32 + folded BN bias 32; conv3: 32 fp32 + bias 16; BN after ReLU does not fold: 8*4
    assert len(pack_model(conv)) == 216 * 4 + 8 * 4 + 32 * 4 + 4 * 4 + 8 * 4


def test_bit_packing_is_dense_and_huffman_is_estimated(resnet20):
    base, table = resnet20
    pol = Policy(layers={"_default": LP(weight_bits=3)})
    m = copy.deepcopy(base)
    apply_policy_(m, pol, (3, 32, 32))
    plain = len(pack_model(m))
    huff = len(pack_model(m, coding="huffman"))
    est = hw_models.estimate_table(table, Policy(layers=pol.layers, coding="huffman"), "arm-a72")
    assert not est.size_exact
    assert huff < plain
    assert abs(est.size_bytes - huff) / huff < 0.35


def test_relative_indices_round_trip_and_beat_the_bitmap_on_a_pruned_layer(trained_lenet):
    """Deep Compression's sparse format: gaps between kept weights, Huffman-coded, escapes for long gaps."""
    import numpy as np

    from squeezer.compressors.coding import (
        decode_positions,
        encode_positions,
        relative_index_estimate,
        relative_index_symbols,
    )

    assert relative_index_symbols(np.array([0, 0, 0, 0, 0, 0, 0, 1, 1], bool), 3).tolist() == [3, 3, 1, 0]
    w = trained_lenet.classifier[1].weight.detach().abs().reshape(-1).numpy()   # fc1, 48,000 weights
    for density in (0.05, 0.15, 0.3):
        keep = w >= np.quantile(w, 1 - density)                                  # a real magnitude mask
        blob = encode_positions(keep)
        assert (decode_positions(blob, keep.size) == keep).all()
        bitmap = (keep.size + 7) // 8
        assert len(blob) < bitmap * (0.75 if density <= 0.15 else 0.95)
        est = relative_index_estimate(keep.size, int(keep.sum()))
        assert abs(est - len(blob)) / len(blob) < 0.1
    dense = np.random.default_rng(0).random(1000) < 0.67                        # 67% kept at random: bitmap wins
    blob = encode_positions(dense)
    assert len(blob) == 1 + 125 and (decode_positions(blob, 1000) == dense).all()


def test_unit_scale_codebooks_store_no_scale_without_a_folded_bn(trained_lenet):
    """LeNet-5 has no BatchNorm: a k-means layer stores codes + codebook + bias, no per-channel scale."""
    m = copy.deepcopy(trained_lenet)
    pol = Policy(layers={"_default": LP(weight_bits=8), "classifier.1": LP(sharing="kmeans", weight_bits=4)})
    apply_policy_(m, pol, (1, 28, 28))
    fc1 = m.classifier[1]
    other = copy.deepcopy(trained_lenet)
    apply_policy_(other, Policy(layers={"_default": LP(weight_bits=8)}), (1, 28, 28))
    lsq8_fc1 = 48_000 + 4 * 120 + 4 * 120                                       # int8 codes + scale + bias
    kmeans_fc1 = 48_000 * 4 // 8 + 4 * 16 + 4 * 120                            # 4-bit codes + codebook + bias
    assert fc1.out_features == 120
    assert len(pack_model(other)) - len(pack_model(m)) == lsq8_fc1 - kmeans_fc1
    table = hw_models.trace(trained_lenet, (1, 28, 28))
    assert hw_models.estimate_table(table, pol, "arm-a72").size_bytes == len(pack_model(m))


def test_huffman_sparse_sizes_estimated_close_and_below_bitmap(trained_lenet):
    pol = Policy(layers={"_default": LP(sparsity=0.85, sharing="kmeans", weight_bits=4)})
    m = copy.deepcopy(trained_lenet)
    apply_policy_(m, pol, (1, 28, 28))
    plain, huff = len(pack_model(m)), len(pack_model(m, coding="huffman"))
    est = hw_models.estimate_table(hw_models.trace(trained_lenet, (1, 28, 28)),
                                   Policy(layers=pol.layers, coding="huffman"), "arm-a72")
    assert not est.size_exact
    assert huff < 0.8 * plain
    assert abs(est.size_bytes - huff) / huff < 0.15
