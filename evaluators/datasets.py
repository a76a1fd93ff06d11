"""Named datasets with a train / validation / test split (in memory; image folders streamed when large).

``load_dataset(name, root=None)`` returns a :class:`DataSplits` whose ``val`` is carved from
the training set (the search never sees ``test``). Names: ``fashion-mnist`` (default),
``mnist``, ``cifar10``, ``digits`` (scikit-learn's 8x8 digits, always offline) and
``imagefolder:PATH`` (:mod:`.images`: any size, streamed from disk when it does not fit in memory). Files are looked for in ``root``, ``$SQUEEZER_DATA``,
``~/.cache/squeezer``, torchvision's layout under those, and Debian's
``/usr/share/datasets/<name>/``; they are downloaded through torchvision only when online.

Example:
    >>> d = load_dataset("digits")
    >>> d.input_shape, d.num_classes, len(d.test) > 0
    ((1, 8, 8), 10, True)
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

from ..compressors.registry import did_you_mean
from .images import IMAGENET_MEAN, IMAGENET_STD, IN_MEMORY_MAX_BYTES, NORMALIZE, image_folder
from .splits import DataSplits, TensorData

KNOWN = ("fashion-mnist", "mnist", "cifar10", "digits", "imagefolder:PATH")


class DatasetNotFound(FileNotFoundError):
    """The data is not on this machine and cannot be downloaded; the message says how to get it."""


def _search_dirs(root: str | os.PathLike | None, debian_name: str) -> list[Path]:
    dirs = []
    if root:
        dirs.append(Path(root))
    if os.environ.get("SQUEEZER_DATA"):
        dirs.append(Path(os.environ["SQUEEZER_DATA"]))
    dirs.append(Path.home() / ".cache" / "squeezer")
    dirs.append(Path("/usr/share/datasets") / debian_name)
    return dirs


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(dirs: list[Path], torchvision_folder: str) -> dict[str, Path] | None:
    stems = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
             "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}
    for d in dirs:
        for base in (d, d / torchvision_folder / "raw", d / torchvision_folder):
            found = {}
            for key, stem in stems.items():
                for cand in (base / stem, base / (stem + ".gz")):
                    if cand.is_file():
                        found[key] = cand
                        break
            if len(found) == 4:
                return found
    return None


def _idx_arrays(name: str, root, debian: str, tv_folder: str, tv_cls: str, download: bool) -> dict[str, np.ndarray]:
    dirs = _search_dirs(root, debian)
    files = _find_idx(dirs, tv_folder)
    if files is None and download:
        files = _download_torchvision(tv_cls, dirs[0] if root else Path.home() / ".cache" / "squeezer",
                                      tv_folder, name, debian)
    if files is None:
        raise DatasetNotFound(
            f"{name} not found in {', '.join(str(d) for d in dirs)}; install it with "
            f"'apt-get install dataset-{debian}' (Debian), put the IDX files in --data-root, "
            f"or run once while online to download it")
    return {k: _read_idx(p) for k, p in files.items()}


def fashion_mnist_arrays(root: str | os.PathLike | None = None, *, download: bool = True) -> dict[str, np.ndarray]:
    """Fashion-MNIST as uint8 arrays: ``train_x`` [60000, 28, 28], ``train_y``, ``test_x``, ``test_y``."""
    return _idx_arrays("fashion-mnist", root, "fashion-mnist", "FashionMNIST", "FashionMNIST", download)


def _mnist_like(name: str, root, debian: str, tv_folder: str, tv_cls: str, mean: float, std: float,
                val_size: int, seed: int, download: bool) -> DataSplits:
    arrays = _idx_arrays(name, root, debian, tv_folder, tv_cls, download)

    def to_x(a: np.ndarray) -> torch.Tensor:
        return ((torch.from_numpy(a.astype(np.float32) / 255.0) - mean) / std).unsqueeze(1)
    train = TensorData(to_x(arrays["train_x"]), torch.from_numpy(arrays["train_y"].astype(np.int64)))
    test = TensorData(to_x(arrays["test_x"]), torch.from_numpy(arrays["test_y"].astype(np.int64)))
    train, val = _split(train, val_size, seed)
    return DataSplits(name, train, val, test, 10, (mean,), (std,))


def _download_torchvision(tv_cls: str, root: Path, tv_folder: str, name: str, debian: str) -> dict[str, Path] | None:
    try:
        import torchvision.datasets as tvd

        getattr(tvd, tv_cls)(str(root), train=True, download=True)
        getattr(tvd, tv_cls)(str(root), train=False, download=True)
    except Exception:  # noqa: BLE001 - offline: fall through to the helpful message
        return None
    return _find_idx([root], tv_folder)


def _split(train: TensorData, val_size: int, seed: int) -> tuple[TensorData, TensorData]:
    n = len(train)
    val_size = min(val_size, n // 5)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    vi, ti = perm[:val_size], perm[val_size:]
    return TensorData(train.x[ti], train.y[ti]), TensorData(train.x[vi], train.y[vi])


def _digits(val_size: int, seed: int) -> DataSplits:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)
    y = torch.from_numpy(d.target.astype(np.int64))
    mean, std = float(x.mean()), float(x.std())
    x = ((x - mean) / std).unsqueeze(1)
    g = torch.Generator().manual_seed(1234)  # fixed test split, independent of the search seed
    perm = torch.randperm(len(y), generator=g)
    n_test = len(y) // 5
    test = TensorData(x[perm[:n_test]], y[perm[:n_test]])
    train = TensorData(x[perm[n_test:]], y[perm[n_test:]])
    train, val = _split(train, min(val_size, len(train) // 5), seed)
    return DataSplits("digits", train, val, test, 10, (mean,), (std,))


def _cifar10(root, val_size: int, seed: int, download: bool) -> DataSplits:
    import torchvision.datasets as tvd

    dirs = _search_dirs(root, "cifar10")
    last: Exception | None = None
    for d in dirs:
        for dl in ((False, True) if download else (False,)):
            try:
                tr = tvd.CIFAR10(str(d), train=True, download=dl)
                te = tvd.CIFAR10(str(d), train=False, download=dl)
                break
            except Exception as e:  # noqa: BLE001
                last = e
                continue
        else:
            continue
        break
    else:
        raise DatasetNotFound(f"cifar10 not found in {', '.join(map(str, dirs))} and cannot be downloaded "
                              f"({type(last).__name__}); put 'cifar-10-batches-py' in --data-root") from None
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

    def conv(ds) -> TensorData:
        x = torch.from_numpy(ds.data.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
        x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        return TensorData(x.contiguous(), torch.tensor(ds.targets, dtype=torch.int64))
    train, val = _split(conv(tr), val_size, seed)
    return DataSplits("cifar10", train, val, conv(te), 10, mean, std, tuple(tr.classes))


def load_dataset(name: str = "fashion-mnist", root: str | os.PathLike | None = None, *,
                 val_size: int = 5000, seed: int = 0, download: bool = True,
                 image_size: int | None = None, normalize: str = "dataset", workers: int = 0,
                 in_memory_max_bytes: int = IN_MEMORY_MAX_BYTES) -> DataSplits:
    """Load ``name`` with a validation split carved from the training set.

    ``image_size``, ``workers`` and ``in_memory_max_bytes`` apply to ``imagefolder:PATH``
    (:func:`~.images.image_folder`: 224 px unless given); ``normalize`` (``dataset``, ``imagenet``
    or ``none``) to every dataset.

    Raises:
        ValueError: unknown dataset name (with a did-you-mean hint), an option that does not
            apply, an image folder without images or with an unreadable one.
        DatasetNotFound: the files are missing and cannot be downloaded.
    """
    if name.startswith("imagefolder:"):
        try:
            return image_folder(name.partition(":")[2], image_size=image_size or 224, normalize=normalize,
                                workers=workers, val_size=val_size, seed=seed, in_memory_max_bytes=in_memory_max_bytes)
        except FileNotFoundError as e:
            raise DatasetNotFound(str(e)) from None
    if image_size is not None:
        raise ValueError(f"image_size applies to imagefolder:PATH datasets; {name} keeps its own size")
    return renormalized(_named(name, root, val_size, seed, download), normalize)


def _named(name: str, root: str | os.PathLike | None, val_size: int, seed: int, download: bool) -> DataSplits:
    if name == "fashion-mnist":
        return _mnist_like(name, root, "fashion-mnist", "FashionMNIST", "FashionMNIST", 0.2860, 0.3530,
                           val_size, seed, download)
    if name == "mnist":
        return _mnist_like(name, root, "mnist", "MNIST", "MNIST", 0.1307, 0.3081, val_size, seed, download)
    if name == "digits":
        return _digits(val_size, seed)
    if name == "cifar10":
        return _cifar10(root, val_size, seed, download)
    raise ValueError(did_you_mean(name, [k for k in KNOWN], "dataset"))


def renormalized(d: DataSplits, normalize: str) -> DataSplits:
    """In-memory splits normalised as ``normalize`` says instead of by their own mean and std
    (``imagenet`` on one channel: the mean of ImageNet's three).

    Example:
        >>> d = renormalized(load_dataset("digits"), "none")
        >>> d.mean, float(d.train.x.min()) >= 0.0
        ((0.0,), True)
    """
    if normalize == "dataset":
        return d
    if normalize not in NORMALIZE:
        raise ValueError(f"`normalize in {NORMALIZE}` must hold, but got normalize={normalize!r}")
    c = len(d.mean)
    if normalize == "none":
        mean, std = (0.0,) * c, (1.0,) * c
    else:
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if c == 3 else \
            ((sum(IMAGENET_MEAN) / 3,) * c, (sum(IMAGENET_STD) / 3,) * c)
    old_m, old_s = torch.tensor(d.mean)[:, None, None], torch.tensor(d.std)[:, None, None]
    new_m, new_s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

    def conv(t: TensorData | None) -> TensorData | None:
        return None if t is None else TensorData((t.x * old_s + old_m - new_m) / new_s, t.y)
    return DataSplits(d.name, conv(d.train), conv(d.val), conv(d.test), d.num_classes, mean, std, d.classes)
