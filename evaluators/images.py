"""Image folders at any size, streamed from disk: ``PATH/<class>/<image>`` (torchvision's layout).

:func:`image_folder` reads ``PATH/train/<class>/*`` and ``PATH/test/<class>/*`` (or
``PATH/<class>/*``, 20% held out as the test split) into a :class:`~.splits.DataSplits` whose
validation split is carved from the training files. Training images get a random resized crop
(scale 0.25-1) and a horizontal flip, evaluation images a resize to ``size / 0.875`` and a
centre crop (torchvision's reference recipe), both at ``image_size`` px, then the normalisation
``normalize`` names: ``imagenet`` (ImageNet's mean and std: what pretrained weights expect),
``dataset`` (estimated on 256 training images) or ``none`` (pixels in [0, 1]).

A set whose decoded tensors would fit in :data:`IN_MEMORY_MAX_BYTES` is decoded once and held in
memory (:class:`~.splits.TensorData`, with its cheap shift-and-flip augmentation: fastest for
MNIST-size images); a larger one is streamed (:class:`~.splits.DataSplits` of
:class:`~.splits.DatasetData`: each batch decoded by ``workers`` loader processes, nothing kept),
so memory does not grow with the number of images. The choice is logged.

Every file is opened (its header read) up front: a folder without images, a class folder
without images, or a file that is not an image is a one-line ``ValueError`` before any work.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from PIL import Image
    >>> root = Path(tempfile.mkdtemp())
    >>> for c in ("cat", "dog"):
    ...     (root / c).mkdir()
    ...     for i in range(5):
    ...         Image.new("RGB", (40, 30), (200 * (c == "cat"), 20 * i, 0)).save(root / c / f"{i}.jpg")
    >>> d = image_folder(root, image_size=24, normalize="none", in_memory_max_bytes=0)
    >>> d.num_classes, d.input_shape, len(d.train) + len(d.val) + len(d.test), type(d.train).__name__
    (2, (3, 24, 24), 10, 'DatasetData')
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .splits import DatasetData, DataSplits, TensorData

log = logging.getLogger("squeezer")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: What ``normalize`` may be.
NORMALIZE = ("imagenet", "dataset", "none")
#: Decoded sets up to this size are held in memory; larger ones are streamed from disk.
IN_MEMORY_MAX_BYTES = 256 * 2**20
#: Training images the ``dataset`` normalisation's mean and std are estimated on.
STATS_IMAGES = 256
#: The fraction of the train transform's random crop area (torchvision's default starts at 0.08:
#: too harsh for short fine-tunes).
CROP_SCALE = (0.25, 1.0)

Sample = tuple[str, int]


class FileImages(Dataset):
    """``(transform(image), class index)`` for a list of ``(path, class index)`` files, decoded on access.

    Example:
        >>> FileImages([], ("a", "b"), lambda im: im).classes
        ('a', 'b')
    """

    def __init__(self, samples: Sequence[Sample], classes: Sequence[str], transform: Callable[[Any], Any]) -> None:
        self.samples, self.classes, self.transform = list(samples), tuple(classes), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        path, label = self.samples[i]
        return self.transform(read_rgb(path)), label


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """The image at ``path`` as RGB (``ValueError`` naming the file if it cannot be decoded)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"unreadable image {path}: {str(e).splitlines()[0]}") from None


def check_readable(paths: Sequence[str | os.PathLike]) -> None:
    """Every path opens as an image (its header; ~0.1 ms a file), else a ``ValueError`` naming it."""
    for p in paths:
        try:
            with Image.open(p) as im:
                im.size  # noqa: B018 - the header is parsed on open; size proves it was
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise ValueError(f"unreadable image {p}: {str(e).splitlines()[0]}") from None


def scan(root: Path, classes: Sequence[str] | None = None) -> tuple[list[Sample], tuple[str, ...]]:
    """``(path, class index)`` of every image under ``root/<class>/``, and the class names
    (``classes``: index by these, as a test folder must by its training folder's)."""
    import torchvision.datasets as tvd  # heavy (1.7 s): only image folders need it

    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    try:
        found, _ = tvd.folder.find_classes(str(root))
    except FileNotFoundError:
        raise ValueError(f"no images found under {root}: expected {root}/<class>/<image> files") from None
    unknown = sorted(set(found) - set(classes if classes is not None else found))
    if unknown:
        raise ValueError(f"class folder(s) {', '.join(unknown)} under {root} are not among the training classes")
    classes = tuple(classes if classes is not None else found)
    samples = tvd.folder.make_dataset(str(root), {c: classes.index(c) for c in found},
                                      extensions=tvd.folder.IMG_EXTENSIONS, allow_empty=True)
    empty = sorted(set(found) - {classes[y] for _, y in samples})
    if empty:
        raise ValueError(f"class folder(s) {', '.join(empty)} under {root} hold no images "
                         f"({', '.join(tvd.folder.IMG_EXTENSIONS[:4])}, ...)")
    return samples, classes


