"""Data sets derived from Fashion-MNIST, written to disk in the ordinary formats (no downloads).

What this machine has (Fashion-MNIST's IDX files) made into what users bring:

- :func:`write_image_folder`: ``out/{train,test}/<class>/<i>.jpg``, RGB JPEGs at any size
  (torchvision's ImageFolder layout; read it with ``imagefolder:out``);
- :func:`write_segmentation_set`: one or two items on a noisy canvas, ``images/<i>.png`` and
  ``masks/<i>.png`` (0 = background, 1 + the item's class where the item is; read it with
  :class:`~.tasks.ImageMasks`);
- :func:`write_detection_set`: one to three items on a canvas, ``images/<i>.jpg`` and a
  COCO-style ``annotations.json`` (tight boxes, ``category_id`` = 1 + class; read it with
  :class:`~.tasks.CocoBoxes`).

Every function is seeded (the same call writes the same files) and takes items from the
training set (``split="train"``) or the test set (``split="test"``) only.

Example:
    >>> import tempfile
    >>> from squeezer.evaluators.tasks import CocoBoxes
    >>> out = tempfile.mkdtemp()
    >>> write_detection_set(out, 4, 64)["images"]
    4
    >>> x, t = CocoBoxes(f"{out}/images", f"{out}/annotations.json")[0]
    >>> tuple(x.shape), bool((t["labels"] >= 1).all())
    ((3, 64, 64), True)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .datasets import fashion_mnist_arrays

CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
#: An item pixel belongs to the item's mask or box where its intensity is above this (of 1).
FOREGROUND = 0.25


def _items(split: str, root: str | os.PathLike | None) -> tuple[np.ndarray, np.ndarray]:
    if split not in ("train", "test"):
        raise ValueError(f"`split in ('train', 'test')` must hold, but got split={split!r}")
    a = fashion_mnist_arrays(root)
    return a[f"{split}_x"], a[f"{split}_y"].astype(np.int64)


def write_image_folder(out: str | os.PathLike, n: int, image_size: int, *, n_test: int | None = None,
                       quality: int = 90, root: str | os.PathLike | None = None) -> dict[str, int]:
    """``n`` training images (and ``n_test``, default ``n // 10``, test images) as RGB JPEGs of
    ``image_size`` px under ``out/train/<class>/`` and ``out/test/<class>/``; Fashion-MNIST's
    items in order, repeated past its 60,000 (10,000 test) images."""
    out = Path(out)
    counts = {}
    for split, count in (("train", n), ("test", n // 10 if n_test is None else n_test)):
        x, y = _items(split, root)
        for i in range(count):
            j = i % len(x)
            folder = out / split / CLASSES[y[j]]
            folder.mkdir(parents=True, exist_ok=True)
            im = Image.fromarray(x[j]).resize((image_size, image_size), Image.BILINEAR).convert("RGB")
            im.save(folder / f"{i:06d}.jpg", quality=quality)
        counts[split] = count
    return counts


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dim, smooth, coloured noise canvas [size, size, 3] in [0, 0.3]."""
    coarse = rng.uniform(0.0, 0.3, size=(max(2, size // 8), max(2, size // 8), 3))
    img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def _place(rng: np.random.Generator, canvas: np.ndarray, item: np.ndarray, side: int, x0: int, y0: int,
           ) -> np.ndarray:
    """Paint ``item`` (28x28 uint8) scaled to ``side`` px at ``(x0, y0)`` in a random bright colour;
    returns its foreground mask (canvas-sized, bool)."""
    alpha = np.asarray(Image.fromarray(item).resize((side, side), Image.BILINEAR), dtype=np.float32) / 255.0
    colour = rng.uniform(0.5, 1.0, size=3).astype(np.float32)
    region = canvas[y0:y0 + side, x0:x0 + side]
    region[:] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
    fg = np.zeros(canvas.shape[:2], dtype=bool)
    fg[y0:y0 + side, x0:x0 + side] = alpha > FOREGROUND
    return fg


def _to_uint8(canvas: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(canvas, 0, 1) * 255).astype(np.uint8))


def write_segmentation_set(out: str | os.PathLike, n: int, image_size: int, *, split: str = "train",
                           seed: int = 0, root: str | os.PathLike | None = None) -> dict[str, Any]:
    """``n`` canvases of ``image_size`` px with one or two items (45-75% of the side), as
    ``out/images/<i>.png`` and ``out/masks/<i>.png`` (0 background, 1 + class; a later item covers
    an earlier one)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    x, y = _items(split, root)
    rng = np.random.default_rng(seed)
    for i in range(n):
        canvas, mask = _background(rng, image_size), np.zeros((image_size, image_size), dtype=np.uint8)
        for _ in range(int(rng.integers(1, 3))):
            j = int(rng.integers(len(x)))
            side = int(rng.uniform(0.45, 0.75) * image_size)
            x0, y0 = (int(v) for v in rng.integers(0, image_size - side + 1, size=2))
            mask[_place(rng, canvas, x[j], side, x0, y0)] = 1 + y[j]
        _to_uint8(canvas).save(out / "images" / f"{i:06d}.png")
        Image.fromarray(mask, mode="L").save(out / "masks" / f"{i:06d}.png")
    return {"images": n, "classes": ("background", *CLASSES)}


def _free_spot(rng: np.random.Generator, boxes: list[list[float]], side: int, size: int) -> tuple[int, int]:
    """A top-left corner whose square overlaps no placed box by more than a third of its area
    (the last try is kept if none does)."""
    for _ in range(20):
        x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        if all(_overlap(x0, y0, side, b) < side * side / 3 for b in boxes):
            break
    return x0, y0


def _overlap(x0: int, y0: int, side: int, box: list[float]) -> float:
    bx, by, bw, bh = box
    return max(0.0, min(x0 + side, bx + bw) - max(x0, bx)) * max(0.0, min(y0 + side, by + bh) - max(y0, by))


def write_detection_set(out: str | os.PathLike, n: int, image_size: int, *, split: str = "train", seed: int = 0,
                        items: tuple[int, int] = (1, 3), root: str | os.PathLike | None = None) -> dict[str, Any]:
    """``n`` canvases of ``image_size`` px with ``items`` (inclusive range) items each, 25-50% of
    the side, as ``out/images/<i>.jpg`` and ``out/annotations.json`` (COCO: ``bbox`` is the item's
    tight ``[x, y, w, h]``, ``category_id`` 1 + class)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    x, y = _items(split, root)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for i in range(n):
        canvas, boxes = _background(rng, image_size), []
        for _ in range(int(rng.integers(items[0], items[1] + 1))):
            j = int(rng.integers(len(x)))
            side = int(rng.uniform(0.25, 0.5) * image_size)
            fg = _place(rng, canvas, x[j], side, *_free_spot(rng, boxes, side, image_size))
            rows, cols = np.nonzero(fg)
            box = [float(cols.min()), float(rows.min()), float(cols.max() + 1 - cols.min()),
                   float(rows.max() + 1 - rows.min())]
            boxes.append(box)
            annotations.append({"id": len(annotations) + 1, "image_id": i, "bbox": box, "area": box[2] * box[3],
                                "category_id": int(1 + y[j]), "iscrowd": 0})
        name = f"{i:06d}.jpg"
        _to_uint8(canvas).save(out / "images" / name, quality=95)
        images.append({"id": i, "file_name": name, "width": image_size, "height": image_size})
    categories = [{"id": k + 1, "name": c} for k, c in enumerate(CLASSES)]
    (out / "annotations.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                      "categories": categories}))
    return {"images": n, "boxes": len(annotations)}
