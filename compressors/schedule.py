"""Pruning schedules: gradual unstructured sparsity and iterative channel pruning.

One-shot pruning to a high rate followed by a fine-tune loses more accuracy than the papers'
schedules, which remove weights a little at a time and let training recover in between:

* :func:`cubic_sparsity` / :func:`gradual_sparsity_hook` — Zhu & Gupta (2017) gradual
  pruning: every mask's sparsity rises from ``initial`` to its target along
  ``s_t = s_f + (s_i - s_f) (1 - t / T)^3`` during training (fast early, when there are many
  redundant weights; slow at the end). Dynamic-network-surgery masks keep pruning and
  splicing at the current rate; fixed (magnitude) masks only ever cut more.
* :func:`prune_iteratively_` — Han et al. (2015)-style prune -> retrain -> prune for
  structured (channel) pruning with one global rate: the cumulative fraction of the
  *original* channels removed follows ``fractions``, with a fine-tune after each step. The
  result is relative to the original model, so ``resolved_policy`` replays the final shapes
  on a fresh copy (what the size model and checkpoints need).

Example:
    >>> from torch import nn
    >>> from squeezer.compressors.sparsity import attach_mask_
    >>> lin = nn.Linear(100, 10)
    >>> _ = attach_mask_(lin, 0.0, "dns")
    >>> hook = gradual_sparsity_hook(lin, {lin: 0.9}, ramp_steps=10)
    >>> for step in range(1, 11):
    ...     hook(lin, step)
    >>> int((lin.weight == 0).sum())
    900
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .policy import Policy
from .pruning import PruneResult, prune_
from .sparsity import DNSMask, magnitude_mask, weight_mask


def _check(ok: bool, rule: str, got: str) -> None:
    if not ok:
        raise ValueError(f"`{rule}` must hold, but got {got}")


def cubic_sparsity(step: int, ramp_steps: int, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta's gradual sparsity at ``step`` (clamped to ``final`` after ``ramp_steps``).

    Example:
        >>> [round(cubic_sparsity(t, 4, 0.8), 4) for t in (0, 1, 2, 4, 9)]
        [0.0, 0.4625, 0.7, 0.8, 0.8]
    """
    _check(ramp_steps >= 1, "ramp_steps >= 1", f"ramp_steps={ramp_steps}")
    _check(0.0 <= initial <= final < 1.0, "0 <= initial <= final < 1", f"initial={initial}, final={final}")
    frac = min(1.0, max(0.0, step / ramp_steps))
    return final + (initial - final) * (1.0 - frac) ** 3


def gradual_sparsity_hook(model: nn.Module, targets: Mapping[nn.Module, float], *, ramp_steps: int,
                          initial: float = 0.0, interval: int = 1) -> Callable[[nn.Module, int], None]:
    """A ``train(..., step_hook=)`` callback that ramps each masked layer to its target sparsity.

    Args:
        model: the model (unused beyond the signature ``train`` calls hooks with).
        targets: ``{layer: final sparsity}`` for layers that carry a mask (``attach_mask_``).
        ramp_steps: steps over which the sparsity follows :func:`cubic_sparsity`; afterwards it
            stays at the target (DNS masks keep re-deciding which weights, not how many).
        initial: sparsity at step 0.
        interval: update masks every ``interval`` steps (and always at ``ramp_steps``).

    Raises:
        ValueError: a layer in ``targets`` has no mask.
    """
    masks = {}
    for layer, final in targets.items():
        wm = weight_mask(layer)
        _check(wm is not None, "every layer in targets carries a weight mask", f"{type(layer).__name__} without one")
        cubic_sparsity(0, ramp_steps, final, initial)  # validates the rates
        masks[layer] = (wm, float(final))

    @torch.no_grad()
    def hook(_: nn.Module, step: int) -> None:
        ramping = step <= ramp_steps
        if ramping and step % max(1, interval) and step != ramp_steps:
            return
        for layer, (wm, final) in masks.items():
            s = cubic_sparsity(step, ramp_steps, final, initial)
            original = layer.parametrizations.weight.original
            if isinstance(wm, DNSMask):
                wm.sparsity = s
                wm.update(original)
            elif ramping and s > wm.sparsity:  # fixed mask: only cut more, by magnitude of the survivors
                wm.sparsity = s
                wm.mask.copy_(magnitude_mask(original * wm.mask, s))
    return hook


def prune_iteratively_(model: nn.Module, policy: Policy, input_shape: Sequence[int], fractions: Sequence[float], *,
                       finetune: Callable[[nn.Module, int], None] | None = None,
                       data: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None) -> PruneResult:
    """Channel-prune ``model`` in steps with ``policy``'s criterion and one global rate per step.

    Args:
        model: the trained model; pruned in place.
        policy: gives the criterion (``policy.pruning``); its ``global_ratio`` is replaced.
        input_shape: ``(C, H, W)`` of one input.
        fractions: increasing cumulative fractions of the *original* channels (over all
            prunable groups) removed after each step, e.g. ``(0.4, 0.6, 0.71)``.
        finetune: ``finetune(model, step_index)`` after each step (retraining).
        data: batches for data-driven criteria (saliency, Taylor), re-read at every step.

    Returns:
        ``{group: channels kept}`` relative to the original sizes (use ``resolved_policy``).

    Example:
        >>> from squeezer.compressors.policy import PruningConfig
        >>> from squeezer.evaluators.models import build_model
        >>> m = build_model("lenet5", in_channels=1, num_classes=10)
        >>> r = prune_iteratively_(m, Policy(pruning=PruningConfig(criterion="l1")), (1, 28, 28), (0.3, 0.5))
        >>> sum(r.sizes.values()) - sum(r.values()) == int(0.5 * sum(r.sizes.values()))
        True
    """
    _check(len(fractions) > 0 and all(0 < f < 1 for f in fractions), "0 < fraction < 1 for each of >= 1 fractions",
           f"fractions={tuple(fractions)}")
    _check(all(a < b for a, b in zip(fractions, fractions[1:])), "fractions increasing", f"fractions={tuple(fractions)}")
    sizes: dict[str, int] | None = None
    kept: dict[str, int] = {}
    batches = list(data) if data is not None else None
    for i, frac in enumerate(fractions):
        if sizes is None:
            ratio = frac
        else:
            current = sum(kept.values())
            n_drop = int(frac * sum(sizes.values()) + 1e-9) - (sum(sizes.values()) - current)
            ratio = (n_drop + 0.5) / current  # _allocate_global drops floor(current * ratio)
        step = replace(policy, pruning=replace(policy.pruning, global_ratio=min(max(ratio, 1e-9), 0.999)))
        res = prune_(model, step, input_shape, data=batches)
        if sizes is None:
            sizes = dict(res.sizes)
        _check(set(res) == set(sizes), "the same channel groups at every step", f"{sorted(res)} vs {sorted(sizes)}")
        kept = dict(res)
        if finetune is not None:
            finetune(model, i)
    assert sizes is not None
    return PruneResult(kept, sizes)
