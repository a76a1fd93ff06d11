"""The runtime's graph: rewrites on any traced graph, integer kernels where the runtime forms
them, and the runtime's rules as data in the target file."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml
from torch import nn

from squeezer.compressors.policy import LayerPolicy as LP
from squeezer.compressors.policy import Policy
from squeezer.evaluators.models import build_model
from squeezer.hw_models import estimate_table, get_target, trace
from squeezer.hw_models.graph import runtime_graph
from squeezer.hw_models.nb201 import EDGES, nb201_table
from squeezer.hw_models.targets import TARGETS_DIR, GraphRules, TargetError, load_target

INT8 = LP(weight_bits=8, act_bits=8)


class _Ops(nn.Module):
    """Identities and zeros as code writes them: x + 0, x * 1, zeros_like, a product with a zero."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (self.a(x) + 0) * 1
        z = torch.zeros_like(self.b(x))
        return y + self.c(x) * z + z


def test_identities_and_zero_products_are_rewritten_away():
    t = trace(_Ops(), (4, 8, 8), groups=False)
    g = runtime_graph(t, GraphRules())
    assert [l.name for l in g] == ["a"]       # b feeds only zeros_like, c only a product with zero
    assert [l.name for l in runtime_graph(t, GraphRules.none()) if l.macs] == ["a", "b", "c"]
    assert runtime_graph(t, GraphRules()) is g  # cached per rule set


def _hand_live_convs(ops: tuple[str, ...], fold: bool) -> int:
    """Convs a runtime runs in one cell, by hand: an edge runs if its op is a conv, its target
    node reaches node 3 and (with folding) its source node holds a non-zero value."""
    reaches = [False, False, False, True]
    for e, (i, j) in reversed(list(enumerate(EDGES))):
        if ops[e] != "none" and reaches[j]:
            reaches[i] = True
    value = [True, not fold, not fold, not fold]
    for e, (i, j) in enumerate(EDGES):
        if ops[e] != "none" and value[i]:
            value[j] = True
    return sum(o.startswith("nor_conv") and reaches[j] and value[i] for o, (i, j) in zip(ops, EDGES))


@pytest.mark.parametrize("ops", [
    ("nor_conv_3x3", "none", "none", "skip_connect", "none", "none"),
    ("skip_connect", "nor_conv_3x3", "none", "skip_connect", "skip_connect", "none"),
    ("none", "nor_conv_1x1", "nor_conv_3x3", "none", "none", "nor_conv_3x3"),
    ("none", "none", "nor_conv_3x3", "avg_pool_3x3", "nor_conv_1x1", "nor_conv_3x3"),
])
@pytest.mark.parametrize("fold", [False, True])
def test_plain_nb201_through_the_general_path_runs_the_live_edges(ops, fold):
    """A NAS-Bench-201 network built plainly (none = x * 0) keeps exactly the convs a converter
    keeps: dead ones removed; with constant folding, also those on an all-zero node."""
    g = runtime_graph(nb201_table(ops), GraphRules(constant_folding=fold))
    cell_convs = sum(l.kind == "conv2d" for l in g) - 7  # the stem and the reductions' six
    assert cell_convs == 15 * _hand_live_convs(ops, fold)
    assert not any(l.makes_zero for l in g)


def test_pytorch_eager_prices_the_graph_as_written():
    t = nb201_table(("nor_conv_3x3", "none", "none", "skip_connect", "none", "none"))
    host = estimate_table(t, None, "host")
    assert host.macs == t.macs and sum(l.kind == "act" and l.name.startswith("mul") for l in host.layers) == 60


# --- integer kernels and boundaries (ONNX Runtime's QDQ rule) -----------------------------------

@pytest.fixture(scope="module")
def chain():
    return trace(build_model("vgg_small", in_channels=1, num_classes=10), (1, 28, 28))


def _row(cost, name):
    return next(l for l in cost.layers if l.name == name)


def test_int8_conv_between_float_layers_costs_more_than_in_an_int8_region(chain):
    layers = chain.compressible()
    k = layers[3]
    # The rule holds whatever int8 kernels gain on the machine host-ort was fitted on (little on an
    # AVX2 CPU, much with VNNI): shown with the fitted efficiencies and with int8 at fp32's.
    ort = get_target("host-ort")
    vnni = dataclasses.replace(ort, efficiency={**ort.efficiency, **{f"{c}_int": ort.efficiency[c] for c in
                                                                     ("conv", "pointwise", "dwconv", "linear")}})
    for target in (ort, vnni):
        lone = estimate_table(chain, Policy(layers={k: INT8}), target)
        region = estimate_table(chain, Policy(layers={n: INT8 for n in layers[2:5]}), target)
        # Alone, its result goes to a float layer: no QLinearConv forms, it runs the float kernel
        # (priced as in the fp32 model) behind a quantize -> dequantize of its input.
        assert _row(lone, k).compute_bits == 32 and _row(region, k).compute_bits == 8
        assert _row(lone, k).latency_ms == pytest.approx(_row(estimate_table(chain, None, target), k).latency_ms)
        conv_paid = [l for l in lone.layers if l.kind in ("quantize", "dequantize")]
        assert len(conv_paid) == 2 and all(l.latency_ms > 0 for l in conv_paid)
    alone = _row(lone, k).latency_ms + sum(l.latency_ms for l in conv_paid)
    assert alone > _row(region, k).latency_ms
    # On a runtime with int8 kernels for every quantized layer (LiteRT) it does run int8.
    assert _row(estimate_table(chain, Policy(layers={k: INT8}), "arm-a72"), k).compute_bits == 8


