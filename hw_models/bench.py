"""Measure the real latency of an exported artifact on this machine.

``bench_artifact(path)`` loads ``.onnx`` (ONNX Runtime), ``.pte`` (ExecuTorch runtime) or
``.pt`` (TorchScript, or a ``squeezer.model/1`` checkpoint run in eager PyTorch), runs it
``warmup`` times, then times ``repeats`` runs at batch 1 and at batch ``batch`` and reports
the medians. When the artifact says which model and policy it holds, the cost model of the
runtime that ran it on this machine (:data:`HOST_TARGETS`: ``host-ort`` for ONNX Runtime,
``host-xnnpack`` for ExecuTorch, ``host`` for PyTorch) predicts it next to the measurement.

Example:
    >>> import tempfile
    >>> from squeezer.evaluators.models import build_model
    >>> from squeezer.evaluators.checkpoint import Loaded
    >>> from squeezer.evaluators.formats import export_model
    >>> ld = Loaded(build_model("lenet5", in_channels=1, num_classes=10).eval(), "lenet5", (1, 28, 28), 10, None)
    >>> p = export_model(ld, "onnx", tempfile.mktemp(suffix=".onnx")).path
    >>> r = bench_artifact(p, batch=4, repeats=3, warmup=1)
    >>> r.measured_latency_ms > 0 and r.batch == 4
    True
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnxruntime as ort
import torch

from ..compressors.policy import Policy
from ..evaluators.checkpoint import CheckpointError, load_checkpoint
from ..evaluators.export import runtime_op_types
from ..evaluators.export_pte import EXTRA_HINT, executorch_available
from ..evaluators.models import build_model
from .cost import estimate
from .targets import list_targets

#: The target that models how this machine runs each artifact kind.
HOST_TARGETS = {"onnx": "host-ort", "pte": "host-xnnpack", "torchscript": "host", "checkpoint": "host"}


def host_target(kind: str) -> str:
    """The cost model of the runtime this machine runs an artifact of ``kind`` in (``host`` if the
    runtime's target is not shipped)."""
    t = HOST_TARGETS.get(kind, "host")
    return t if t in list_targets() else "host"

#: The schema of :meth:`BenchResult.to_dict` (``squeezer bench --json``).
BENCH_SCHEMA = "squeezer.bench/2"


class BenchError(ValueError):
    """The artifact cannot be benchmarked (unknown kind, unreadable, missing input shape)."""


@dataclass(frozen=True)
class BenchResult:
    """Median latencies of one artifact on this machine (``measured_*``) and the cost model's
    (``predicted_latency_ms``: what ``latency_ms`` is in every other JSON).

    Attributes:
        measured_latency_ms: median batch-1 latency.
        measured_batch_latency_ms: median latency of one batch of ``batch`` (``None`` if the artifact
            has a fixed batch of 1, as ExecuTorch programs do).
        measured_per_image_ms: ``measured_batch_latency_ms / batch``.
        predicted_latency_ms: the cost model's batch-1 latency for ``target`` (``None`` if unavailable).
        runtime_ops: for ONNX, how many of each op ONNX Runtime runs per inference (its optimized
            graph): ``QLinearConv`` are int8 kernels; ``DequantizeLinear``/``QuantizeLinear`` are
            conversions paid at every inference.
    """

    artifact: str
    kind: str
    input_shape: tuple[int, ...]
    batch: int
    repeats: int
    warmup: int
    threads: int
    measured_latency_ms: float
    measured_batch_latency_ms: float | None
    measured_per_image_ms: float | None
    target: str | None = None
    predicted_latency_ms: float | None = None
    prediction_note: str | None = None
    runtime_ops: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        """``squeezer.bench/2`` (keys as in the README's "JSON fields")."""
        return {"schema": BENCH_SCHEMA, **asdict(self), "input_shape": list(self.input_shape)}


def _median_ms(fn: Callable[[], Any], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def load_artifact(path: str | Path, *, threads: int = 1) -> tuple[str, Callable[[np.ndarray], Any], dict[str, Any]]:
    """(kind, run(x), metadata) for an exported artifact; metadata keys as in ``ExportJob.metadata``."""
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"artifact not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        import onnx  # 0.85 s to import: only for .onnx artifacts

        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        shape = sess.get_inputs()[0].shape
        if "squeezer.input_shape" not in meta and all(isinstance(s, int) for s in shape[1:]):
            meta["squeezer.input_shape"] = json.dumps(shape[1:])
        return "onnx", lambda x: sess.run(None, {name: x}), meta
    if suffix == ".pte":
        if not executorch_available():
            raise BenchError(EXTRA_HINT)
        from executorch.runtime import Runtime

        method = Runtime.get().load_program(str(path)).load_method("forward")
        side = path.with_name(path.name + ".json")
        meta = json.loads(side.read_text()) if side.is_file() else {}
        return "pte", lambda x: method.execute([torch.from_numpy(x)]), meta
    if suffix in (".pt", ".pth"):
        torch.set_num_threads(threads)
        if zipfile.is_zipfile(path):
            try:
                extra = {"squeezer.json": ""}
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    mod = torch.jit.load(str(path), _extra_files=extra)
                meta = json.loads(extra["squeezer.json"]) if extra["squeezer.json"] else {}
                return "torchscript", lambda x: mod(torch.from_numpy(x)), meta
            except RuntimeError:
                pass  # not TorchScript: a torch.save checkpoint (also a zip)
        try:
            ld = load_checkpoint(path)
        except CheckpointError as e:
            raise BenchError(str(e)) from None
        meta = {"squeezer.model": ld.model_name, "squeezer.input_shape": json.dumps(list(ld.input_shape)),
                "squeezer.num_classes": str(ld.num_classes),
                "squeezer.policy": json.dumps(ld.policy.to_dict() if ld.policy else None)}
        model = ld.model.eval()

        def run(x: np.ndarray) -> Any:
            with torch.no_grad():
                return model(torch.from_numpy(x))

        return "checkpoint", run, meta
    raise BenchError(f"unknown artifact type {path.suffix!r} for {path.name}; expected .onnx, .pte, .pt or .pth")


def predict_latency_ms(meta: dict[str, Any], target: str) -> tuple[float | None, str]:
    """The cost model's batch-1 latency of the model/policy recorded in ``meta`` on ``target``."""
    name = meta.get("squeezer.model")
    if not name:
        return None, "the artifact does not record its model; no prediction"
    try:
        shape = json.loads(meta["squeezer.input_shape"])
        pol_raw = json.loads(meta.get("squeezer.policy") or "null")
        policy = Policy.from_dict(pol_raw) if pol_raw else None
        model = build_model(name, in_channels=int(shape[0]), num_classes=int(meta.get("squeezer.num_classes", 10)))
        cost = estimate(model, tuple(shape), target, policy)
    except Exception as e:  # noqa: BLE001 - a prediction is extra information, never a failure
        return None, f"no prediction: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return float(cost.latency_ms), f"hw_models.estimate(target={target!r})"


def bench_artifact(path: str | Path, *, batch: int = 32, repeats: int = 30, warmup: int = 5, threads: int = 1,
                   input_shape: Sequence[int] | None = None, target: str | None = "auto") -> BenchResult:
    """Median latency of ``path`` at batch 1 and batch ``batch`` (see module docstring); ``target``
    ``"auto"`` predicts with the runtime's host target (:func:`host_target`), ``None`` not at all."""
    for what, v, lo in (("batch", batch, 1), ("repeats", repeats, 1), ("warmup", warmup, 0), ("threads", threads, 1)):
        if v < lo:
            raise BenchError(f"`{what} >= {lo}` must hold, but got {what}={v}")
    kind, run, meta = load_artifact(path, threads=threads)
    if input_shape is None:
        if "squeezer.input_shape" not in meta:
            raise BenchError(f"{Path(path).name} does not record its input shape; pass --input-shape C,H,W")
        input_shape = json.loads(meta["squeezer.input_shape"])
    shape = tuple(int(s) for s in input_shape)
    rng = np.random.default_rng(0)
    x1 = rng.random((1, *shape), dtype=np.float32)
    lat1 = _median_ms(lambda: run(x1), repeats, warmup)
    lat_b = None
    if kind != "pte" and batch > 1:
        xb = rng.random((batch, *shape), dtype=np.float32)
        lat_b = _median_ms(lambda: run(xb), max(3, repeats // 4), max(1, warmup // 2))
    elif kind != "pte":
        lat_b = lat1
    if target == "auto":
        target = host_target(kind)
    pred, note = predict_latency_ms(meta, target) if target else (None, None)
    ops = None
    if kind == "onnx":
        ops = dict(sorted(Counter(op for op, _ in runtime_op_types(path, threads=threads)).items()))
    return BenchResult(str(path), kind, shape, batch if lat_b is not None else 1, repeats, warmup, threads, lat1, lat_b,
                       None if lat_b is None else lat_b / batch, target, pred, note, ops)
