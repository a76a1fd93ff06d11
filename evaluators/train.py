"""Training, fine-tuning (with distillation) and accuracy measurement.

Example:
    >>> from squeezer.evaluators.datasets import load_dataset
    >>> from squeezer.evaluators.models import build_model
    >>> d = load_dataset("digits")
    >>> m = build_model("resnet20", in_channels=1, num_classes=10)
    >>> _ = train(m, d.train, epochs=1, lr=0.05, batch_size=64, progress=False)
    >>> 0.0 <= evaluate(m, d.val) <= 1.0
    True
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from ..compressors.distill import make_distiller
from ..compressors.policy import DistillConfig

from .datasets import TensorData


@torch.no_grad()
def evaluate(model: nn.Module, data: TensorData, *, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1]."""
    was = model.training
    model.eval()
    correct = 0
    for xb, yb in data.batches(batch_size):
        correct += int((model(xb).argmax(1) == yb).sum())
    model.train(was)
    return correct / max(1, len(data))


def train(model: nn.Module, data: TensorData, *, epochs: float = 1.0, lr: float = 0.05,
          batch_size: int = 128, weight_decay: float = 5e-4, teacher: nn.Module | None = None,
          distill: DistillConfig | None = None, max_steps: int | None = None, seed: int = 0,
          augment: bool = False, progress: bool | Callable[[int, int, float], None] = True,
          desc: str = "train", step_hook: Callable[[nn.Module, int], None] | None = None,
          extra_loss: Callable[[nn.Module], torch.Tensor] | None = None) -> dict[str, float]:
    """SGD with momentum and a cosine schedule; optional distillation from ``teacher``.

    Args:
        epochs: passes over ``data`` (fractions allowed); ``max_steps`` caps the steps.
        progress: ``True`` shows a tqdm bar, ``False`` nothing, or a callable
            ``(step, total, loss)`` called every step.
        step_hook: called after each optimizer step (e.g. DNS mask updates, ADMM projections).
        extra_loss: added to the loss (regularisers such as group lasso).

    Returns:
        ``{"steps": ..., "loss": final running loss}``.
    """
    steps_per_epoch = max(1, math.ceil(len(data) / batch_size))
    total = max(1, int(round(epochs * steps_per_epoch)))
    if max_steps is not None:
        total = min(total, max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15,
                                                anneal_strategy="cos", div_factor=10, final_div_factor=100)
    distiller = make_distiller(distill, model, teacher)
    if teacher is not None:
        teacher.eval()
    model.train()
    bar = None
    if progress is True:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
    step, running = 0, float("nan")
    try:
        epoch = 0
        while step < total:
            for xb, yb in data.batches(batch_size, shuffle=True, seed=seed + epoch, augment=augment):
                out = model(xb)
                t_out = None
                if teacher is not None:
                    with torch.no_grad():
                        t_out = teacher(xb)
                loss = distiller.loss(out, t_out, yb)
                if extra_loss is not None:
                    loss = loss + extra_loss(model)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                if step_hook is not None:
                    step_hook(model, step)
                lv = float(loss.detach())
                running = lv if math.isnan(running) else 0.95 * running + 0.05 * lv
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{running:.3f}")
                elif callable(progress):
                    progress(step, total, running)
                if step >= total:
                    break
            epoch += 1
    finally:
        if bar is not None:
            bar.close()
        distiller.close()
    model.eval()
    return {"steps": float(step), "loss": running}


@torch.no_grad()
def recalibrate_bn_(model: nn.Module, data: TensorData, *, batches: int = 20, batch_size: int = 128) -> None:
    """Re-estimate BatchNorm running statistics (after pruning or quantization)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    for i, (xb, _) in enumerate(data.batches(batch_size, shuffle=True, seed=99)):
        if i >= batches:
            break
        model(xb)
    model.eval()
