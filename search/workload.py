"""What a run compresses and how it is judged: the model, its data, the metric and the loss.

A :class:`Workload` comes from names (``--model resnet20 --dataset fashion-mnist``: the
model is built and its base trained once, cached under ``runs/.cache``) or from objects a
user passes to :func:`squeezer.search` (a trained ``nn.Module``, ``(train, val[, test])``
datasets, a metric, a loss). A run's ``config.yaml`` names what came as an object
``object:<Class>``: such a run is resumed by passing the same objects again.

Example:
    >>> from squeezer.search.config import SearchConfig
    >>> w = named_workload(SearchConfig(model="lenet5", dataset="digits"))
    >>> w.model_name, w.data.input_shape, w.metric_name, w.needs_objects()
    ('lenet5', (1, 8, 8), 'accuracy', [])
"""

from __future__ import annotations

import copy
import hashlib
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..compressors.registry import did_you_mean
from ..evaluators.checkpoint import (
    OBJECT_PREFIX,
    CheckpointError,
    load_checkpoint,
    load_state_dict_into,
    save_checkpoint,
    weights_sha1,
)
from ..evaluators.datasets import KNOWN, load_dataset
from ..evaluators.models import TORCHVISION_PREFIX, ZOO, build_model, known_models
from ..evaluators.splits import DataSplits, from_objects
from ..evaluators.train import Loss, Metric, score, train
from .config import SearchConfig
from .errors import UserError

log = logging.getLogger("squeezer")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def object_name(obj: Any) -> str:
    """The name a run records for a model or dataset passed as an object."""
    return f"{OBJECT_PREFIX}{type(obj).__name__}"


@dataclass
class Workload:
    """The model (by name, or the user's trained object), the data, and how models are judged
    (``metric``, higher is better; None = top-1 accuracy) and fine-tuned (``loss``; None =
    cross-entropy with distillation)."""

    model_name: str
    data: DataSplits
    model: nn.Module | None = None
    metric: Metric | None = None
    loss: Loss | None = None
    weights: str | None = None   # pretrained weights of a torchvision model built by name

    @property
    def metric_name(self) -> str:
        return "accuracy" if self.metric is None else getattr(self.metric, "__name__", "metric")

    def needs_objects(self) -> list[str]:
        """What a config of this workload cannot rebuild by name (``model``, ``data``)."""
        return [what for what, name in (("model", self.model_name), ("data", self.data.name))
                if name.startswith(OBJECT_PREFIX)]

    def architecture(self) -> nn.Module:
        """A model of the base's architecture (untrained when built by name)."""
        if self.model is not None:
            return copy.deepcopy(self.model).eval()
        if self.data.num_classes is None:
            raise UserError(f"model {self.model_name} is built by name, but the data does not say how many classes "
                            "it has; give the dataset a `classes` attribute or pass a model object")
        try:
            return build_model(self.model_name, in_channels=self.data.input_shape[0],
                               num_classes=self.data.num_classes, weights=self.weights)
        except ValueError as e:
            raise UserError(str(e)) from None

    def score(self, model: nn.Module, split: Any) -> float:
        """The metric of ``model`` on ``split`` (a split of :attr:`data`)."""
        return score(model, split, self.metric)


def load_data(cfg: SearchConfig) -> DataSplits:
    """The named dataset of ``cfg`` (one-line errors for missing or unknown data)."""
    if cfg.dataset.startswith(OBJECT_PREFIX):
        raise UserError(f"this run's data was passed as a Python object ({cfg.dataset}); pass it again: "
                        "squeezer.resume(RUN, data=(train, val))")
    if cfg.normalize == "auto" and cfg.weights:
        log.info("input normalisation: ImageNet's mean and std (what pretrained --weights expect; --normalize "
                 "dataset uses the dataset's own)")
    try:
        return load_dataset(cfg.dataset, cfg.data_root, val_size=cfg.val_size, seed=cfg.seed, image_size=cfg.image_size,
                            normalize=cfg.normalization, workers=cfg.workers_for(True))
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None


def check_names(cfg: SearchConfig) -> None:
    """The model and dataset ``cfg`` names exist (a one-line error with a hint, before any work)."""
    factory = ":" in cfg.model and not cfg.model.startswith(TORCHVISION_PREFIX)  # pkg.mod:factory, checked later
    if not cfg.model.startswith(OBJECT_PREFIX) and not factory and cfg.model not in ZOO \
            and cfg.model.removeprefix(TORCHVISION_PREFIX) not in known_models():  # (lists torchvision's: after ZOO)
        try:
            build_model(cfg.model, in_channels=1, num_classes=10)
        except ValueError as e:
            raise UserError(str(e)) from None
    if not cfg.dataset.startswith((OBJECT_PREFIX, "imagefolder:")) and cfg.dataset not in KNOWN:
        raise UserError(did_you_mean(cfg.dataset, list(KNOWN), "dataset"))


def splits_of(data: Any, workers: int = 0) -> DataSplits:
    """Data a user passed as objects: ``(train, val[, test])`` Datasets/DataLoaders (a Dataset read
    by ``workers`` loader processes; a DataLoader keeps its own), or DataSplits."""
    if isinstance(data, DataSplits):
        return data
    try:
        return from_objects(data, workers=workers)
    except TypeError as e:
        raise UserError(str(e)) from None


