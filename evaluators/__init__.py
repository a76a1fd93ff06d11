"""Models, datasets, training and accuracy measurement.

Example:
    >>> from squeezer.evaluators import build_model, load_dataset
    >>> load_dataset("digits").num_classes
    10
"""

from __future__ import annotations

from .checkpoint import load_checkpoint, save_checkpoint
from .datasets import DatasetNotFound, DataSplits, TensorData, load_dataset
from .models import ZOO, build_model, known_models
from .train import evaluate, recalibrate_bn_, train

__all__ = ["build_model", "known_models", "ZOO", "load_dataset", "DataSplits", "TensorData", "DatasetNotFound",
           "train", "evaluate", "recalibrate_bn_", "save_checkpoint", "load_checkpoint"]
