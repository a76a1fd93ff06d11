"""squeezer bench: real latency of exported artifacts, compared with the cost model of the runtime
that ran them here (host-ort for ONNX Runtime, host for PyTorch)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import compressed

from squeezer.compressors.policy import LayerPolicy, Policy
from squeezer.evaluators.formats import export_model
from squeezer.hw_models.bench import BenchError, bench_artifact
from squeezer.search.cli import main

torch.set_num_threads(1)
POLICY = Policy(layers={"_default": LayerPolicy(prune_ratio=0.5, weight_bits=8)})


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    ld = compressed("lenet5", POLICY, steps=0)
    return {fmt: export_model(ld, fmt, d / name).path
            for fmt, name in (("onnx", "m.onnx"), ("torchscript", "m.pt"), ("state_dict", "c.pt"))}


@pytest.mark.parametrize("fmt,kind", [("onnx", "onnx"), ("torchscript", "torchscript"), ("state_dict", "checkpoint")])
def test_bench_measures_each_runtime_and_predicts_host(artifacts, fmt, kind):
    r = bench_artifact(artifacts[fmt], batch=8, repeats=5, warmup=2)
    assert r.kind == kind and r.input_shape == (1, 28, 28)
    assert r.target == ("host-ort" if kind == "onnx" else "host")
    assert 0 < r.measured_latency_ms < 1000 and r.batch == 8
    # (no ordering between batch-1 and batch-8 medians: on a shared machine noise can exceed it)
    assert r.measured_batch_latency_ms > 0 and r.measured_per_image_ms == pytest.approx(r.measured_batch_latency_ms / 8)
    assert r.predicted_latency_ms is not None and r.predicted_latency_ms > 0, r.prediction_note


def test_bench_errors(tmp_path, artifacts):
    with pytest.raises(BenchError, match="artifact not found"):
        bench_artifact(tmp_path / "none.onnx")
    (tmp_path / "x.bin").write_bytes(b"0")
    with pytest.raises(BenchError, match="unknown artifact type '.bin'"):
        bench_artifact(tmp_path / "x.bin")
    with pytest.raises(BenchError, match="`repeats >= 1` must hold"):
        bench_artifact(artifacts["onnx"], repeats=0)


def test_cli_bench_json(artifacts, capsys):
    assert main(["bench", str(artifacts["onnx"]), "--batch", "4", "--repeats", "3", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["schema"] == "squeezer.bench/2" and d["kind"] == "onnx" and d["batch"] == 4
    assert d["measured_latency_ms"] > 0 and d["target"] == "host-ort"
    assert main(["bench", "/nonexistent.onnx"]) == 2
    assert "artifact not found" in capsys.readouterr().err