def test_region_boundary_adds_its_quantize_dequantize_cost(chain):
    layers = chain.compressible()
    c = estimate_table(chain, Policy(layers={n: INT8 for n in layers[1:5]}), "host-ort")
    conv = [l for l in c.layers if l.kind in ("quantize", "dequantize")]
    # one quantize entering the region, one dequantize leaving it; interior tensors stay int8
    assert sorted(l.kind for l in conv) == ["dequantize", "quantize"] and all(l.latency_ms > 0 for l in conv)
    assert [l.compute_bits for l in c.layers if l.name in layers[1:4]] == [8, 8, 8]
    assert _row(c, layers[4]).compute_bits == 32  # the region's last conv writes to float: float kernel
    assert abs(sum(l.latency_ms for l in c.layers) - c.latency_ms) < 1e-9 * c.latency_ms


def test_int4_on_onnx_runtime_cpu_is_priced_as_the_float_kernel_that_runs(chain):
    layers = chain.compressible()
    pol = Policy(layers={n: LP(weight_bits=4, act_bits=8) for n in layers})
    ort = estimate_table(chain, pol, "host-ort")
    assert {l.compute_bits for l in ort.layers if l.name in layers} == {32}
    assert ort.size_bytes < estimate_table(chain, Policy(layers={"_default": INT8}), "host-ort").size_bytes
    assert {l.compute_bits for l in estimate_table(chain, pol, "arm-m7").layers if l.name in layers} == {8}


def test_lowrank_factors_are_priced_as_the_convs_they_become(chain):
    k = chain.compressible()[3]
    c = estimate_table(chain, Policy(layers={k: LP(rank_ratio=0.5)}), "host-ort")
    names = [l.name for l in c.layers]
    assert f"{k}.0" in names and f"{k}.1" in names and k not in names


def test_residual_add_after_a_folded_bn_fuses_into_the_conv_where_the_runtime_fuses_it():
    # conv -> BN -> (+ shortcut): the BN folds into the conv and ONNX Runtime's NCHWc conv
    # accumulates into the sum, so the add costs nothing there; PyTorch eager runs it.
    table = trace(build_model("resnet20", in_channels=1, num_classes=10), (1, 28, 28))
    adds = [l.name for l in table if l.kind == "add"]
    assert len(adds) == 9
    for target, fused in (("host-ort", True), ("host", False)):
        rows = [_row(estimate_table(table, None, target), n) for n in adds]
        assert all((r.latency_ms == 0) == fused for r in rows), target


# --- the rules are data, and a malformed rule is named --------------------------------------------

def test_every_shipped_target_names_its_runtime():
    for p in TARGETS_DIR.glob("*.yaml"):
        assert load_target(p).runtime.name != "unspecified", p.name


@pytest.mark.parametrize("path,value,named", [
    (("runtime", "graph", "dead_code"), "yes", "runtime.graph.dead_code"),
    (("runtime", "graph", "dead_cod"), True, "runtime.graph.dead_cod"),
    (("runtime", "integer_kernels", "output"), "sometimes", "runtime.integer_kernels.output"),
    (("runtime", "integer_kernels", "ops"), ["conv3d"], "runtime.integer_kernels.ops"),
    (("runtime", "integer_kernels", "weight_bits"), [8, 64], "runtime.integer_kernels.weight_bits"),
    (("runtime", "name"), "tvm", "runtime.name"),
    (("fusion", "relu"), True, "fusion.relu"),
])
def test_malformed_runtime_rule_is_rejected_naming_the_field(tmp_path, path, value, named):
    d = yaml.safe_load((TARGETS_DIR / "host-ort.yaml").read_text())
    node = d
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(TargetError, match=named.replace(".", r"\.")):
        load_target(p)


def test_runtime_rules_round_trip_through_save_target(tmp_path):
    from squeezer.hw_models.targets import save_target

    t = get_target("host-ort")
    assert load_target(save_target(t, tmp_path / "t.yaml")).runtime == t.runtime
