"""Datasets load from what is on this machine; the validation split is carved from train."""

from __future__ import annotations

import pytest
import torch

from squeezer.evaluators.datasets import DatasetNotFound, load_dataset


def test_fashion_mnist_from_debian_files(fmnist):
    assert fmnist.input_shape == (1, 28, 28) and fmnist.num_classes == 10
    assert len(fmnist.train) + len(fmnist.val) == 60_000 and len(fmnist.test) == 10_000
    assert abs(float(fmnist.train.x.mean())) < 0.05 and abs(float(fmnist.train.x.std()) - 1) < 0.05


def test_validation_split_is_disjoint_from_train_and_not_the_test_set(fmnist):
    tr = {hash(x.numpy().tobytes()) for x in fmnist.train.x[:5000]}
    va = {hash(x.numpy().tobytes()) for x in fmnist.val.x}
    te = {hash(x.numpy().tobytes()) for x in fmnist.test.x[:2000]}
    # Fashion-MNIST has a few duplicate images; a split would share thousands.
    assert len(tr & va) < 10 and len(va & te) < 10


def test_digits_always_available_offline():
    d = load_dataset("digits")
    assert d.input_shape == (1, 8, 8) and len(d.test) == 359


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(DatasetNotFound, match="apt-get install dataset-mnist|--data-root"):
        load_dataset("mnist", tmp_path / "nothing", download=False)


def test_torchvision_layout_under_data_root(tmp_path, fmnist):
    import gzip
    import shutil

    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(f"/usr/share/datasets/fashion-mnist/{f}.gz") as src, open(raw / f, "wb") as dst:
            shutil.copyfileobj(src, dst)
    d = load_dataset("fashion-mnist", tmp_path, download=False, val_size=2000)
    assert torch.equal(d.test.y, fmnist.test.y)


def test_imagefolder(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for c, color in (("cat", 0), ("dog", 255)):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (12, 12), (color, i * 10, 0)).save(tmp_path / split / c / f"{i}.png")
    d = load_dataset(f"imagefolder:{tmp_path}", val_size=2)
    assert d.num_classes == 2 and d.input_shape == (3, 224, 224) and len(d.test) == 12  # 224 px unless given


def test_unknown_dataset_did_you_mean():
    with pytest.raises(ValueError, match="did you mean 'fashion-mnist'"):
        load_dataset("fashion_mnist")
