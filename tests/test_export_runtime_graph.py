"""What ONNX Runtime runs per inference for an exported model (its optimized graph), not what the file says.

Integer weights outside an int8 kernel must not cost a runtime DequantizeLinear: they are
folded to fp32 once at load. Weights in a fusable QDQ group run as QLinearConv. Numerics are
the same as the plain QDQ form.
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from conftest import compressed, fmnist_subset

from squeezer.compressors.policy import LayerPolicy as LP
from squeezer.compressors.policy import Policy
from squeezer.evaluators.export import deploy_model, export_onnx, onnx_runner, runtime_op_types
from squeezer.evaluators.formats import export_model

torch.set_num_threads(1)

# int8 weights + activations in most layers, a weight-only layer, a float layer, 4-bit weights.
MIXED = Policy(layers={"_default": LP(prune_ratio=0.25, weight_bits=8, act_bits=8),
                       "layer2.0.conv1": LP(weight_bits=8), "layer2.1.conv2": LP(weight_bits=4),
                       "layer3.0.conv2": LP(), "fc": LP(weight_bits=8)})


def _runtime_weight_dq(path) -> list[str]:
    """Weight initializers a DequantizeLinear reads at every inference."""
    inits = {i.name for i in onnx.load(str(path)).graph.initializer}
    return [ins[0] for op, ins in runtime_op_types(path) if op == "DequantizeLinear" and ins[0] in inits]


@pytest.fixture(scope="module")
def mixed():
    return compressed("resnet20", MIXED, base_steps=20, steps=4)


def test_mixed_policy_runs_no_weight_dequantize_and_fuses_int8_layers(mixed, tmp_path):
    r = export_model(mixed, "onnx", tmp_path / "m.onnx", data=fmnist_subset())
    assert abs(r.runtime_test_accuracy - r.torch_test_accuracy) <= 0.005               # verified by ORT on the test set
    assert _runtime_weight_dq(r.path) == []                          # nothing dequantized per inference
    ops = [op for op, _ in runtime_op_types(r.path)]
    assert ops.count("QLinearConv") >= 5                             # int8 w+a layers run int8 kernels
    m = onnx.load(str(r.path))
    counts = json.loads({p.key: p.value for p in m.metadata_props}["squeezer.onnx_weights"])
    assert counts["int8_kernels"] == ops.count("QLinearConv") + ops.count("QGemm")
    assert counts["int8_kernels"] + counts["dequantized_at_load"] == 21  # every layer but the float one
    # The file still stores integers: the folded weights are Cast+Mul of int8/int4 initializers.
    cast_in = {n.input[0] for n in m.graph.node if n.op_type == "Cast"}
    types = {i.data_type for i in m.graph.initializer if i.name in cast_in}
    assert types == {onnx.TensorProto.INT8, onnx.TensorProto.INT4}


def test_folding_changes_speed_not_numbers(mixed, tmp_path):
    """The plain QDQ form (every weight a runtime DequantizeLinear) computes the same logits."""
    d = fmnist_subset()
    dep = deploy_model(mixed.model, mean=d.mean, std=d.std)
    export_onnx(dep, tmp_path / "plain.onnx", d.input_shape, fold_weights=False)
    export_onnx(dep, tmp_path / "fast.onnx", d.input_shape)
    assert len(_runtime_weight_dq(tmp_path / "plain.onnx")) >= 5    # what the folding removes
    x = (d.test.x[:128] * d.std[0] + d.mean[0]).numpy()
    # Without ORT's optimizations both run the same float kernels on the same weight values:
    # DequantizeLinear(q, s) and Cast(q) * s are the same float32 numbers.
    a, b = _run_unoptimized(tmp_path / "plain.onnx", x), _run_unoptimized(tmp_path / "fast.onnx", x)
    np.testing.assert_array_equal(a, b)
    # Optimized, kernels differ (QLinearConv / blocked fp32 convs): float rounding only.
    a, b = onnx_runner(tmp_path / "plain.onnx")(x), onnx_runner(tmp_path / "fast.onnx")(x)
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.97


def _run_unoptimized(path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def test_weight_only_int8_runs_like_fp32(tmp_path):
    """Weight-only int8 (no int8 kernel possible): ORT runs the same ops as for the fp32 model."""
    ld = compressed("mobilenet_v2_050", Policy(layers={"_default": LP(prune_ratio=0.5, weight_bits=8)}),
                    base_steps=20, steps=2)
    r = export_model(ld, "onnx", tmp_path / "w8.onnx", data=fmnist_subset())
    ops = {op for op, _ in runtime_op_types(r.path)}
    assert not ops & {"DequantizeLinear", "QuantizeLinear", "Cast", "Mul"}
    assert r.size_ratio is not None and abs(r.size_ratio - 1) <= 0.15  # still int8-sized on disk


def test_bench_reports_what_ort_runs(mixed, tmp_path, capsys):
    from squeezer.hw_models.bench import bench_artifact
    from squeezer.search.cli import main

    path = export_model(mixed, "onnx", tmp_path / "m.onnx").path
    r = bench_artifact(path, batch=2, repeats=2, warmup=1, target=None)
    assert r.runtime_ops["QLinearConv"] >= 5 and "DequantizeLinear" in r.runtime_ops  # activations only
    assert r.runtime_ops == dict(sorted(Counter(op for op, _ in runtime_op_types(path)).items()))
    assert main(["bench", str(path), "--batch", "2", "--repeats", "2", "--target", "none"]) == 0
    assert f"{r.runtime_ops['QLinearConv']} int8 kernels" in capsys.readouterr().out
