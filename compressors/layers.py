"""Which layers a policy addresses: the compressible ones, and the classifier that keeps its outputs.

Example:
    >>> from torch import nn
    >>> m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4, 10))
    >>> compressible_layers(m), classifier_name(m)
    (['0', '2'], '2')
"""

from __future__ import annotations

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
