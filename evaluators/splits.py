"""Data splits: what training, evaluation and the search read batches from.

Two kinds of split with one interface (``len``, ``input_shape``, ``subset``, ``batches``,
``first_batches``, ``loader``):

- :class:`TensorData`: a small dataset held in memory as one tensor (the MNIST-size named
  datasets: fastest, with cheap shift-and-flip augmentation);
- :class:`DatasetData`: any ``torch.utils.data.Dataset`` (a user's own, an ``ImageFolder``),
  read batch by batch through a ``DataLoader`` (seeded shuffling, worker processes): nothing
  is held in memory.

A batch is ``(inputs, targets)``; targets are class indices for classification, anything the
user's loss and metric understand otherwise. :class:`DataSplits` groups train, validation and
(optionally) test splits; :func:`from_objects` builds one from what a user passes.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> ds = TensorDataset(torch.zeros(10, 1, 8, 8), torch.arange(10) % 2)
    >>> s = from_objects((ds, ds))
    >>> s.input_shape, s.num_classes, len(s.val), s.test is None
    ((1, 8, 8), None, 10, True)
    >>> [tuple(x.shape) for x, _ in s.train.batches(4)]
    [(4, 1, 8, 8), (4, 1, 8, 8), (2, 1, 8, 8)]
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

Batch = tuple[Any, Any]


class Split(Protocol):
    """What every split offers (see the module docstring)."""

    def __len__(self) -> int: ...

    @property
    def input_shape(self) -> tuple[int, ...]: ...

    def subset(self, n: int | None, seed: int = 0) -> "Split": ...

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                augment: bool = False) -> Iterator[Batch]: ...

    def first_batches(self, n: int, batch_size: int, *, seed: int = 0) -> list[Batch]: ...

    def loader(self, batch_size: int) -> Any: ...


#: Pixels in one inference batch (1,024 images of 32x32): larger images get proportionally smaller
#: batches, so evaluating at 224 px needs no more memory than at 32 px.
INFERENCE_PIXELS = 1024 * 32 * 32


def inference_batch(batch_size: int, input_shape: Sequence[int]) -> int:
    """``batch_size`` capped so a batch holds at most :data:`INFERENCE_PIXELS` pixels.

    Example:
        >>> inference_batch(512, (1, 28, 28)), inference_batch(512, (3, 224, 224))
        (512, 20)
    """
    hw = math.prod(input_shape[1:]) if len(input_shape) > 1 else 1
    return max(1, min(batch_size, INFERENCE_PIXELS // max(1, hw)))


def _subset_indices(n_total: int, n: int, seed: int) -> torch.Tensor:
    """The ``n`` examples a subset keeps: the first ``n`` of a permutation ``seed`` fixes."""
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n]


@dataclass
class TensorData:
    x: torch.Tensor  # float32, normalised, [N, C, H, W]
    y: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def subset(self, n: int | None, seed: int = 0) -> "TensorData":
        if n is None or n >= len(self):
            return self
        idx = _subset_indices(len(self), n, seed)
        return TensorData(self.x[idx], self.y[idx])

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                augment: bool = False) -> Iterator[Batch]:
        n = len(self)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            xb = self.x[idx]
            if augment:
                xb = _augment(xb, seed + i)
            yield xb, self.y[idx]

    def first_batches(self, n: int, batch_size: int, *, seed: int = 0) -> list[Batch]:
        """``n`` shuffled batches (calibration data for data-driven criteria), built lazily."""
        return list(itertools.islice(self.batches(batch_size, shuffle=True, seed=seed), n))

    def loader(self, batch_size: int) -> "_Batches":
        """A re-iterable of the batches in order (what a user's metric iterates)."""
        return _Batches(self, batch_size)


class _Batches:
    """``for x, y in loader`` over a :class:`TensorData`, as a ``DataLoader`` would iterate."""

    def __init__(self, data: TensorData, batch_size: int) -> None:
        self.data, self.batch_size = data, batch_size

    def __iter__(self) -> Iterator[Batch]:
        return self.data.batches(self.batch_size)

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)


