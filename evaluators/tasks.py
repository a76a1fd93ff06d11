"""Segmentation and detection in the ordinary file formats, with their losses and metrics.

- :class:`ImageMasks`: ``images/<name>.{png,jpg}`` with ``masks/<name>.png`` (one class index a
  pixel, 0 = background); every pair's sizes are checked up front (one-line ``ValueError``).
- :class:`CocoBoxes`: images with a COCO-style JSON (``images``, ``annotations`` with ``bbox``
  ``[x, y, w, h]`` and ``category_id``, ``categories``), as torchvision's detectors take them:
  ``(image in [0, 1], {"boxes": xyxy, "labels"})``; its ``collate_fn`` keeps images and
  targets as lists (a split reading it through a ``DataLoader`` uses it).
- ``segmentation_loss`` / ``miou`` and ``detection_loss`` / ``map50``: the ``loss(model, batch,
  teacher)`` and ``metric(model, loader)`` the search takes (higher is better; the metric's
  name is what the report shows).

Example:
    >>> import torch
    >>> class Seg(torch.nn.Module):
    ...     def forward(self, x):
    ...         return {"out": torch.stack([-x[:, 0], x[:, 0]], 1)}   # class 1 where x > 0
    >>> x = torch.tensor([[[[1.0, -1.0], [1.0, 1.0]]]])
    >>> miou(Seg(), [(x, (x[:, 0] > 0).long())]), miou.__name__
    (1.0, 'mIoU')
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from .images import read_rgb

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _to_tensor(image: Image.Image, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def _size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError) as e:
        raise ValueError(f"unreadable image {path}: {str(e).splitlines()[0]}") from None


def _largest_index(mask: Path) -> int:
    with Image.open(mask) as m:
        return int(np.asarray(m).max())


class ImageMasks(Dataset):
    """``(normalised image [3, H, W], class index mask [H, W])`` from ``root/images`` and ``root/masks``.

    ``flip``: a random horizontal flip of both (training). ``classes``: the class names (index 0
    is the background); ``num_classes`` defaults to the largest index in the first 64 masks + 1.
    """

    def __init__(self, root: str | os.PathLike, *, mean: tuple[float, ...] = (0.0, 0.0, 0.0),
                 std: tuple[float, ...] = (1.0, 1.0, 1.0), flip: bool = False,
                 classes: Iterable[str] | None = None) -> None:
        root = Path(root)
        images = sorted(p for p in (root / "images").glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ValueError(f"no images found under {root / 'images'} (expected images/<name>.png with "
                             "masks/<name>.png)")
        self.pairs = []
        for p in images:
            mask = root / "masks" / f"{p.stem}.png"
            if not mask.is_file():
                raise ValueError(f"image {p.name} has no mask {mask}")
            if _size(p) != _size(mask):
                raise ValueError(f"mask {mask} is {'x'.join(map(str, _size(mask)))} but its image {p} is "
                                 f"{'x'.join(map(str, _size(p)))}; a mask must have its image's size")
            self.pairs.append((p, mask))
        self.mean, self.std, self.flip = tuple(mean), tuple(std), flip
        n = 1 + max(_largest_index(m) for _, m in self.pairs[:64])
        self.classes = tuple(classes) if classes is not None else tuple(str(i) for i in range(n))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.pairs[i]
        x = _to_tensor(read_rgb(image), self.mean, self.std)
        with Image.open(mask) as m:
            y = torch.from_numpy(np.asarray(m, dtype=np.int64).copy())
        if self.flip and torch.rand(()) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        return x, y


class CocoBoxes(Dataset):
    """``(image in [0, 1] [3, H, W], {"boxes": [K, 4] xyxy, "labels": [K]})`` from a COCO-style JSON.

    Labels are the annotations' ``category_id`` (0 is left to the background, as torchvision's
    detectors expect); ``classes`` names them by id (``classes[0] = "background"``).
    """

    def __init__(self, images: str | os.PathLike, annotations: str | os.PathLike) -> None:
        self.root = Path(images)
        try:
            coco = json.loads(Path(annotations).read_text())
            self.images = sorted(coco["images"], key=lambda r: r["id"])
            cats = {int(c["id"]): str(c["name"]) for c in coco["categories"]}
            boxes: dict[int, list[tuple[list[float], int]]] = {r["id"]: [] for r in self.images}
            for a in coco["annotations"]:
                boxes[a["image_id"]].append((a["bbox"], int(a["category_id"])))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"cannot read COCO annotations {annotations}: {type(e).__name__}: {e}") from None
        if not self.images:
            raise ValueError(f"no images listed in {annotations}")
        self.boxes = [boxes[r["id"]] for r in self.images]
        self.classes = tuple(["background"] + [cats.get(i, str(i)) for i in range(1, max(cats) + 1)])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = _to_tensor(read_rgb(self.root / self.images[i]["file_name"]), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        b = torch.tensor([box for box, _ in self.boxes[i]], dtype=torch.float32).reshape(-1, 4)
        b[:, 2:] += b[:, :2]  # xywh -> xyxy
        return x, {"boxes": b, "labels": torch.tensor([c for _, c in self.boxes[i]], dtype=torch.int64)}

    @staticmethod
    def collate_fn(batch: list) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        """Images and targets as lists (images may differ in size; targets in box count)."""
        return [x for x, _ in batch], [t for _, t in batch]


def fixed_input_size_(detector: nn.Module, image_size: int) -> nn.Module:
    """Make an SSD-style torchvision detector (SSD, SSDlite: ``transform.fixed_size``) resize its
    images to ``image_size`` px instead of its own 300 or 320 (anchors follow the feature maps)."""
    t = detector.transform
    t.min_size, t.max_size, t.fixed_size = (image_size,), image_size, (image_size, image_size)
    return detector


def _seg_logits(output: Any) -> torch.Tensor:
    return output["out"] if isinstance(output, dict) else output


def segmentation_loss(model: nn.Module, batch: Any, teacher: nn.Module | None = None) -> torch.Tensor:
    """Cross-entropy per pixel of ``model(x)`` (or its ``["out"]``) against the masks."""
    x, y = batch
    return F.cross_entropy(_seg_logits(model(x)), y)


def miou(model: nn.Module, loader: Iterable) -> float:
    """Mean intersection over union over the classes present in the masks or predictions, in [0, 1]."""
    conf: torch.Tensor | None = None
    for x, y in loader:
        logits = _seg_logits(model(x))
        n = logits.shape[1]
        if conf is None:
            conf = torch.zeros(n, n, dtype=torch.int64)
        idx = y.reshape(-1) * n + logits.argmax(1).reshape(-1)
        conf += torch.bincount(idx, minlength=n * n).reshape(n, n)
    if conf is None:
        return 0.0
    tp = conf.diag().double()
    union = conf.sum(0).double() + conf.sum(1).double() - tp
    return float((tp[union > 0] / union[union > 0]).mean())


miou.__name__ = "mIoU"


def detection_loss(model: nn.Module, batch: Any, teacher: nn.Module | None = None) -> torch.Tensor:
    """The sum of a torchvision detector's training losses (``model(images, targets)``)."""
    images, targets = batch
    return sum(model(list(images), list(targets)).values())


