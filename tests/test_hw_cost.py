"""Cost models: tracing, MACs vs fvcore, monotonicity, policy awareness, peak memory, speed."""

from __future__ import annotations

import json
import time
import warnings

import pytest
import torch
from torch import nn

from squeezer import hw_models
from squeezer.compressors.policy import LayerPolicy as LP
from squeezer.compressors.policy import Policy
from squeezer.evaluators.models import build_model
from squeezer.hw_models import estimate_table, list_targets, trace


@pytest.fixture(scope="module")
def r20():
    return trace(build_model("resnet20", in_channels=3, num_classes=10), (3, 32, 32))


@pytest.fixture(scope="module")
def mbv2():
    return trace(build_model("mobilenet_v2_050", in_channels=3, num_classes=10), (3, 32, 32))


def test_trace_covers_memory_bound_ops_in_order(r20):
    kinds = [l.kind for l in r20]
    assert {"conv2d", "bn", "act", "add", "gap", "linear"} <= set(kinds)
    names = [l.name for l in r20]
    assert names.index("conv1") < names.index("layer1.0.conv1") < names.index("fc")
    add = next(l for l in r20 if l.kind == "add")
    assert len(add.inputs) == 2
    assert r20["bn1"].bn_folded_into == "conv1"
    assert r20["layer1.0.conv2"].out_segments == r20["layer1.1.conv2"].out_segments  # coupled by the add
    again = hw_models.LayerTable.from_dict(json.loads(json.dumps(r20.to_dict())))
    assert [l.to_dict() for l in again] == [l.to_dict() for l in r20]