def transforms(image_size: int, mean: Sequence[float], std: Sequence[float]) -> tuple[Callable, Callable]:
    """The train (random resized crop, flip) and eval (resize, centre crop) transforms, normalised."""
    import torchvision.transforms as T  # heavy (1.7 s): only image folders need it

    norm = [T.ToTensor(), T.Normalize(mean, std)]
    train = T.Compose([T.RandomResizedCrop(image_size, scale=CROP_SCALE, antialias=True),
                       T.RandomHorizontalFlip(), *norm])
    evaluate = T.Compose([T.Resize(round(image_size / 0.875), antialias=True), T.CenterCrop(image_size), *norm])
    return train, evaluate


def normalization(normalize: str, samples: Sequence[Sample], image_size: int,
                  ) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std for ``normalize`` (``dataset``: estimated on :data:`STATS_IMAGES` of ``samples``)."""
    if normalize not in NORMALIZE:
        raise ValueError(f"`normalize in {NORMALIZE}` must hold, but got normalize={normalize!r}")
    if normalize == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    if normalize == "none":
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    _, plain = transforms(image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    picked = random.Random(0).sample(list(samples), min(STATS_IMAGES, len(samples)))
    x = torch.stack([plain(read_rgb(p)) for p, _ in picked])
    return tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).clamp_min(1e-6).tolist())


def _held_out(samples: list[Sample], n: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """``n`` samples drawn by ``seed``, and the rest (both in file order)."""
    picked = set(torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))[:n].tolist())
    return [s for i, s in enumerate(samples) if i not in picked], [s for i, s in enumerate(samples) if i in picked]


def _in_memory(ds: FileImages, workers: int) -> TensorData:
    xs, ys = zip(*DataLoader(ds, batch_size=256, num_workers=workers))
    return TensorData(torch.cat(xs), torch.cat(ys).to(torch.int64))


def image_folder(path: str | os.PathLike, *, image_size: int = 224, normalize: str = "dataset", workers: int = 2,
                 val_size: int = 5000, seed: int = 0, in_memory_max_bytes: int = IN_MEMORY_MAX_BYTES,
                 ) -> DataSplits:
    """The image folder at ``path`` as train / validation / test splits (see the module docstring)."""
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8:
        raise ValueError(f"`image_size >= 8` (pixels) must hold, but got image_size={image_size!r}")
    root = Path(path)
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, classes = scan(root / "train")
        test, _ = scan(root / "test", classes)
    else:
        full, classes = scan(root)
        train, test = _held_out(full, max(1, len(full) // 5), 1234)  # fixed: independent of the search seed
    check_readable([p for p, _ in train + test])
    train, val = _held_out(train, min(val_size, max(1, len(train) // 5)), seed)
    mean, std = normalization(normalize, train, image_size)
    train_tf, eval_tf = transforms(image_size, mean, std)
    n = len(train) + len(val) + len(test)
    decoded = n * 3 * image_size * image_size * 4
    name = f"imagefolder:{path}"
    if decoded <= in_memory_max_bytes:
        log.info("%s: %d images at %d px (%.0f MB decoded): held in memory", name, n, image_size, decoded / 1e6)
        splits = [_in_memory(FileImages(s, classes, eval_tf), workers) for s in (train, val, test)]
    else:
        log.info("%s: %d images at %d px (%.1f GB decoded, over the %d MB held in memory): streamed from disk "
                 "by %d loader workers", name, n, image_size, decoded / 1e9, in_memory_max_bytes // 2**20, workers)
        splits = [DatasetData(FileImages(s, classes, tf), num_workers=workers, pin_memory=torch.cuda.is_available())
                  for s, tf in ((train, train_tf), (val, eval_tf), (test, eval_tf))]
    return DataSplits(name, *splits, len(classes), mean, std, classes)
