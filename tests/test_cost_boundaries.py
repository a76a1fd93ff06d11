"""Cost model: a tensor read at another width than it was written at pays a (de)quantize op."""

from __future__ import annotations

import pytest

from squeezer.compressors.policy import LayerPolicy as LP
from squeezer.compressors.policy import Policy
from squeezer.evaluators.models import build_model
from squeezer.hw_models import estimate_table, get_target, trace
from squeezer.hw_models.cost import coefficients, features

INT8 = LP(weight_bits=8, act_bits=8)


@pytest.fixture(scope="module")
def r20():
    return trace(build_model("resnet20", in_channels=1, num_classes=10), (1, 28, 28))


def _converts(cost):
    return [l for l in cost.layers if l.kind in ("quantize", "dequantize")]


@pytest.mark.parametrize("target", ["arm-a72", "arm-m7"])
def test_float_island_in_int8_network_costs_more_than_all_int8(r20, target):
    all8 = estimate_table(r20, Policy(layers={"_default": INT8}), target)
    island = estimate_table(r20, Policy(layers={"_default": INT8, "layer2.1.conv1": LP()}), target)
    # All-int8: the image is quantized once and the logits dequantized once, nothing else.
    assert [(l.name, l.kind) for l in _converts(all8)] == [("input:quantize", "quantize"),
                                                            ("fc:dequantize", "dequantize")]
    # The float conv dequantizes its input; its output is quantized again for the next int8 conv.
    extra = {l.name for l in _converts(island)} - {l.name for l in _converts(all8)}
    assert any(n.endswith(":dequantize") for n in extra) and any(n.endswith(":quantize") for n in extra)
    paid = sum(l.latency_ms for l in _converts(island) if l.name in extra)
    assert paid > 0
    delta_conv = next(l for l in island.layers if l.name == "layer2.1.conv1").latency_ms - \
        next(l for l in all8.layers if l.name == "layer2.1.conv1").latency_ms
    # The island costs its slower kernel plus the conversions around it (and wider tensors).
    assert island.latency_ms >= all8.latency_ms + delta_conv + paid - 1e-9
    assert island.energy_mj > all8.energy_mj

def test_int8_activations_around_float_weights_cost_more_than_float(r20):
    """Float weights with int8 inputs: quantize, then dequantize into the float kernel."""
    fp = estimate_table(r20, None, "arm-a72")
    a8 = estimate_table(r20, Policy(layers={"_default": LP(act_bits=8)}), "arm-a72")
    assert _converts(fp) == []
    names = {l.name for l in _converts(a8)}
    assert {"input:quantize", "input:quantize:dequantize"} <= names
    assert a8.latency_ms > fp.latency_ms


def test_weight_only_quantization_has_no_boundary(r20):
    w8 = estimate_table(r20, Policy(layers={"_default": LP(weight_bits=8)}), "arm-a72")
    assert _converts(w8) == []


def test_targets_without_float_compute_have_no_boundaries(r20):
    c = estimate_table(r20, Policy(layers={"_default": INT8, "layer2.1.conv1": LP()}), "eyeriss")
    assert _converts(c) == []


def test_boundaries_keep_latency_linear_in_the_calibrated_coefficients(r20):
    """Calibration fits latency = sum(coefficient * feature): the conversion rows must keep that."""
    pol = Policy(layers={"_default": INT8, "layer2.1.conv1": LP(), "layer3.0.conv1": LP(act_bits=8)})
    c = estimate_table(r20, pol, "arm-a72")
    f = features(r20, pol, "arm-a72")
    coef = coefficients(get_target("arm-a72"))
    assert abs(sum(coef[k] * v for k, v in f.items() if k in coef) - c.latency_ms) < 1e-9 * c.latency_ms
    assert abs(sum(l.latency_ms for l in c.layers) - c.latency_ms) < 1e-9 * c.latency_ms
    assert all(l.size_bytes == 0 and l.macs == 0 for l in _converts(c))  # ops, not parameters
