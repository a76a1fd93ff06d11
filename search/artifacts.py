"""Export a run's model as deployable artifacts, each verified by its own runtime: :func:`export`.

Without a format it writes the chosen policy (``policy.json``) and the compressed model
(``model.pt``, a ``squeezer.model/1`` checkpoint) into ``RUN/export/``. ``trial=N`` exports
trial N instead; its model is fine-tuned from the base first (``finetune`` epochs) when
``trials/NNNN/model.pt`` does not exist yet.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..compressors.policy import Policy, PolicyError
from ..compressors.registry import UnknownNameError
from ..evaluators.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..evaluators.export import ExportError, ExportResult, VerificationError
from ..evaluators.finetune import compress, finetune
from ..evaluators.formats import EXPORT_FORMATS, export_model
from ..evaluators.splits import DataSplits
from ..evaluators.train import evaluate
from ..hw_models.bench import bench_artifact
from .config import SearchConfig
from .errors import UserError
from .records import read_trial_file
from .runfolder import BASE_METRICS, BASE_MODEL, BEST, MEASURED_SUFFIX, load_config, trial_path, write_json
from .schema import read_run_json, stamped, upgrade
from .workload import load_data

log = logging.getLogger("squeezer")

#: File name of each format's artifact.
SUFFIX = {"policy": "policy.json", "onnx": "model.onnx", "pte": "model.pte", "torchscript": "model.torchscript.pt",
          "state_dict": "model.pt"}


@dataclass
class Exported:
    """What :func:`export` wrote: the artifacts, the model they came from and what the search reported."""

    source: Path
    label: str
    reported: dict[str, Any]
    artifacts: list[ExportResult]
    measured: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """``squeezer.export-result/2``: ``reported`` in the run's vocabulary, each artifact's
        ``test_accuracy`` (top-1, in its own runtime) next to ``torch_test_accuracy``; ``measured``:
        the latency of each runnable artifact measured here next to its runtime's cost model."""
        return stamped("export", {"source": str(self.source), "label": self.label, "reported": self.reported,
                                  "artifacts": [r.to_dict() for r in self.artifacts], "measured": self.measured})


def measure_here(path: Path, *, repeats: int = 50, warmup: int = 10) -> dict[str, Any]:
    """The artifact's batch-1 latency on this machine (one thread, median) and what the cost model
    of its runtime here predicts; written next to it (``<artifact>.latency.json``)."""
    b = bench_artifact(path, batch=1, repeats=repeats, warmup=warmup, threads=1, target="auto")
    row = {"path": str(path), "format": b.kind, "target": b.target, "measured_latency_ms": b.measured_latency_ms,
           "predicted_latency_ms": b.predicted_latency_ms, "repeats": repeats, "threads": 1}
    write_json(path.with_name(path.name + MEASURED_SUFFIX), stamped("measured", row))
    return row


def _check_args(fmt: str | None, trial: int | None, test_size: int | None) -> None:
    if fmt is not None:
        try:
            EXPORT_FORMATS.get(fmt)
        except UnknownNameError as e:
            raise UserError(str(e)) from None
    if trial is not None and trial < 0:
        raise UserError(f"`--trial >= 0` must hold, but got --trial {trial}")
    if test_size is not None and test_size < 1:
        raise UserError(f"`--test-size >= 1` must hold, but got --test-size {test_size}")


def _run_data(cfg: SearchConfig, data_root: str | None, test_size: int | None, data: Any) -> DataSplits:
    """The run's dataset (its test split cut to ``test_size``), or ``data`` passed again."""
    splits = data if data is not None else load_data(cfg.with_(data_root=data_root or cfg.data_root))
    if test_size is not None and splits.test is not None:
        splits = DataSplits(splits.name, splits.train, splits.val, splits.test.subset(test_size), splits.num_classes,
                            splits.mean, splits.std, splits.classes)
    return splits