def map50(model: nn.Module, loader: Iterable) -> float:
    """Mean average precision at IoU 0.5 (VOC's all-point interpolation) over the classes in the
    ground truth, in [0, 1]."""
    from torchvision.ops import box_iou  # heavy (1.7 s): only detection needs it

    dets: dict[int, list[tuple[float, bool]]] = {}
    n_gt: dict[int, int] = {}
    for images, targets in loader:
        for out, t in zip(model(list(images)), targets):
            for c in t["labels"].unique().tolist():
                gt = t["boxes"][t["labels"] == c]
                n_gt[c] = n_gt.get(c, 0) + len(gt)
            for c in out["labels"].unique().tolist():
                keep = out["labels"] == c
                boxes, scores = out["boxes"][keep], out["scores"][keep]
                gt = t["boxes"][t["labels"] == c]
                dets.setdefault(c, []).extend(_matches(boxes, scores, gt, box_iou))
    aps = [_average_precision(dets.get(c, []), n) for c, n in n_gt.items()]
    return float(np.mean(aps)) if aps else 0.0


map50.__name__ = "mAP@0.5"


def _matches(boxes: torch.Tensor, scores: torch.Tensor, gt: torch.Tensor, box_iou: Any) -> list[tuple[float, bool]]:
    """(score, true positive) per detection, best score first; each ground-truth box matched once."""
    order = scores.argsort(descending=True)
    iou = box_iou(boxes[order], gt) if len(gt) else torch.zeros(len(boxes), 0)
    taken = torch.zeros(len(gt), dtype=torch.bool)
    out = []
    for i, s in zip(range(len(order)), scores[order].tolist()):
        hit = False
        if len(gt):
            cand = iou[i].clone()
            cand[taken] = -1
            j = int(cand.argmax())
            if cand[j] >= 0.5:
                taken[j], hit = True, True
        out.append((s, hit))
    return out


def _average_precision(dets: list[tuple[float, bool]], n_gt: int) -> float:
    if n_gt == 0 or not dets:
        return 0.0
    hits = np.array([h for _, h in sorted(dets, key=lambda d: -d[0])], dtype=np.float64)
    tp = np.cumsum(hits)
    recall = tp / n_gt
    precision = tp / np.arange(1, len(hits) + 1)
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the envelope: best precision at >= recall
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))
