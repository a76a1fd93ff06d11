"""Which layers a policy addresses (the compressible ones, the classifier that keeps its outputs),
and the tensor graph that tracing, dependency analysis and cost models follow.

Example:
    >>> from torch import nn
    >>> m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 10))
    >>> compressible_layers(m), classifier_name(m), tensor_graph(m) is m
    (['0', '2'], '2', True)
"""

from __future__ import annotations

from typing import Any

from torch import nn


def compressible_layers(model: nn.Module) -> list[str]:
    """FQNs of conv/linear layers (what a policy can address)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def classifier_name(model: nn.Module) -> str | None:
    """FQN of the output layer (last Linear, else last Conv2d): never pruned."""
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            last = name
    return last


class DetectorGraph(nn.Module):
    """A single-stage torchvision detector's tensor graph: its ``backbone`` then its ``head`` (the
    same modules under the same names), a batch of images in, the head's raw box and class maps
    out. Resizing, anchors and box decoding hold no weights, and tracing cannot follow them."""

    def __init__(self, detector: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = detector.backbone, detector.head
        self.train(detector.training)

    def forward(self, x: Any) -> Any:
        features = self.backbone(x)
        return self.head(list(features.values()) if isinstance(features, dict) else [features])


def tensor_graph(model: nn.Module) -> nn.Module:
    """The module a batch tensor runs through end to end, as tracing, channel-group analysis and cost
    models see ``model``: ``model`` itself, or for torchvision's single-stage detectors (SSD,
    SSDlite, RetinaNet, FCOS) its backbone and head (:class:`DetectorGraph`)."""
    if all(hasattr(model, a) for a in ("backbone", "head", "anchor_generator", "transform")):
        return DetectorGraph(model)
    return model
