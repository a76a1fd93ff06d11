"""The export formats: registry :data:`EXPORT_FORMATS` and :func:`export_model`, the entry point.

Each format writes its artifact and verifies it with its own runtime
(:func:`evaluators.export.verify_artifact`); see :mod:`evaluators.export` for what each holds.

Example:
    >>> import tempfile, torch
    >>> from squeezer.evaluators.models import build_model
    >>> from squeezer.evaluators.checkpoint import Loaded
    >>> m = build_model("lenet5", in_channels=1, num_classes=10).eval()
    >>> ld = Loaded(m, "lenet5", (1, 28, 28), 10, None, {"mean": [0.5], "std": [0.25]})
    >>> r = export_model(ld, "onnx", tempfile.mktemp(suffix=".onnx"))
    >>> r.file_bytes > 200_000
    True
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..compressors.policy import Policy
from ..compressors.registry import Registry
from .checkpoint import Loaded, load_checkpoint, save_checkpoint
from .export import (
    DeployModel,
    ExportError,
    ExportJob,
    ExportResult,
    VerificationError,
    check_accuracy,
    compare_runtime,
    deploy_model,
    export_onnx,
    onnx_runner,
    reported_test_accuracy,
    verify_artifact,
)
from .export_pte import export_pte

#: Format name -> ``fn(job) -> ExportResult`` (writes and verifies).
EXPORT_FORMATS: Registry[Callable[[ExportJob], ExportResult]] = Registry("export format")


@EXPORT_FORMATS.register("policy", summary="squeezer.policy/1 JSON/YAML, replayable with `squeezer apply`")
def _export_policy(job: ExportJob) -> ExportResult:
    pol = job.loaded.policy or Policy()
    path = job.out_path
    if path.suffix not in (".json", ".yaml", ".yml"):
        raise ExportError(f"a policy file needs a .json, .yaml or .yml name, but got {path.name!r}")
    pol.save(path, meta={"model": job.loaded.model_name, "target": job.target,
                         **{k: v for k, v in job.reported.items() if k in ("metric", "test_metric", "size_bytes")}})
    # Verified by replay: the file reads back to the same policy.
    if Policy.load(path) != pol:
        raise VerificationError(f"policy file {path} does not read back to the exported policy")
    return ExportResult(path, "policy", path.stat().st_size, reported_test_accuracy=reported_test_accuracy(job))


@EXPORT_FORMATS.register("state_dict", summary="squeezer.model/1 checkpoint (state dict + policy), torch.load-able")
def _export_state_dict(job: ExportJob) -> ExportResult:
    ld = job.loaded
    path = save_checkpoint(job.out_path, ld.model, model_name=ld.model_name, input_shape=ld.input_shape,
                           num_classes=ld.num_classes, policy=ld.policy, normalization=ld.normalization,
                           meta={**ld.meta, "target": job.target, **{k: v for k, v in job.reported.items()
                                                                     if isinstance(v, (int, float, str))}})
    extra: tuple[Path, ...] = ()
    if ld.policy is not None:
        extra = (ld.policy.save(path.with_name(path.stem + ".policy.json")),)
    back = load_checkpoint(path).model
    acc = tacc = diff = None
    if job.data is not None:
        acc, tacc, diff = compare_runtime(ld.model, lambda a: back(torch.from_numpy(a)).numpy(), job.data.test,
                                          mean=job.mean, std=job.std, raw_input=False)
        check_accuracy("state_dict", acc, tacc, reported_test_accuracy(job))
    return ExportResult(path, "state_dict", path.stat().st_size, acc, tacc, reported_test_accuracy(job),
                        max_logit_diff=diff, extra_paths=extra)


def _deploy(job: ExportJob) -> DeployModel:
    return deploy_model(job.loaded.model, mean=job.mean, std=job.std)


@EXPORT_FORMATS.register("torchscript", summary="torch.jit.trace of the deploy model (dequantized weights), input [0,1]")
def _export_torchscript(job: ExportJob) -> ExportResult:
    dep = _deploy(job)
    x = torch.rand(1, *job.loaded.input_shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(dep.module, (x,))
    extra = {"squeezer.json": json.dumps(job.metadata())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jit.save/load are deprecated in favour of torch.export
        torch.jit.save(traced, str(job.out_path), _extra_files=extra)
        back = torch.jit.load(str(job.out_path))
    return verify_artifact(job, "torchscript", lambda a: back(torch.from_numpy(a)).detach().numpy(), dep, dep.notes)


@EXPORT_FORMATS.register("onnx", summary="ONNX opset 21, QDQ int8/int4 weights, folded BN and normalisation, input [0,1]")
def _export_onnx(job: ExportJob) -> ExportResult:
    dep = _deploy(job)
    notes = dep.notes + export_onnx(dep, job.out_path, job.loaded.input_shape, metadata=job.metadata())
    return verify_artifact(job, "onnx", onnx_runner(job.out_path), dep, notes)


@EXPORT_FORMATS.register("pte", summary="ExecuTorch program, XNNPACK, PT2E int8 (extra: squeezer[executorch])")
def _export_pte(job: ExportJob) -> ExportResult:
    return export_pte(job)


def load_for_export(ckpt_or_loaded: Any):
    """A :class:`evaluators.checkpoint.Loaded` from a path or an already loaded checkpoint."""
    if isinstance(ckpt_or_loaded, Loaded):
        return ckpt_or_loaded
    return load_checkpoint(ckpt_or_loaded)


def export_model(ckpt_or_loaded: Any, fmt: str, out_path: str | os.PathLike, *, data: Any = None,
                 target: str | None = None, reported: Mapping[str, Any] | None = None) -> ExportResult:
    """Write ``fmt`` to ``out_path`` and verify it with its own runtime.

    Args:
        ckpt_or_loaded: a ``squeezer.model/1`` checkpoint path or a ``Loaded``.
        fmt: a name in :data:`EXPORT_FORMATS` (``policy``, ``onnx``, ``pte``, ``torchscript``,
            ``state_dict``).
        out_path: the file to write (parent folders are created).
        data: ``DataSplits``; when given, the artifact runs on ``data.test`` and its accuracy is
            checked against the PyTorch model and ``reported["test_metric"]`` (when
            ``reported["metric"]`` is top-1 ``accuracy``).
        target: hardware target name recorded in the metadata.
        reported: the search's metrics (``best/metrics.json``).

    Raises:
        VerificationError: the artifact disagrees beyond tolerance.
        ExportError: unknown format (``UnknownNameError``), missing extra, unsupported layer.

    Example:
        >>> import tempfile
        >>> from squeezer.evaluators.models import build_model
        >>> from squeezer.evaluators.checkpoint import Loaded
        >>> ld = Loaded(build_model("lenet5", in_channels=1, num_classes=10).eval(), "lenet5", (1, 28, 28), 10, None)
        >>> export_model(ld, "torchscript", tempfile.mktemp(suffix=".pt")).format
        'torchscript'
    """
    runner = EXPORT_FORMATS.get(fmt)
    loaded = load_for_export(ckpt_or_loaded)
    loaded.model.eval()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return runner(ExportJob(loaded, out, data, target, dict(reported or {})))
