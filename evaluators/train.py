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
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..compressors.distill import UserLossDistiller, make_distiller
from ..compressors.policy import DistillConfig
from .splits import Split, inference_batch

#: A user's metric: ``metric(model, loader) -> float``, higher is better (``loader`` yields
#: ``(inputs, targets)`` batches of the split being judged).
Metric = Callable[[nn.Module, Any], float]
#: A user's fine-tuning loss: ``loss(model, batch, teacher) -> scalar tensor``; ``teacher`` is the
#: uncompressed model when distillation is on, else None.
Loss = Callable[[nn.Module, Any, "nn.Module | None"], torch.Tensor]


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, *, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1]."""
    was = model.training
    model.eval()
    correct = 0
    for xb, yb in data.batches(inference_batch(batch_size, data.input_shape)):
        correct += int((model(xb).argmax(1) == yb).sum())
    model.train(was)
    return correct / max(1, len(data))


def score(model: nn.Module, data: Split, metric: Metric | None = None, *, batch_size: int = 512) -> float:
    """``metric(model, loader)`` on ``data`` with the model in eval mode (top-1 accuracy if None).

    Example:
        >>> from squeezer.evaluators.datasets import load_dataset
        >>> d = load_dataset("digits")
        >>> m = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> score(m, d.val) == evaluate(m, d.val)
        True
        >>> score(m, d.val, lambda model, loader: float(sum(len(y) for _, y in loader))) == len(d.val)
        True
    """
    if metric is None:
        return evaluate(model, data, batch_size=batch_size)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return float(metric(model, data.loader(inference_batch(batch_size, data.input_shape))))
    finally:
        model.train(was)


def train(model: nn.Module, data: Split, *, epochs: float = 1.0, lr: float = 0.05,
          batch_size: int = 128, weight_decay: float = 5e-4, teacher: nn.Module | None = None,
          distill: DistillConfig | None = None, max_steps: int | None = None, seed: int = 0,
          augment: bool = False, progress: bool | Callable[[int, int, float], None] = True,
          desc: str = "train", step_hook: Callable[[nn.Module, int], None] | None = None,
          extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
          loss_fn: Loss | None = None) -> dict[str, float]:
    """SGD with momentum and a cosine schedule; optional distillation from ``teacher``.

    Args:
        epochs: passes over ``data`` (fractions allowed); ``max_steps`` caps the steps.
        progress: ``True`` shows a tqdm bar, ``False`` nothing, or a callable
            ``(step, total, loss)`` called every step.
        step_hook: called after each optimizer step (e.g. DNS mask updates, ADMM projections).
        extra_loss: added to the loss (regularisers such as group lasso).
        loss_fn: the user's loss ``loss_fn(model, batch, teacher)`` instead of cross-entropy; with a
            ``teacher`` and ``distill``, soft targets per output element are mixed in
            (:class:`~compressors.distill.UserLossDistiller`; off, with a warning, for outputs
            without class scores such as a detector's losses).

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
    distiller = make_distiller(distill, model, teacher) if loss_fn is None else \
        UserLossDistiller(distill, model, teacher, loss_fn)
    if teacher is not None:
        teacher.eval()
    model.train()
    bar = None
    if progress is True:
        bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
    step, running = 0, float("nan")
    try:
        epoch = 0
        while step < total:
            for xb, yb in data.batches(batch_size, shuffle=True, seed=seed + epoch, augment=augment):
                if loss_fn is not None:
                    loss = distiller.loss((xb, yb))
                else:
                    loss = _default_loss(model, teacher, distiller, xb, yb)
                if extra_loss is not None:
                    loss = loss + extra_loss(model)
                lv = float(loss.detach())
                if not math.isfinite(lv):  # a diverged fine-tune stops here, before its weights do
                    raise FloatingPointError(f"the loss became {'NaN' if math.isnan(lv) else 'infinite'} at step "
                                             f"{step + 1}")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                if step_hook is not None:
                    step_hook(model, step)
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


def _default_loss(model: nn.Module, teacher: nn.Module | None, distiller: Any, xb: Any, yb: Any) -> torch.Tensor:
    """Cross-entropy, distilled from ``teacher``'s outputs when there is one."""
    out = model(xb)
    t_out = None
    if teacher is not None:
        with torch.no_grad():
            t_out = teacher(xb)
    return distiller.loss(out, t_out, yb)


@torch.no_grad()
def recalibrate_bn_(model: nn.Module, data: Split, *, batches: int = 20, batch_size: int = 128,
                    loss_fn: Loss | None = None) -> None:
    """Re-estimate BatchNorm running statistics (after pruning or quantization) on ``batches`` x
    ``batch_size`` training images, fed in batches :func:`~.splits.inference_batch` caps (large
    images: more, smaller batches, averaged). A model whose training forward needs targets (a
    detector) runs as the fine-tune's ``loss_fn`` runs it."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    model.train()
    seen = 0
    for xb, yb in data.batches(inference_batch(batch_size, data.input_shape), shuffle=True, seed=99):
        if seen >= batches * batch_size:
            break
        if loss_fn is None:
            model(xb)
        else:
            loss_fn(model, (xb, yb), None)
        seen += len(xb)
    model.eval()
