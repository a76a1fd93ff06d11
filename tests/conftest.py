"""Shared fixtures: small real data and briefly trained models (session-scoped, cached)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("SQUEEZER_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def digits():
    from evaluators.datasets import load_dataset

    return load_dataset("digits", val_size=300)


@pytest.fixture(scope="session")
def fmnist():
    from evaluators.datasets import load_dataset

    return load_dataset("fashion-mnist", val_size=2000)


@pytest.fixture(scope="session")
def fmnist_small(fmnist):
    """4,000 training images (real Fashion-MNIST), the full validation/test splits."""
    from evaluators.datasets import DataSplits

    return DataSplits(fmnist.name, fmnist.train.subset(4000), fmnist.val.subset(1000), fmnist.test.subset(2000),
                      fmnist.num_classes, fmnist.mean, fmnist.std)


@pytest.fixture(scope="session")
def trained_lenet(fmnist_small):
    from evaluators.models import build_model
    from evaluators.train import train

    torch.manual_seed(0)
    m = build_model("lenet5", in_channels=1, num_classes=10)
    train(m, fmnist_small.train, epochs=3, lr=0.05, batch_size=64, progress=False)
    return m


@pytest.fixture(scope="session")
def fmnist_default():
    """Fashion-MNIST with the default validation split (5,000), loaded once per session."""
    from evaluators.datasets import load_dataset

    return load_dataset("fashion-mnist")


def _lenet(train_data, **train_kw):
    from evaluators.models import build_model
    from evaluators.train import train

    torch.manual_seed(0)
    m = build_model("lenet5", in_channels=1, num_classes=10)
    train(m, train_data, lr=0.05, progress=False, **train_kw)
    return m


@pytest.fixture(scope="session")
def lenet_4k(fmnist_default):
    """LeNet-5 trained 3 epochs on 4,000 images; ``(model, train, val, val accuracy)``. Copy before changing."""
    from evaluators.train import evaluate

    tr, val = fmnist_default.train.subset(4000), fmnist_default.val.subset(1500)
    m = _lenet(tr, epochs=3, batch_size=64)
    return m, tr, val, evaluate(m, val)


@pytest.fixture(scope="session")
def lenet_6k(fmnist_default):
    """LeNet-5 trained 4 epochs on 6,000 images; ``(model, train, test, test accuracy)``. Copy before changing."""
    from evaluators.train import evaluate

    tr, te = fmnist_default.train.subset(6000), fmnist_default.test.subset(2000)
    m = _lenet(tr, epochs=4)
    return m, tr, te, evaluate(m, te)