def _trial_model(run: Path, trial: int, epochs: float | None, data: DataSplits,
                 architecture: nn.Module | None) -> tuple[Path, dict[str, Any]]:
    """Trial ``trial``'s fine-tuned checkpoint (made from the base model if asked) and its metrics."""
    rec_path = trial_path(run, trial)
    if not rec_path.is_file():
        known = sorted(p.stem for p in (run / "trials").glob("[0-9]*.json")) if (run / "trials").is_dir() else []
        raise UserError(f"trial {trial} not found ({rec_path} is missing); trials in {run}: "
                        f"{', '.join(str(int(k)) for k in known) or 'none'}")
    rec = upgrade(read_trial_file(run, trial), "trial")
    metric = (read_run_json(run / BASE_METRICS, "metrics") or {}).get("metric", "accuracy")
    metrics = {"metric": metric, **(rec.get("metrics") or {})}
    ckpt = run / "trials" / f"{trial:04d}" / "model.pt"
    if ckpt.is_file():
        return ckpt, metrics
    if epochs is None:
        raise UserError(f"trial {trial} has no fine-tuned model ({ckpt} is missing); fine-tune it first: "
                        f"squeezer export {run} --trial {trial} --finetune 1")
    try:
        policy = Policy.from_dict(rec.get("policy") or {})
        base = load_checkpoint(run / BASE_MODEL, architecture=architecture)
    except (PolicyError, CheckpointError) as e:
        raise UserError(str(e)) from None
    log.info("fine-tuning trial %d for %g epoch(s) from %s ...", trial, epochs, run / BASE_MODEL)
    model, policy = compress(base.model, policy, base.input_shape, calib=data.train.first_batches(4, 64))
    finetune(model, data.train, teacher=base.model, distill=policy.distill, epochs=epochs, progress=True)
    # A re-fine-tuned trial has its own test score: the search's numbers were from a short fine-tune
    # (top-1 accuracy is measured here; a run's own metric function is not at hand).
    metrics = {**metrics, "finetune_epochs": epochs}
    if metric == "accuracy":
        metrics["test_metric"] = evaluate(model, data.test)
    save_checkpoint(ckpt, model, model_name=base.model_name, input_shape=base.input_shape,
                    num_classes=base.num_classes, policy=policy, normalization=base.normalization, meta=metrics)
    return ckpt, metrics


def export(run: str | Path, fmt: str | None = None, out: str | Path | None = None, *, trial: int | None = None,
           finetune: float | None = None, data_root: str | None = None, test_size: int | None = None,
           model: nn.Module | None = None, data: Any = None) -> Exported:
    """Write the run's chosen model (or trial ``trial``'s) as ``fmt`` (default: policy + state
    dict) and verify each artifact in its runtime on the test split. A run made from objects
    needs its ``model`` (the uncompressed architecture) and ``data`` again.

    Raises:
        UserError: bad arguments, a missing model, or an export the format cannot do.
        VerificationError: an artifact that disagrees with the PyTorch model beyond tolerance.
    """
    run = Path(run)
    cfg = load_config(run)
    _check_args(fmt, trial, test_size)
    splits = _run_data(cfg, data_root, test_size, data)
    if trial is None:
        ckpt = run / BEST / "model.pt"
        if not ckpt.is_file():
            raise UserError(f"{run} has no chosen model yet ({ckpt} is missing); finish the search with "
                            f"`squeezer resume {run}`")
        reported, label = read_run_json(run / BEST / "metrics.json", "metrics") or {}, "best"
    else:
        (ckpt, reported), label = _trial_model(run, trial, finetune, splits, model), f"trial {trial}"
    if test_size is not None:
        reported = {k: v for k, v in reported.items() if k != "test_metric"}  # measured on another set
    try:
        loaded = load_checkpoint(ckpt, architecture=model)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    target = reported.get("target") or cfg.target
    sub = "" if trial is None else f"trial-{trial:04d}/"
    if fmt is None:
        out_dir = Path(out) if out else run / "export" / sub
        jobs = [("policy", out_dir / SUFFIX["policy"]), ("state_dict", out_dir / SUFFIX["state_dict"])]
    else:
        path = Path(out) if out else run / "export" / sub / SUFFIX[fmt]
        jobs = [(fmt, path / SUFFIX[fmt] if path.is_dir() else path)]
    try:
        results = [export_model(loaded, f, p, data=splits, target=target, reported=reported) for f, p in jobs]
    except VerificationError:
        raise
    except ExportError as e:
        raise UserError(str(e)) from None
    measured = [measure_here(r.path) for r in results if r.format in ("onnx", "pte")]
    return Exported(ckpt, label, reported, results, measured)