def _augment(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Random shifts of up to 2 px (pad + crop) and horizontal flips (cheap, tensor-only)."""
    g = torch.Generator().manual_seed(seed)
    n, _, h, w = x.shape
    pad = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    dx, dy = torch.randint(0, 5, (2,), generator=g).tolist()
    out = pad[:, :, dy:dy + h, dx:dx + w]
    flip = torch.rand(n, generator=g) < 0.5
    out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out.contiguous()


class DatasetData:
    """A split read from a ``Dataset`` through a ``DataLoader`` (see the module docstring).

    ``augment`` is ignored: a user's dataset applies its own transforms.
    """

    def __init__(self, dataset: Dataset, *, num_workers: int = 0, collate_fn: Callable | None = None,
                 pin_memory: bool = False) -> None:
        self.dataset, self.num_workers, self.collate_fn, self.pin_memory = dataset, num_workers, collate_fn, pin_memory
        self._shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    @property
    def input_shape(self) -> tuple[int, ...]:
        if self._shape is None:
            x = self.dataset[0][0]
            self._shape = tuple(x.shape) if hasattr(x, "shape") else ()
        return self._shape

    def _with(self, dataset: Dataset) -> "DatasetData":
        out = DatasetData(dataset, num_workers=self.num_workers, collate_fn=self.collate_fn,
                          pin_memory=self.pin_memory)
        out._shape = self._shape
        return out

    def subset(self, n: int | None, seed: int = 0) -> "DatasetData":
        if n is None or n >= len(self):
            return self
        return self._with(Subset(self.dataset, _subset_indices(len(self), n, seed).tolist()))

    def _loader(self, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> DataLoader:
        return DataLoader(self.dataset, batch_size=batch_size, shuffle=shuffle,
                          generator=torch.Generator().manual_seed(seed) if shuffle else None,
                          num_workers=self.num_workers, collate_fn=self.collate_fn, pin_memory=self.pin_memory,
                          persistent_workers=False)

    def batches(self, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                augment: bool = False) -> Iterator[Batch]:
        return iter(self._loader(batch_size, shuffle=shuffle, seed=seed))

    def first_batches(self, n: int, batch_size: int, *, seed: int = 0) -> list[Batch]:
        return list(itertools.islice(self.batches(batch_size, shuffle=True, seed=seed), n))

    def loader(self, batch_size: int) -> DataLoader:
        return self._loader(batch_size)


@dataclass
class DataSplits:
    name: str
    train: Any                  # TensorData | DatasetData
    val: Any
    test: Any | None            # None: no held-out test split (the metric is reported on val)
    num_classes: int | None     # None: not a classification dataset, or not known
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    classes: tuple[str, ...] = ()

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.input_shape)


def as_split(obj: Any, workers: int = 0) -> Any:
    """A split from a ``TensorData``/``DatasetData``, a ``Dataset`` (batched by its own
    ``collate_fn`` if it has one) or a ``DataLoader`` (whose dataset, workers and collate function
    are kept; a Dataset is read by ``workers`` loader processes)."""
    if isinstance(obj, (TensorData, DatasetData)):
        return obj
    if isinstance(obj, DataLoader):
        return DatasetData(obj.dataset, num_workers=obj.num_workers, collate_fn=obj.collate_fn,
                           pin_memory=obj.pin_memory)
    if isinstance(obj, Dataset) or (hasattr(obj, "__getitem__") and hasattr(obj, "__len__")):
        return DatasetData(obj, num_workers=workers, collate_fn=getattr(obj, "collate_fn", None))
    raise TypeError(f"expected a torch Dataset or DataLoader, got {type(obj).__name__}")


def _num_classes(ds: Any) -> int | None:
    """Classes a dataset says it has (``classes``, as torchvision's datasets have), else None."""
    classes = getattr(getattr(ds, "dataset", ds), "classes", None)
    return len(classes) if classes is not None and len(classes) > 0 else None


def from_objects(data: Sequence[Any], *, name: str | None = None, num_classes: int | None = None,
                 workers: int = 0) -> DataSplits:
    """``DataSplits`` from ``(train, val)`` or ``(train, val, test)`` datasets or loaders (datasets
    read by ``workers`` loader processes)."""
    if isinstance(data, (str, bytes)) or not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
        raise TypeError("data must be (train, val) or (train, val, test): torch Datasets or DataLoaders, "
                        f"got {type(data).__name__}")
    splits = [as_split(d, workers) for d in data]
    train, val = splits[0], splits[1]
    test = splits[2] if len(splits) == 3 else None
    first = data[0].dataset if isinstance(data[0], DataLoader) else data[0]
    label = name or f"object:{type(first).__name__}"
    return DataSplits(label, train, val, test, num_classes or _num_classes(first),
                      classes=tuple(getattr(first, "classes", ()) or ()))
