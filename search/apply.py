"""Apply a policy to a trained model, fine-tune it, and measure it: :func:`apply`.

The model is the user's trained ``nn.Module``, or a name (``--checkpoint`` weights, else a base
model trained once and cached under ``runs/.cache``, shared with the search's cache). The
policy's regulariser trains first where it names one; the fine-tune is distilled from the base
model where the policy says so; with no fine-tune, BatchNorm statistics are re-estimated.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import hw_models
from ..compressors.distill import DISTILLATION
from ..compressors.lowrank import DECOMPOSITIONS
from ..compressors.policy import Policy, PolicyError
from ..compressors.pruning import PRUNING_CRITERIA
from ..compressors.quantize import QUANTIZERS
from ..compressors.registry import UnknownNameError
from ..compressors.regularizers import REGULARIZERS
from ..compressors.sharing import SHARING
from ..compressors.sparsity import SPARSITY_METHODS
from ..evaluators.checkpoint import CheckpointError, load_checkpoint, load_state_dict_into, save_checkpoint
from ..evaluators.finetune import compress, finetune, regularized_train
from ..evaluators.splits import DataSplits
from ..evaluators.train import Loss, Metric, recalibrate_bn_
from .config import SearchConfig
from .errors import UserError
from .schema import stamped
from .workload import Workload, base_cache_path, load_data, object_name, splits_of, train_base

log = logging.getLogger("squeezer")

#: Calibration batches (of 128) the data-driven pruning criteria see.
CALIB_BATCHES = 8


@dataclass
class Applied:
    """The compressed, fine-tuned ``model``, the ``policy`` it replays with, and ``metrics`` (with
    the base model's under ``metrics["base"]``)."""

    model: nn.Module
    policy: Policy
    metrics: dict[str, Any]


def check_policy_names(policy: Policy) -> None:
    """Every method the policy names exists (before any training); one line with a hint otherwise."""
    checks = [(PRUNING_CRITERIA, policy.pruning.criterion), (SPARSITY_METHODS, policy.sparsity.method)]
    for lp in policy.layers.values():
        checks += [(QUANTIZERS, lp.quantizer), (DECOMPOSITIONS, lp.decomposition)]
        if lp.sharing is not None:
            checks.append((SHARING, lp.sharing))
    if policy.regularizer is not None:
        checks.append((REGULARIZERS, policy.regularizer))
    if policy.distill is not None:
        checks.append((DISTILLATION, policy.distill.method))
    for reg, name in checks:
        try:
            reg.get(name)
        except UnknownNameError as e:
            raise UserError(f"policy: {e}") from None


def load_policy(policy: Policy | str | Path) -> Policy:
    """A policy object, or one read from a ``squeezer.policy/1`` file; its method names checked."""
    if not isinstance(policy, Policy):
        try:
            policy = Policy.load(policy)
        except PolicyError as e:
            raise UserError(str(e)) from None
    check_policy_names(policy)
    return policy


def measure(model: nn.Module, input_shape: tuple[int, ...], policy: Policy | None, target: str) -> dict[str, Any]:
    """Size, latency and energy of ``model`` with ``policy`` on ``target`` (the cost model)."""
    try:
        cost = hw_models.estimate(model, input_shape=input_shape, target=target, policy=policy)
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise UserError(f"target {target!r}: {str(e).strip(chr(39))}") from None
    return {"size_bytes": int(cost.size_bytes), "latency_ms": float(cost.latency_ms),
            "energy_mj": float(cost.energy_mj), "macs": int(cost.macs), "param_count": int(cost.params),
            "target": cost.target or target, "cost_source": "hw_models"}


def base_model(workload: Workload, cfg: SearchConfig, *, cache: Path, train_size: int | None,
               progress: bool) -> tuple[nn.Module, dict[str, Any]]:
    """The trained model to compress: the object, ``cfg.checkpoint``, the cache, or trained once."""
    if workload.model is not None:
        return workload.model.eval(), {"source": "object"}
    torch.manual_seed(cfg.seed)  # the initialisation too: one seed, one base
    model = workload.architecture()
    if cfg.checkpoint:
        try:
            load_state_dict_into(model, cfg.checkpoint)
        except CheckpointError as e:
            raise UserError(str(e)) from None
        return model.eval(), {"source": str(cfg.checkpoint)}
    path = base_cache_path(cache, cfg, train_size=train_size)
    if path.is_file():
        try:
            return load_checkpoint(path).model.eval(), {"source": str(path)}
        except CheckpointError:
            log.warning("ignoring unreadable cache %s", path)
    meta = train_base(model, workload.data, cfg, progress=progress)
    data = workload.data
    save_checkpoint(path, model, model_name=cfg.model, input_shape=data.input_shape, num_classes=data.num_classes,
                    normalization={"mean": data.mean, "std": data.std}, meta={"source": "trained"})
    return model.eval(), {**meta, "cached": str(path)}


def _data(data: Any, cfg: SearchConfig, train_size: int | None) -> DataSplits:
    if isinstance(data, DataSplits):
        splits = data
    elif data is None or isinstance(data, str):
        splits = load_data(cfg)
    else:
        splits = splits_of(data)
    if train_size:
        splits = DataSplits(splits.name, splits.train.subset(train_size, seed=cfg.seed), splits.val, splits.test,
                            splits.num_classes, splits.mean, splits.std, splits.classes)
    return splits


def apply(model: Any, policy: Policy | str | Path, *, data: Any = "fashion-mnist", finetune_epochs: float = 1.0,
          lr: float = 0.01, target: str = "arm", seed: int = 0, base_epochs: float = 2.0,
          train_size: int | None = None, checkpoint: str | None = None, data_root: str | None = None,
          cache: str | Path = "runs/.cache", metric: Metric | None = None, loss: Loss | None = None,
          out: str | Path | None = None, progress: bool = True) -> Applied:
    """Apply ``policy`` to ``model``, fine-tune ``finetune_epochs``, measure on the test split.

    ``metrics`` (``squeezer.apply/2``) has the metric's name and ``test_metric`` (``val_metric``
    when the data has no test split), the cost figures on ``target`` and the same for the base
    model under ``base``.

    Example:
        >>> from squeezer import LayerPolicy, Policy
        >>> m = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10))
        >>> r = apply(m, Policy(layers={"_default": LayerPolicy(weight_bits=8)}), data="digits", finetune_epochs=0,
        ...           progress=False)
        >>> r.metrics["size_bytes"] < r.metrics["base"]["size_bytes"]
        True
    """
    if finetune_epochs < 0:
        raise UserError(f"`finetune_epochs >= 0` must hold, but got {finetune_epochs}")
    policy = load_policy(policy)
    name = model if isinstance(model, str) else object_name(model)
    cfg = SearchConfig(model=name, dataset=data if isinstance(data, str) else "object:data", data_root=data_root,
                       seed=seed, base_epochs=base_epochs, checkpoint=checkpoint)
    splits = _data(data, cfg, train_size)
    workload = Workload(name, splits, model if isinstance(model, nn.Module) else None, metric, loss)
    base, base_meta = base_model(workload, cfg, cache=Path(cache), train_size=train_size, progress=progress)
    t0 = time.time()
    test, key = (splits.test, "test_metric") if splits.test is not None else (splits.val, "val_metric")
    base_score = workload.score(base, test)
    model_c, resolved = _compress(base, policy, splits, finetune_epochs, lr, seed, loss, progress)
    score = workload.score(model_c, test)
    metrics = stamped("apply", {
        "model": name, "dataset": splits.name, "metric": workload.metric_name, key: score,
        **measure(base, splits.input_shape, resolved, target), "finetune_epochs": finetune_epochs,
        "wall_seconds": round(time.time() - t0, 1), "policy": resolved.to_dict(),
        "base": {key: base_score, **measure(base, splits.input_shape, None, target), **base_meta}})
    if out:
        save_checkpoint(out, model_c, model_name=name, input_shape=splits.input_shape, num_classes=splits.num_classes,
                        policy=resolved, normalization={"mean": splits.mean, "std": splits.std},
                        meta={"metric": workload.metric_name, key: score})
        metrics["out"] = str(out)
    return Applied(model_c, resolved, metrics)


def _compress(base: nn.Module, policy: Policy, data: DataSplits, epochs: float, lr: float, seed: int,
              loss: Loss | None, progress: bool) -> tuple[nn.Module, Policy]:
    """Regularised training where the policy names a regulariser, then compress and fine-tune."""
    start = base
    torch.manual_seed(seed)
    if policy.regularizer is not None:
        start = copy.deepcopy(base)
        regularized_train(start, data.train, policy, epochs=max(epochs, 0.5), lr=lr, seed=seed, progress=progress,
                          desc="regularised training")
    calib = data.train.first_batches(CALIB_BATCHES, 128, seed=seed)
    try:
        model, resolved = compress(start, policy, data.input_shape, calib=calib)
    except ValueError as e:
        raise UserError(f"cannot apply the policy to the model: {e}") from None
    if epochs > 0:
        finetune(model, data.train, teacher=base, distill=policy.distill, epochs=epochs, lr=lr, seed=seed,
                 progress=progress, loss_fn=loss)
    else:
        recalibrate_bn_(model, data.train, loss_fn=loss)
    return model, resolved