def named_workload(cfg: SearchConfig, *, data: DataSplits | None = None) -> Workload:
    """The workload ``cfg`` names (model and dataset by name)."""
    if cfg.model.startswith(OBJECT_PREFIX):
        raise UserError(f"this run's model was passed as a Python object ({cfg.model}); pass it again: "
                        "squeezer.resume(RUN, model=...)")
    return Workload(cfg.model, data if data is not None else load_data(cfg), weights=cfg.weights)


def base_cache_path(cache_root: Path, cfg: SearchConfig, *, train_size: int | None = None) -> Path:
    """Where a base model trained from ``cfg`` is cached (one file per model, dataset, seed,
    epochs, validation split, and where set: image size, normalisation, batch size, loader
    workers (their random crops) and pretrained weights (the file's path, size and time): the
    settings that decide its weights)."""
    def safe(s: str) -> str:
        return s.replace(":", "_").replace("/", "_")

    extra = f"-n{train_size}" if train_size else ""
    if cfg.image_size is not None:
        extra += f"-i{cfg.image_size}"
    if cfg.normalization != "dataset":
        extra += f"-{cfg.normalization}"
    if cfg.batch_size != SearchConfig.batch_size:
        extra += f"-b{cfg.batch_size}"
    if cfg.dataset.startswith("imagefolder:"):
        extra += f"-lw{cfg.workers_for(True)}"
    if cfg.weights:
        extra += f"-w{_weights_id(cfg.weights)}"
    return Path(cache_root) / f"{safe(cfg.model)}-{safe(cfg.dataset)}-s{cfg.seed}-e{cfg.base_epochs:g}" \
                              f"-v{cfg.val_size}{extra}.pt"


def _weights_id(weights: str) -> str:
    """Weights named by torchvision as they are; a file by a digest of its path, size and time."""
    p = Path(weights)
    if not p.is_file():
        return weights
    st = p.stat()
    return hashlib.sha1(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:10]


def train_base(model: nn.Module, data: DataSplits, cfg: SearchConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train a base model from scratch as ``cfg`` says; returns its metadata."""
    log.info("base model: training %s on %s for %g epochs (cached for later runs)", cfg.model, cfg.dataset,
             cfg.base_epochs)
    t0 = time.time()
    try:
        train(model, data.train, epochs=cfg.base_epochs, lr=cfg.base_lr, batch_size=cfg.batch_size, seed=cfg.seed,
              augment=data.input_shape[1] >= 16, progress=progress, desc="base model")
    except FloatingPointError as e:
        raise UserError(f"training the base model diverged ({e}); lower base_lr (now {cfg.base_lr:g}) or pass "
                        "a trained model (--checkpoint)") from None
    return {"source": "trained", "train_seconds": round(time.time() - t0, 1)}


def save_base(path: Path, model: nn.Module, workload: Workload, meta: dict[str, Any]) -> None:
    data = workload.data
    save_checkpoint(path, model, model_name=workload.model_name, input_shape=data.input_shape,
                    num_classes=data.num_classes, normalization={"mean": data.mean, "std": data.std}, meta=meta)


def build_base(cfg: SearchConfig, workload: Workload, base_path: Path, cache_root: Path, *,
               progress: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The trained base model, saved to ``base_path``: the run's own copy if it has one, else the
    user's object, ``--checkpoint``, the cache, or trained once (from an initialisation
    ``cfg.seed`` fixes: one seed, one base)."""
    seed_everything(cfg.seed)
    model = workload.architecture()
    if base_path.is_file():
        return _run_base(base_path, workload, model)
    if workload.model is not None:
        meta: dict[str, Any] = {"source": "object", "weights_sha1": weights_sha1(model.state_dict())}
    elif cfg.checkpoint:
        try:
            load_state_dict_into(model, cfg.checkpoint)
        except CheckpointError as e:
            raise UserError(str(e)) from None
        meta = {"source": str(cfg.checkpoint)}
    else:
        model, meta = _cached_or_trained(model, cfg, workload, base_cache_path(cache_root, cfg), progress=progress)
    model.eval()
    save_base(base_path, model, workload, meta)
    return model, meta


def _run_base(path: Path, workload: Workload, arch: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """The run's saved base model; for an object run, the object passed again must be it. A base
    that cannot be read is refused: the run's trials were trained from it."""
    try:
        loaded = load_checkpoint(path, architecture=arch if workload.model is not None else None)
    except CheckpointError as e:
        raise UserError(f"{e}; restore {path.name} from a backup, or delete it to train the base again (the "
                        "trials so far were fine-tuned from the old one)") from None
    saved = loaded.meta.get("weights_sha1")
    if workload.model is not None and saved and saved != weights_sha1(arch.state_dict()):
        raise UserError(f"the model passed differs from this run's base model ({path}: other weights); "
                        "pass the model the run was started with, or start a new run")
    return loaded.model, loaded.meta


def _cached_or_trained(model: nn.Module, cfg: SearchConfig, workload: Workload, cache: Path, *,
                       progress: bool) -> tuple[nn.Module, dict[str, Any]]:
    if cache.is_file():
        try:
            loaded = load_checkpoint(cache)
            log.info("base model: cached %s", cache)
            return loaded.model, loaded.meta
        except CheckpointError as e:  # only a cache: train the base again
            log.warning("base model: the cached %s is unreadable (%s); training it again", cache, e)
    meta = train_base(model, workload.data, cfg, progress=progress)
    save_base(cache, model, workload, meta)
    return model, meta
