"""Export round trips: policy -> apply -> export -> the artifact's own runtime agrees with PyTorch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import compressed, fmnist_subset, make_run

from squeezer.compressors.policy import LayerPolicy, Policy, PolicyError
from squeezer.evaluators.export import (
    SIZE_TOLERANCE,
    MissingExtraError,
    VerificationError,
    compare_runtime,
    onnx_runner,
)
from squeezer.evaluators.formats import EXPORT_FORMATS, export_model
from squeezer.search.cli import main

torch.set_num_threads(1)

PRUNED = Policy(layers={"_default": LayerPolicy(prune_ratio=0.5)})
QUANT8 = Policy(layers={"_default": LayerPolicy(weight_bits=8)})
QUANT8_ACT = Policy(layers={"_default": LayerPolicy(weight_bits=8, act_bits=8)})
DECOMPOSED = Policy(layers={"_default": LayerPolicy(rank_ratio=0.5)})
MIXED = Policy(layers={"_default": LayerPolicy(prune_ratio=0.25, weight_bits=4, act_bits=6, rank_ratio=0.5,
                                               sparsity=0.3)})


def _raw(x: torch.Tensor) -> np.ndarray:
    d = fmnist_subset()
    return (x * d.std[0] + d.mean[0]).numpy()


def _logits(ld, path, n: int = 256) -> tuple[np.ndarray, np.ndarray]:
    x = fmnist_subset().test.x[:n]
    with torch.no_grad():
        ref = ld.model(x).numpy()
    return onnx_runner(path)(_raw(x)), ref


# Float policies (pruning, low-rank, int weights without activation quantization) compute the
# same function in float: logits agree tightly. Activation quantization rounds in two
# runtimes: a level can flip at a rounding tie, so logits agree loosely and argmax nearly always.
@pytest.mark.parametrize("name,policy,atol", [
    ("lenet5", PRUNED, 1e-4), ("lenet5", QUANT8, 1e-4), ("lenet5", DECOMPOSED, 1e-4),
    ("lenet5", MIXED, None), ("resnet20", PRUNED, 1e-3), ("resnet20", MIXED, None),
    ("mobilenet_v2_050", QUANT8, 1e-3), ("mobilenet_v2_050", MIXED, None),
])
def test_onnx_round_trip_matches_pytorch(tmp_path, name, policy, atol):
    steps = 60 if name == "lenet5" else 20
    ld = compressed(name, policy, base_steps=steps, steps=4)
    r = export_model(ld, "onnx", tmp_path / "m.onnx", data=fmnist_subset())
    out, ref = _logits(ld, r.path)
    if atol is not None:
        np.testing.assert_allclose(out, ref, atol=atol * max(1.0, np.abs(ref).max()), rtol=0)
    else:
        spread = ref.std(axis=1).mean()
        assert np.median(np.abs(out - ref)) <= 0.1 * spread
        top2 = np.sort(ref, 1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 0.2 * spread  # not a near-tie of two classes
        if clear.sum() >= 20:  # a barely trained model has few confident predictions
            assert (out.argmax(1) == ref.argmax(1))[clear].mean() >= 0.97
    assert abs(r.runtime_test_accuracy - r.torch_test_accuracy) <= 0.005


def test_onnx_graph_holds_integers_folded_bn_and_raw_input(tmp_path):
    ld = compressed("resnet20", MIXED, base_steps=20, steps=4)
    path = export_model(ld, "onnx", tmp_path / "m.onnx").path
    m = onnx.load(str(path))
    ops = [n.op_type for n in m.graph.node]
    assert "BatchNormalization" not in ops                        # folded into the convs
    assert ops.count("QuantizeLinear") >= 19                       # one per quantized activation
    # Weights reach their conv through DequantizeLinear (int8 kernels) or Cast + Mul (dequantized at load).
    dq_inputs = {n.input[0] for n in m.graph.node if n.op_type in ("DequantizeLinear", "Cast")}
    int_inits = [i for i in m.graph.initializer if i.name in dq_inputs and i.data_type == onnx.TensorProto.INT4]
    assert len(int_inits) >= 19                                   # 4-bit weights stored as INT4
    assert not [i for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 4
                and i.dims[2] == 3]                               # no float 3x3 kernels left
    meta = {p.key: p.value for p in m.metadata_props}
    assert Policy.from_dict(json.loads(meta["squeezer.policy"])) == MIXED
    assert json.loads(meta["squeezer.normalization"])["mean"] == list(fmnist_subset().mean)
    # Zeros of the sparse layers are stored (dense) in the integer codes.
    q = next(i for i in m.graph.initializer if i.name == "model.layer1.0.conv2.0.wq")
    codes = onnx.numpy_helper.to_array(q).astype(np.int8)
    assert (codes == 0).mean() >= 0.29  # floor(numel * 0.3) zeros, at least


def test_int8_onnx_size_within_tolerance_of_packed_size(tmp_path):
    """The overhead of an int8 ONNX over the packed bytes is the graph, metadata and small constants."""
    from squeezer.compressors.packing import pack_model

    ld = compressed("resnet20", QUANT8_ACT, base_steps=20, steps=4)
    r = export_model(ld, "onnx", tmp_path / "m.onnx", data=fmnist_subset())
    packed = len(pack_model(ld.model))
    assert r.expected_bytes == packed
    assert abs(r.file_bytes / packed - 1) <= SIZE_TOLERANCE
    m = onnx.load(str(r.path))
    init_bytes = sum(len(i.raw_data) for i in m.graph.initializer)
    # Tensors: int8 codes + fp32 per-channel scales + folded biases = what the packer stores, so
    # they match closely; the remaining overhead is the graph (nodes) and metadata.
    assert abs(init_bytes / packed - 1) <= 0.03
    graph = sum(n.ByteSize() for n in m.graph.node) + sum(p.ByteSize() for p in m.metadata_props)
    assert r.file_bytes - init_bytes <= graph + 0.02 * packed


def test_torchscript_and_state_dict_round_trip(tmp_path):
    ld = compressed("lenet5", MIXED)
    d = fmnist_subset()
    ts = export_model(ld, "torchscript", tmp_path / "m.pt", data=d)
    assert abs(ts.runtime_test_accuracy - ts.torch_test_accuracy) <= 0.005
    x = d.test.x[:64]
    back = torch.jit.load(str(ts.path))
    with torch.no_grad():
        assert (back(torch.from_numpy(_raw(x))).argmax(1) == ld.model(x).argmax(1)).float().mean() >= 0.97
    sd = export_model(ld, "state_dict", tmp_path / "c.pt", data=d)
    assert sd.max_logit_diff == 0.0
    blob = torch.load(sd.path, weights_only=True)
    assert Policy.from_dict(blob["policy"]) == MIXED
    assert Policy.load(sd.extra_paths[0]) == MIXED


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_policy_export_reads_back(tmp_path, suffix):
    ld = compressed("lenet5", MIXED, steps=0)
    r = export_model(ld, "policy", tmp_path / f"p{suffix}", target="arm")
    assert Policy.load(r.path) == MIXED


def test_old_policy_schema_is_migrated_and_unknown_rejected(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"schema": "squeezer.policy/0", "layers": {"_default": {"bits": 4, "prune": 0.25}}}))
    p = Policy.load(old)
    assert p.for_layer("x").weight_bits == 4 and p.for_layer("x").prune_ratio == 0.25
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "squeezer.policy/9", "layers": {}}))
    with pytest.raises(PolicyError, match="unsupported policy schema 'squeezer.policy/9'"):
        Policy.load(bad)


def test_verification_mismatch_raises(tmp_path):
    ld = compressed("lenet5", QUANT8)
    d = fmnist_subset()
    ok = export_model(ld, "onnx", tmp_path / "a.onnx", data=d)
    with pytest.raises(VerificationError, match="differs from the accuracy the search reported"):
        export_model(ld, "onnx", tmp_path / "b.onnx", data=d, reported={"metric": "accuracy",
                                                                          "test_metric": ok.torch_test_accuracy + 0.02})
    # A search that measured another metric is not compared with the artifact's top-1 accuracy.
    other = export_model(ld, "onnx", tmp_path / "c.onnx", data=d, reported={"metric": "balanced_accuracy",
                                                                            "test_metric": 0.1})
    assert other.reported_test_accuracy is None and other.runtime_test_accuracy == ok.runtime_test_accuracy
    # An artifact that computes something else is caught by its accuracy on the test set.
    wrong = lambda x: onnx_runner(ok.path)(x[:, :, ::-1].copy())  # noqa: E731 - flipped images
    acc, tacc, _ = compare_runtime(ld.model, wrong, d.test, mean=d.mean, std=d.std)
    from squeezer.evaluators.export import check_accuracy
    with pytest.raises(VerificationError, match="PyTorch compressed model"):
        check_accuracy("onnx", acc, tacc, None)


def test_pte_missing_extra_names_the_extra(tmp_path, monkeypatch):
    import squeezer.evaluators.export_pte as ep

    monkeypatch.setattr(ep, "executorch_available", lambda: False)
    with pytest.raises(MissingExtraError, match=r"pip install squeezer\[executorch\]"):
        export_model(compressed("lenet5", QUANT8, steps=0), "pte", tmp_path / "m.pte")


@pytest.mark.skipif(not __import__("squeezer.evaluators.export_pte", fromlist=["x"]).executorch_available(),
                    reason="executorch not installed (pip install squeezer[executorch])")
def test_pte_runs_in_executorch_runtime(tmp_path):
    # A trained base (80% test accuracy): XNNPACK calibrates its own int8 activation grid and
    # computes in integers, and a 60-step base (60%, its predictions near the decision
    # boundaries) flips 0.4-0.9 pp of them on some CPUs; at 80% the artifact is within 0.1 pp.
    r = export_model(compressed("lenet5", QUANT8_ACT, base_steps=300), "pte", tmp_path / "m.pte", data=fmnist_subset())
    assert r.path.stat().st_size > 0 and abs(r.runtime_test_accuracy - r.torch_test_accuracy) <= 0.005
    assert json.loads(r.extra_paths[0].read_text())["squeezer.model"] == "lenet5"


def test_unknown_format_has_did_you_mean():
    with pytest.raises(ValueError, match="did you mean 'onnx'"):
        EXPORT_FORMATS.get("onx")


# --- CLI ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    # A trained base (see test_pte_runs_in_executorch_runtime): the CLI verifies each artifact
    # on the whole test set within 0.5 pp, which a 60%-accurate model misses on some CPUs.
    return make_run(tmp_path_factory.mktemp("run"), "lenet5", QUANT8_ACT, base_steps=300)


def test_cli_export_default_writes_policy_and_loadable_model(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), "--out", str(tmp_path / "out"), "--test-size", "1000"]) == 0
    out = capsys.readouterr().out
    assert "policy.json" in out and "model.pt" in out
    assert Policy.load(tmp_path / "out" / "policy.json") == QUANT8_ACT
    blob = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert blob["format"] == "squeezer.model/1" and blob["policy"] is not None


def test_cli_export_onnx_json_reports_verification(run_dir, capsys):
    assert main(["export", str(run_dir), "--format", "onnx", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    res = out["artifacts"][0]
    assert res["format"] == "onnx" and abs(res["runtime_test_accuracy"] - res["reported_test_accuracy"]) <= 0.005
    assert (run_dir / "export" / "model.onnx").is_file()
    # measured here, next to what the cost model of ONNX Runtime here predicts; the report says which is which
    m = out["measured"][0]
    assert m["target"] == "host-ort" and m["measured_latency_ms"] > 0 and m["predicted_latency_ms"] > 0
    assert (run_dir / "export" / "model.onnx.latency.json").is_file()
    from squeezer.search.report import format_report, report

    rep = report(run_dir)
    assert rep["measured"][0]["measured_latency_ms"] == m["measured_latency_ms"]
    text = format_report(rep)
    assert "latency (predicted)" in text and "measured here: " in text and "host-ort predicts" in text


@pytest.mark.parametrize("argv,msg", [
    (["export", "/nonexistent/run"], "run folder not found"),
    (["export", "RUN", "--format", "onx"], "did you mean 'onnx'"),
    (["export", "RUN", "--trial", "0", "--format", "onnx"], "--trial 0 --finetune"),
    (["export", "RUN", "--trial", "7"], "trial 7 not found"),
])
def test_cli_export_bad_input(run_dir, capsys, argv, msg):
    argv = [str(run_dir) if a == "RUN" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("squeezer: error:") and msg in err and "Traceback" not in err


_EXPORT_MICRO = """
import sys, torch
from squeezer.compressors.policy import LayerPolicy, Policy
from squeezer.hw_models.micro import build_micro, export_policy
torch.manual_seed(0)
policy = Policy(layers={"_default": LayerPolicy(weight_bits=16), "blocks.0.0": LayerPolicy(weight_bits=8)})
export_policy(build_micro("micro:chain1-c8-r8-n2"), policy, (1, 8, 8), sys.argv[1])
"""


def test_an_export_is_the_same_file_in_every_process(tmp_path):
    # fp16 and int8 weights: the exporter's own bookkeeping must not follow string hashing
    files = []
    for seed in ("1", "2"):
        path = tmp_path / f"m{seed}.onnx"
        r = subprocess.run([sys.executable, "-c", _EXPORT_MICRO, str(path)], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        files.append(path.read_bytes())
    assert files[0] == files[1]