def test_trace_hooks_fallback_for_untraceable_models():
    class Dyn(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            y = self.a(x)
            if float(y.abs().sum()) >= 0:  # data-dependent: FX cannot trace
                y = self.b(y)
            return self.fc(y.mean((2, 3)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = trace(Dyn(), (3, 16, 16))
    assert t.method == "hooks"
    assert [l.name for l in t if l.is_compressible] == ["a", "b", "fc"]
    assert t.macs == 8 * 27 * 256 + 8 * 72 * 256 + 16


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "squeezenet1_0", "efficientnet_b0",
                                  "shufflenet_v2_x1_0"])
def test_macs_match_fvcore_within_2_percent(name):
    from fvcore.nn import FlopCountAnalysis

    m = build_model(name, in_channels=3, num_classes=10).eval()
    shape = (3, 64, 64)
    fca = FlopCountAnalysis(m, torch.zeros(1, *shape))
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    by_op = fca.by_operator()
    ref = sum(v for k, v in by_op.items() if k in ("conv", "linear", "addmm", "matmul", "einsum", "bmm"))
    table = trace(m, shape)
    ours = table.macs
    assert abs(ours - ref) / ref < 0.02, (ours, ref)
    assert estimate_table(table, None, "arm-a72").macs == ours   # the cost model runs the traced shapes


@pytest.mark.parametrize("target", list_targets())
def test_contract_every_target(r20, target):
    base = estimate_table(r20, None, target)
    assert base.latency_ms > 0 and base.energy_mj > 0 and base.size_bytes > 0 and base.peak_memory_bytes > 0
    assert base.macs == r20.macs
    assert abs(sum(l.latency_ms for l in base.layers) - base.latency_ms) < 1e-9 * max(1, base.latency_ms) + 1e-12
    json.dumps(base.to_dict())
    # fewer channels never cost more bytes / latency; fewer bits never more bytes
    prev = None
    for r in (0.0, 0.25, 0.5, 0.75):
        c = estimate_table(r20, Policy(layers={"_default": LP(prune_ratio=r)}), target)
        if prev is not None:
            assert c.size_bytes <= prev.size_bytes and c.macs <= prev.macs
            assert c.latency_ms <= prev.latency_ms + 1e-12 and c.energy_mj <= prev.energy_mj + 1e-12
            assert c.peak_memory_bytes <= prev.peak_memory_bytes
        prev = c
    prev = None
    for b in (None, 16, 8, 6, 4, 3, 2):
        c = estimate_table(r20, Policy(layers={"_default": LP(weight_bits=b)}), target)
        if prev is not None:
            assert c.size_bytes <= prev.size_bytes
        prev = c


@pytest.fixture(scope="module")
def resnet_family():
    from squeezer.evaluators.models import ResNetCifar

    return [trace(ResNetCifar(depth, 3, 10, width), (3, 32, 32))
            for depth, width in ((8, 8), (14, 8), (14, 16), (20, 16), (20, 32))]


@pytest.mark.parametrize("target", list_targets())
def test_more_macs_never_fewer_latency(resnet_family, target):
    """Wider/deeper variants of the same network: latency grows with MACs."""
    tabs = resnet_family
    costs = sorted((t.macs, estimate_table(t, None, target).latency_ms) for t in tabs)
    lats = [c[1] for c in costs]
    assert lats == sorted(lats)


def test_compute_width_and_sparsity_follow_the_target(r20):
    m7 = "arm-m7"
    w8 = estimate_table(r20, Policy(layers={"_default": LP(weight_bits=8, act_bits=8)}), m7)
    w4 = estimate_table(r20, Policy(layers={"_default": LP(weight_bits=4, act_bits=4)}), m7)
    fp = estimate_table(r20, None, m7)
    assert all(l.compute_bits == 8 for l in w4.layers if l.kind == "conv2d")  # int4 runs as int8
    assert w4.latency_ms <= w8.latency_ms < fp.latency_ms
    assert w4.size_bytes < w8.size_bytes < fp.size_bytes
    # weight-only quantization: float compute, fewer bytes
    wo = estimate_table(r20, Policy(layers={"_default": LP(weight_bits=8)}), "arm-a72")
    assert all(l.compute_bits == 32 for l in wo.layers if l.kind == "conv2d")
    # unstructured sparsity: smaller, but no faster without sparse kernels
    sp = estimate_table(r20, Policy(layers={"_default": LP(sparsity=0.9)}), "arm-a72")
    dense = estimate_table(r20, None, "arm-a72")
    assert sp.size_bytes < dense.size_bytes and sp.latency_ms >= dense.latency_ms * 0.999
    t = hw_models.get_target("arm-a72").replace(sparse_kernels=True)
    assert estimate_table(r20, Policy(layers={"_default": LP(sparsity=0.9)}), t).latency_ms < dense.latency_ms


def test_lowrank_replaces_layer_by_factors(r20):
    pol = Policy(layers={"layer3.0.conv2": LP(rank_ratio=0.25)})
    c = estimate_table(r20, pol, "arm-a72")
    names = [l.name for l in c.layers]
    assert "layer3.0.conv2.0" in names and "layer3.0.conv2.1" in names and "layer3.0.conv2" not in names
    r = max(1, round(0.25 * min(64, 64 * 9)))
    spec = r20["layer3.0.conv2"]
    hw = spec.out_hw[0] * spec.out_hw[1]
    assert c.macs == r20.macs - spec.macs + r * hw * 64 * 9 + 64 * hw * r


def test_peak_memory_follows_execution_order(r20):
    base = estimate_table(r20, None, "arm-m7")
    # resnet basic block at 16x32x32 fp32: block input, conv1 output, conv2 output live together
    assert base.peak_memory_bytes == 3 * 16 * 32 * 32 * 4
    q = estimate_table(r20, Policy(layers={"_default": LP(weight_bits=8, act_bits=8)}), "arm-m7")
    assert q.peak_memory_bytes == base.peak_memory_bytes // 4
    assert q.fits["sram"] and base.fits["flash"]


def test_depthwise_pruning_shapes(mbv2):
    pol = Policy(layers={"_default": LP(prune_ratio=0.5)})
    c = estimate_table(mbv2, pol, "arm-a72")
    base = estimate_table(mbv2, None, "arm-a72")
    assert c.macs < 0.45 * base.macs
    assert any(l.kind == "dwconv2d" for l in c.layers)


def test_reestimate_is_fast(r20):
    pol = Policy(layers={"_default": LP(prune_ratio=0.3, weight_bits=4, act_bits=8)})
    estimate_table(r20, pol, "arm-a72")
    t0 = time.perf_counter()
    for _ in range(10):
        estimate_table(r20, pol, "arm-a72")
    assert (time.perf_counter() - t0) / 10 < 0.5


def test_estimate_convenience_and_did_you_mean():
    c = hw_models.estimate(build_model("lenet5", in_channels=1, num_classes=10), (1, 28, 28), "arm")
    assert c.target == "arm-a72" and c.macs > 0
    with pytest.raises(ValueError, match="did you mean"):
        hw_models.estimate_table(trace(build_model("lenet5", in_channels=1, num_classes=10), (1, 28, 28)), None,
                                 "arm-m8")
