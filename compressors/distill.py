"""Knowledge distillation losses, selected by ``DistillConfig.method``.

A method is ``factory(config, student, teacher) -> Distiller``; a distiller's
``loss(student_logits, teacher_logits, targets) -> Tensor`` is the whole training loss.
Feature-based methods (FitNets hints, attention transfer) register forward hooks on the
``hint_layers`` of both models in ``__init__`` and read the captured features in ``loss``.

Example:
    >>> import torch
    >>> from compressors.policy import DistillConfig
    >>> d = DISTILLATION.get("hinton")(DistillConfig(temperature=4, alpha=0.5), None, None)
    >>> float(d.loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]))) > 0
    True
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .policy import DistillConfig
from .registry import Registry


class Distiller:
    """Base: plain cross-entropy (no teacher)."""

    def __init__(self, config: DistillConfig | None, student: nn.Module | None, teacher: nn.Module | None) -> None:
        self.config = config
        self.student = student
        self.teacher = teacher

    def loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
             targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(student_logits, targets)

    def close(self) -> None:
        """Remove hooks (feature-based methods)."""


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015: KL(teacher_T || student_T) * T^2."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                    reduction="batchmean") * (t * t)


class HintonDistiller(Distiller):
    """Soft targets: ``alpha * KD + (1 - alpha) * CE``."""

    def loss(self, student_logits, teacher_logits, targets):
        ce = F.cross_entropy(student_logits, targets)
        if teacher_logits is None or self.config is None:
            return ce
        a = self.config.alpha
        return a * soft_target_loss(student_logits, teacher_logits, self.config.temperature) + (1 - a) * ce


#: Distillation methods by name.
DISTILLATION: Registry[Callable[[DistillConfig, Any, Any], Distiller]] = Registry("distillation method")
DISTILLATION.add("hinton", HintonDistiller, summary="soft targets with temperature (Hinton et al. 2015)")


def make_distiller(config: DistillConfig | None, student: nn.Module, teacher: nn.Module | None) -> Distiller:
    if config is None or teacher is None:
        return Distiller(None, student, None)
    return DISTILLATION.get(config.method)(config, student, teacher)
