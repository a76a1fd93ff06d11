"""Helpers (not tests) for the export/bench tests: small trained models and run folders like the search writes."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import torch

from compressors.apply import apply_policy_
from compressors.policy import Policy
from evaluators.checkpoint import Loaded, save_checkpoint
from evaluators.datasets import DataSplits, load_dataset
from evaluators.models import build_model
from evaluators.train import evaluate, train


@functools.lru_cache(maxsize=None)
def fmnist(n_train: int = 3000, n_test: int = 1000) -> DataSplits:
    d = load_dataset("fashion-mnist")
    return DataSplits(d.name, d.train.subset(n_train), d.val.subset(500), d.test.subset(n_test), d.num_classes,
                      d.mean, d.std)


@functools.lru_cache(maxsize=None)
def base_model(name: str, steps: int) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model(name, in_channels=1, num_classes=10)
    train(m, fmnist().train, epochs=10, max_steps=steps, lr=0.05, batch_size=64, progress=False)
    return m.eval()


def compressed(name: str, policy: Policy, *, base_steps: int = 60, steps: int = 8) -> Loaded:
    """Base model trained ``base_steps`` steps, policy applied, ``steps`` steps of fine-tune."""
    d = fmnist()
    m = copy.deepcopy(base_model(name, base_steps))
    apply_policy_(m, policy, d.input_shape, data=list(d.train.batches(64))[:2])
    if steps:
        train(m, d.train, max_steps=steps, lr=0.01, batch_size=64, progress=False)
    m.eval()
    return Loaded(m, name, d.input_shape, 10, policy, {"mean": list(d.mean), "std": list(d.std)})


def make_run(root: Path, name: str, policy: Policy, *, base_steps: int = 60, steps: int = 8,
             target: str = "host") -> Path:
    """A run folder as ``squeezer search`` writes it (config, base, best, one trial)."""
    d = fmnist()
    run = root / "run"
    (run / "trials").mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(f"model: {name}\ndataset: fashion-mnist\ntarget: {target}\nseed: 0\n")
    base = base_model(name, base_steps)
    save_checkpoint(run / "base" / "model.pt", base, model_name=name, input_shape=d.input_shape, num_classes=10,
                    normalization={"mean": list(d.mean), "std": list(d.std)})
    ld = compressed(name, policy, base_steps=base_steps, steps=steps)
    acc = evaluate(ld.model, load_dataset("fashion-mnist").test)  # the CLI verifies on the whole test set
    metrics = {"test_accuracy": acc, "val_accuracy": acc, "size_bytes": 1, "latency_ms": 1.0, "energy_mj": 1.0,
               "target": target}
    save_checkpoint(run / "best" / "model.pt", ld.model, model_name=name, input_shape=d.input_shape,
                    num_classes=10, policy=policy, normalization=ld.normalization, meta=metrics)
    policy.save(run / "best" / "policy.json")
    (run / "best" / "metrics.json").write_text(json.dumps(metrics))
    (run / "trials" / "0000.json").write_text(json.dumps({"number": 0, "policy": policy.to_dict(),
                                                           "metrics": metrics}))
    return run
