"""Shared fixtures: small real data and briefly trained models (session-scoped, cached), and the
export tests' helpers (plain functions, cached per process: ``from conftest import compressed``)."""

from __future__ import annotations

import copy
import functools
import itertools
import json
import os
from pathlib import Path

import pytest
import torch

from squeezer.compressors.apply import apply_policy_
from squeezer.compressors.policy import Policy
from squeezer.evaluators.checkpoint import Loaded, save_checkpoint
from squeezer.evaluators.datasets import DataSplits, load_dataset
from squeezer.evaluators.models import build_model
from squeezer.evaluators.train import evaluate, train

torch.set_num_threads(int(os.environ.get("SQUEEZER_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def digits():
    from squeezer.evaluators.datasets import load_dataset

    return load_dataset("digits", val_size=300)


@pytest.fixture(scope="session")
def fmnist():
    from squeezer.evaluators.datasets import load_dataset

    return load_dataset("fashion-mnist", val_size=2000)


@pytest.fixture(scope="session")
def fmnist_small(fmnist):
    """4,000 training images (real Fashion-MNIST), the full validation/test splits."""
    from squeezer.evaluators.datasets import DataSplits

    return DataSplits(fmnist.name, fmnist.train.subset(4000), fmnist.val.subset(1000), fmnist.test.subset(2000),
                      fmnist.num_classes, fmnist.mean, fmnist.std)


@pytest.fixture(scope="session")
def trained_lenet(fmnist_small):
    from squeezer.evaluators.models import build_model
    from squeezer.evaluators.train import train

    torch.manual_seed(0)
    m = build_model("lenet5", in_channels=1, num_classes=10)
    train(m, fmnist_small.train, epochs=3, lr=0.05, batch_size=64, progress=False)
    return m


@pytest.fixture(scope="session")
def fmnist_default():
    """Fashion-MNIST with the default validation split (5,000), loaded once per session."""
    from squeezer.evaluators.datasets import load_dataset

    return load_dataset("fashion-mnist")


def _lenet(train_data, **train_kw):
    from squeezer.evaluators.models import build_model
    from squeezer.evaluators.train import train

    torch.manual_seed(0)
    m = build_model("lenet5", in_channels=1, num_classes=10)
    train(m, train_data, lr=0.05, progress=False, **train_kw)
    return m


@pytest.fixture(scope="session")
def lenet_4k(fmnist_default):
    """LeNet-5 trained 3 epochs on 4,000 images; ``(model, train, val, val accuracy)``. Copy before changing."""
    from squeezer.evaluators.train import evaluate

    tr, val = fmnist_default.train.subset(4000), fmnist_default.val.subset(1500)
    m = _lenet(tr, epochs=3, batch_size=64)
    return m, tr, val, evaluate(m, val)


@pytest.fixture(scope="session")
def lenet_6k(fmnist_default):
    """LeNet-5 trained 4 epochs on 6,000 images; ``(model, train, test, test accuracy)``. Copy before changing."""
    from squeezer.evaluators.train import evaluate

    tr, te = fmnist_default.train.subset(6000), fmnist_default.test.subset(2000)
    m = _lenet(tr, epochs=4)
    return m, tr, te, evaluate(m, te)


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A finished search (resnet20 on scikit-learn's digits, 3 trials): the report and JSON tests' run."""
    from squeezer.search.config import SearchConfig
    from squeezer.search.pipeline import start

    root = tmp_path_factory.mktemp("rep")
    cfg = SearchConfig(model="resnet20", dataset="digits", budget="60kB", base_epochs=4, trial_steps=4,
                       final_epochs=0.2, trials=3, seed=2, sensitivity=False, run=str(root / "r"))
    start(cfg, progress=False)
    return root / "r"


# --- export tests: compressed models and run folders -----------------------------------------

@functools.lru_cache(maxsize=None)
def fmnist_subset(n_train: int = 3000, n_test: int = 1000) -> DataSplits:
    d = load_dataset("fashion-mnist")
    return DataSplits(d.name, d.train.subset(n_train), d.val.subset(500), d.test.subset(n_test), d.num_classes,
                      d.mean, d.std)


@functools.lru_cache(maxsize=None)
def base_model(name: str, steps: int) -> torch.nn.Module:
    torch.manual_seed(0)
    m = build_model(name, in_channels=1, num_classes=10)
    train(m, fmnist_subset().train, epochs=10, max_steps=steps, lr=0.05, batch_size=64, progress=False)
    return m.eval()


def compressed(name: str, policy: Policy, *, base_steps: int = 60, steps: int = 8) -> Loaded:
    """Base model trained ``base_steps`` steps, policy applied, ``steps`` steps of fine-tune."""
    d = fmnist_subset()
    m = copy.deepcopy(base_model(name, base_steps))
    apply_policy_(m, policy, d.input_shape, data=list(itertools.islice(d.train.batches(64), 2)))
    if steps:
        train(m, d.train, max_steps=steps, lr=0.01, batch_size=64, progress=False)
    m.eval()
    return Loaded(m, name, d.input_shape, 10, policy, {"mean": list(d.mean), "std": list(d.std)})


def make_run(root: Path, name: str, policy: Policy, *, base_steps: int = 60, steps: int = 8,
             target: str = "host") -> Path:
    """A run folder as ``squeezer search`` writes it (config, base, best, one trial)."""
    d = fmnist_subset()
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
