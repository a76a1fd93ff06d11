"""Compress a trained model by a policy, then fine-tune it: the one place that does both.

:func:`compress` applies a policy to a copy of the base model (calibration batches for the
data-driven criteria); :func:`finetune` trains the compressed model (distilled from the base
model, sparsity masks updated every step); :func:`compress_and_finetune` does both. Every stage that makes a compressed model
(a search trial, the final fine-tune, ``squeezer apply``, ``squeezer export --trial``) calls
these. :func:`regularized_train` trains with a policy's regulariser first.

Example:
    >>> from squeezer.evaluators.datasets import load_dataset
    >>> from squeezer.compressors.policy import Policy, LayerPolicy
    >>> d = load_dataset("digits")
    >>> base = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 10))
    >>> small, resolved = compress_and_finetune(base, Policy(layers={"_default": LayerPolicy(weight_bits=4)}),
    ...                                         d.train, input_shape=(1, 8, 8), max_steps=5, progress=False)
    >>> small is not base and resolved.for_layer("0").weight_bits
    4
"""

from __future__ import annotations

import copy
from typing import Any, Callable

from torch import nn

from ..compressors.apply import apply_policy_
from ..compressors.policy import DistillConfig, Policy
from ..compressors.regularizers import make_regularizer
from ..compressors.sparsity import sparsity_step_hook
from .splits import Split
from .train import Loss, train


def distill_config(policy: Policy, enabled: bool) -> DistillConfig | None:
    """The distillation a fine-tune of ``policy`` uses: the policy's settings, the defaults
    (:class:`DistillConfig`) when it names none, None when distillation is off."""
    if not enabled:
        return None
    return policy.distill or DistillConfig()


def compress(base: nn.Module, policy: Policy, input_shape: tuple[int, ...], *, calib: list | None = None,
             ) -> tuple[nn.Module, Policy]:
    """A compressed copy of ``base`` and the policy with its data-driven choices made explicit
    (what replays on a fresh model: save this one)."""
    model = copy.deepcopy(base)
    result = apply_policy_(model, policy, input_shape, data=calib)
    return model, result.policy or policy


def finetune(model: nn.Module, data: Split, *, teacher: nn.Module | None, distill: DistillConfig | None,
             epochs: float = 1.0, max_steps: int | None = None, lr: float = 0.01, batch_size: int = 128,
             seed: int = 0, augment: bool = False, progress: bool | Callable[[int, int, float], None] = False,
             desc: str = "fine-tune", loss_fn: Loss | None = None) -> nn.Module:
    """Fine-tune a compressed ``model`` in place (distilled from ``teacher`` when ``distill`` is
    set); no steps (``epochs <= 0``): the model is left as it is."""
    if epochs <= 0 or (max_steps is not None and max_steps <= 0):
        return model.eval()
    train(model, data, epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size,
          teacher=teacher if distill is not None else None, distill=distill, seed=seed, augment=augment,
          progress=progress, desc=desc, step_hook=sparsity_step_hook(model), loss_fn=loss_fn)
    return model.eval()


def compress_and_finetune(base: nn.Module, policy: Policy, data: Split, *, input_shape: tuple[int, ...],
                          distill: bool = True, calib_batches: int = 8, calib_seed: int = 0,
                          batch_size: int = 128, epochs: float = 1.0, **finetune_kw: Any,
                          ) -> tuple[nn.Module, Policy]:
    """:func:`compress` then :func:`finetune` (distilled from ``base`` unless ``distill=False``);
    returns the model and the resolved policy."""
    calib = data.first_batches(calib_batches, batch_size, seed=calib_seed)
    model, resolved = compress(base, policy, input_shape, calib=calib)
    finetune(model, data, teacher=base, distill=distill_config(resolved, distill), batch_size=batch_size,
             epochs=epochs, **finetune_kw)
    return model, resolved


def regularized_train(model: nn.Module, data: Any, policy: Policy, *, epochs: float = 1.0, lr: float = 0.05,
                      options: dict[str, Any] | None = None, finish: bool = True, retrain_fraction: float = 0.3,
                      **train_kw: Any) -> dict[str, Any]:
    """Train ``model`` with ``policy.regularizer`` (extra loss + per-step hook), then finish it.

    ``retrain_fraction`` of the epochs is spent after :meth:`Regularizer.finish` retraining
    inside the final set (masked + quantized for ``sgl_admm``, tied for ``owl_ap``).
    Other keyword arguments go to :func:`train` (``step_hook`` is chained).

    Returns:
        The training statistics merged with the regulariser's ``finish`` statistics.
    """

    reg = make_regularizer(policy, model, **(options or {}))
    user_hook = train_kw.pop("step_hook", None)

    def hook(m: nn.Module, step: int) -> None:
        reg.step(m, step)
        if user_hook is not None:
            user_hook(m, step)

    if not 0.0 <= retrain_fraction < 1.0:
        raise ValueError(f"`0 <= retrain_fraction < 1` must hold, but got retrain_fraction={retrain_fraction}")
    if not finish:
        retrain_fraction = 0.0
    stats: dict[str, Any] = dict(train(model, data, epochs=epochs * (1 - retrain_fraction), lr=lr,
                                       extra_loss=reg.loss, step_hook=hook, **train_kw))
    if finish:
        stats.update(reg.finish(model))
        if retrain_fraction > 0 and policy.regularizer is not None:
            def retrain_hook(m: nn.Module, step: int) -> None:
                reg.constrain(m, step)
                if user_hook is not None:
                    user_hook(m, step)

            train(model, data, epochs=epochs * retrain_fraction, lr=lr, step_hook=retrain_hook, **train_kw)
    return stats
