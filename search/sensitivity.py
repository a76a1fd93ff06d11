"""Sensitivity first: how much validation accuracy each layer loses per setting, alone.

One probe = the trained base model with a single dimension changed (one channel group
pruned, one layer's weight or activation bits lowered, one layer decomposed), no
fine-tune, accuracy on a small validation subset (a batch or two). By default each probe
(and the reference it is compared with) first re-estimates its BatchNorm statistics on a
batch of training images ("adaptive BN", Li et al., EagleEye, ECCV 2020): without it a pruned
channel group's BN statistics no longer match its inputs and the probe reports a loss a
fine-tune wins back in a few steps (resnet20's stem at 25%: 71 pp without, ~0 with), which
made the narrowing and the seeds prefer low ranks and bits over pruning. The result narrows the
search space (a choice that alone loses more than ``threshold_pp`` is dropped for that
layer; the least aggressive choice always stays) and gives strong starting policies (the
most aggressive settings on the least sensitive layers until the budget is met).

Results are cached in ``RUN/sensitivity.json`` so every process of a run (and ``resume``)
sees the same narrowed space: Optuna needs a parameter's choices to stay the same.

The narrowing (:mod:`search.narrowing`) and the seeds (:mod:`search.seeds`) read the probes.

Example:
    >>> sens = {"probes": {"wbits:conv": {"8": 0.1, "4": 0.5, "2": 30.0}}, "base_accuracy": 0.9}
    >>> predicted_loss(sens, {"wbits:conv": 4})
    0.5
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ..compressors.apply import _compress_layer_, apply_policy_
from ..compressors.lowrank import DECOMPOSITIONS
from ..evaluators.splits import inference_batch
from ..evaluators.train import Loss, Metric, recalibrate_bn_
from ..evaluators.train import score as score_metric
from .runfolder import SENSITIVITY, CorruptFile, file_lock, read_checked_json, write_json

log = logging.getLogger("squeezer")

SCHEMA = "squeezer.sensitivity/1"


#: Settings the probes leave alone: float weights and activations, no pruning, no rank.
NEUTRAL = {"prune": 0.0, "wbits": None, "abits": None, "rank": None}


#: Divergence recorded for a setting that cannot be applied (maximally bad).
MAX_KL = 100.0


def _key(v: Any) -> str:
    """JSON key of a choice (``None`` -> ``"none"``)."""
    return "none" if v is None else str(v)


def neutral_params(space) -> dict[str, Any]:
    p: dict[str, Any] = {f"prune:{g}": 0.0 for g in space.groups}
    for name in space.layers:
        p[f"wbits:{name}"] = None
        p[f"abits:{name}"] = None
    for name in space.rank_layers:
        p[f"rank:{name}"] = None
    return p


def space_choices(space) -> dict[str, list]:
    """Every categorical dimension of ``space`` with its (full) choices."""
    ch: dict[str, list] = {}
    for g in space.groups:
        ch[f"prune:{g}"] = list(space.prune_choices)
    for name in space.layers:
        ch[f"wbits:{name}"] = list(space.weight_bits)
        ch[f"abits:{name}"] = list(space.act_bits)
    for name in space.rank_layers:
        ch[f"rank:{name}"] = list(space.rank_choices)
    return ch


def aggressiveness(dim: str, v: Any) -> float:
    """Larger = more compression (used to order choices and keep the mildest)."""
    kind = dim.split(":", 1)[0]
    if kind == "prune":
        return float(v)
    if kind in ("wbits", "abits"):
        return 0.0 if v is None else 64.0 - float(v)
    if kind == "rank":
        return 0.0 if v is None else 1.0 - float(v)
    return 0.0


def measure(model: torch.nn.Module, space, data, input_shape, *, val_size: int = 128, batch_size: int = 256,
            seed: int = 0, calib=None, bn_data=None, bn_images: int = 0, progress: bool = False,
            metric: Metric | None = None, loss: Loss | None = None) -> dict[str, Any]:
    """Probe every non-neutral choice of every dimension; accuracy loss in percentage points.

    Args:
        model: the trained base model (not changed).
        space: the :class:`~search.space.SearchSpace`.
        data: validation data (``TensorData``); the first ``val_size`` examples are used.
        calib: a few training batches for data-driven pruning criteria.
        bn_data, bn_images: with ``bn_images > 0``, every probe and the reference re-estimate
            BatchNorm statistics on the same ``bn_images`` images of ``bn_data`` (training data,
            one batch: one forward pass, so small models pay little per probe) before they are
            measured (adaptive BN); 0 = the base model's statistics.
        metric: the user's metric (``metric(model, loader)``, higher is better) instead of top-1
            accuracy; the loss is then in points of that metric x 100.
        loss: the user's fine-tuning loss: BN statistics are re-estimated running the model as it
            runs (a detector's training forward needs its targets).

    Returns:
        ``{"schema", "base_accuracy", "val_size", "bn_images", "seconds",
        "probes": {dim: {choice: loss_pp}}, "divergence": {dim: {choice: kl_nats}}}``;
        ``base_accuracy`` is the reference's. ``divergence`` is the mean KL divergence of the
        probe's predictions from the reference's on the same images: on 128 images top-1
        accuracy moves in steps of 0.78 pp, and most single-layer settings change fewer
        predictions than that, while the divergence ranks them almost as it would on 1,024
        (Spearman 0.997 against 0.77 for the accuracy loss, resnet20 on Fashion-MNIST).
    """

    sub = data.subset(min(val_size, len(data)), seed=seed) if hasattr(data, "subset") else data
    bn_images = min(bn_images, len(bn_data)) if bn_data is not None else 0
    prober = _Prober(model, sub, batch_size=inference_batch(batch_size, input_shape), bn_data=bn_data,
                     bn_images=bn_images, metric=metric, loss=loss)
    neutral = neutral_params(space)
    probes: dict[str, dict[str, float]] = {}
    divergence: dict[str, dict[str, float]] = {}
    t0 = time.time()
    dims = space_choices(space)
    n_total = sum(1 for d, cs in dims.items() for c in cs if c != NEUTRAL[d.split(":", 1)[0]])
    done = 0
    for dim, choices in dims.items():
        probes[dim], divergence[dim] = {}, {}
        for c in choices:
            if c == NEUTRAL[dim.split(":", 1)[0]]:
                probes[dim][_key(c)] = divergence[dim][_key(c)] = 0.0
                continue
            acc, kl = prober.probe(space.policy_from_params({**neutral, dim: c}), dim, input_shape, calib)
            probes[dim][_key(c)] = round(100.0 * (prober.base_acc - acc), 3)
            divergence[dim][_key(c)] = round(max(0.0, kl), 6)
            done += 1
            if progress and done % 25 == 0:
                log.info("sensitivity: %d/%d probes", done, n_total)
    out = {"schema": SCHEMA, "base_accuracy": prober.base_acc, "val_size": len(sub), "bn_images": bn_images,
           "seconds": round(time.time() - t0, 2), "n_probes": n_total, "probes": probes}
    if prober.ref is not None:  # no divergence for outputs that are not logits: the seeds weigh the metric loss
        out["divergence"] = divergence
    return out


class _Prober:
    """Scores probes on fixed validation images against the unchanged model (see :func:`measure`)."""

    def __init__(self, model: torch.nn.Module, sub: Any, *, batch_size: int, bn_data: Any, bn_images: int,
                 metric: Metric | None, loss: Loss | None = None) -> None:
        self.model, self.sub, self.batch_size, self.metric, self.loss = model, sub, batch_size, metric, loss
        self.bn_data, self.bn_images = bn_data, bn_images
        self.labels = torch.cat([y for _, y in sub.batches(batch_size)]) if metric is None else None
        ref_model = copy.deepcopy(model) if bn_images > 0 else model
        self.ref = self.outputs(ref_model)
        self.base_acc = self.accuracy(ref_model, self.ref)

    def outputs(self, m: torch.nn.Module) -> torch.Tensor | None:
        """Log-probabilities of ``m`` on the probe images (over dimension 1: classes, or classes
        per output element), its BN statistics re-estimated first if asked (then ``m`` must be a
        copy: its statistics change); None for outputs that are not one tensor."""
        if self.bn_images > 0:
            recalibrate_bn_(m, self.bn_data, batches=1, batch_size=self.bn_images, loss_fn=self.loss)
        was = m.training
        m.eval()
        with torch.no_grad():
            outs = [m(xb) for xb, _ in self.sub.batches(self.batch_size)]
        m.train(was)
        if not all(isinstance(o, torch.Tensor) and o.dim() >= 2 for o in outs):
            return None
        return torch.cat(outs).log_softmax(1)

    def accuracy(self, m: torch.nn.Module, out: torch.Tensor | None) -> float:
        if self.metric is None:
            return float((out.argmax(1) == self.labels).float().mean())
        return score_metric(m, self.sub, self.metric, batch_size=self.batch_size)

    def score(self, m: torch.nn.Module) -> tuple[float, float]:
        """The metric of ``m`` on the probe images, and the KL divergence of its predictions from
        the reference's (0 where the outputs are not logits)."""
        out = self.outputs(m)
        kl = 0.0 if out is None or self.ref is None else \
            float(torch.nn.functional.kl_div(out, self.ref, log_target=True, reduction="batchmean"))
        return self.accuracy(m, out), kl

    def probe(self, policy: Any, dim: str, input_shape: Any, calib: Any) -> tuple[float, float]:
        """(metric, divergence) of the base model with one dimension set as ``policy`` says; a
        setting that cannot be applied is maximally bad."""
        kind, _, layer = dim.partition(":")
        try:
            if kind == "prune":
                m = copy.deepcopy(self.model)  # pruning changes every layer of the channel group
                apply_policy_(m, policy, input_shape, data=calib)
                return self.score(m)
            # One layer changes: swap a compressed copy of it in (no copy of the whole model,
            # unless BN statistics are re-estimated: they are the copy's own).
            return _swap_probe(copy.deepcopy(self.model) if self.bn_images > 0 else self.model, layer, policy,
                               self.score)
        except Exception as e:  # noqa: BLE001
            log.debug("sensitivity probe %s failed: %s", dim, e)
            return 0.0, MAX_KL


def _swap_probe(model: torch.nn.Module, name: str, policy, score) -> Any:
    """``score(model)`` with layer ``name`` replaced by its compressed copy (as ``apply_policy_``
    would), the original put back afterwards."""

    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    orig = getattr(parent, attr)
    lp = policy.for_layer(name)
    new = copy.deepcopy(orig)
    if lp.rank_ratio is not None and lp.rank_ratio < 1.0:
        new = DECOMPOSITIONS.get(lp.decomposition)(new, lp.rank_ratio)
    parts = [m for m in new.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))] \
        if isinstance(new, torch.nn.Sequential) else [new]
    for part in parts:
        _compress_layer_(part, lp, policy, skip_quantization=False)
    setattr(parent, attr, new)
    try:
        return score(model)
    finally:
        setattr(parent, attr, orig)


def predicted_loss(sens: dict[str, Any], params: dict[str, Any]) -> float:
    """Accuracy points ``params`` would lose by the probes, summed over its dimensions (additive
    model, no fine-tune: a ranking, not a forecast)."""
    probes = sens.get("probes", {})
    return float(sum(choice_loss(probes, d, v) for d, v in params.items() if d in probes))


def choice_loss(probes: dict[str, dict[str, float]], dim: str, choice: Any) -> float:
    """Points the probe of ``dim = choice`` lost (a gain counts as 0; unprobed: 0)."""
    return max(0.0, probes.get(dim, {}).get(_key(choice), 0.0))


def damage_table(sens: dict[str, Any]) -> tuple[dict[str, dict[str, float]], float]:
    """What the seeds' greedies weigh choices by, and the floor added to a choice's damage (so
    that among harmless choices the one that saves most is taken first): the probes' KL
    divergence where it was measured, else (files written before it) their accuracy loss.
    The narrowing and :func:`predicted_loss` stay in accuracy points."""
    if sens.get("divergence"):
        return sens["divergence"], 1e-6
    return sens.get("probes", {}), 1e-3


def load_or_measure(ctx, *, force: bool = False, val_size: int = 128, progress: bool = False) -> dict[str, Any]:
    """``RUN/sensitivity.json``, measured once (under a lock, so concurrent processes share it)."""
    path = Path(ctx.run_dir) / SENSITIVITY
    with file_lock(Path(ctx.run_dir) / ".sensitivity.lock"):
        if path.is_file() and not force:
            try:
                sens = read_checked_json(path)
                if sens.get("schema") == SCHEMA:
                    return sens
            except CorruptFile as e:
                log.warning("%s; measuring again", e)
        calib = ctx.trial_train.first_batches(2, ctx.cfg.batch_size, seed=0) \
            if ctx.trial_train is not None else None
        bn = ctx.cfg.sensitivity_bn_images if ctx.trial_train is not None else 0
        log.info("sensitivity: probing %d dimensions of %s (no fine-tune, %d validation images%s)",
                 len(space_choices(ctx.space)), ctx.cfg.model, min(val_size, len(ctx.data.val)),
                 f", BN statistics re-estimated on {bn} training images" if bn else "")
        sens = measure(ctx.base, ctx.space, ctx.data.val, ctx.input_shape, val_size=val_size,
                       seed=ctx.cfg.seed, calib=calib, bn_data=ctx.trial_train, bn_images=bn,
                       progress=progress, metric=ctx.workload.metric, loss=ctx.workload.loss)
        write_json(path, sens, checksum=True)
        log.info("sensitivity: %d probes in %.1f s -> %s", sens["n_probes"], sens["seconds"], path)
        return sens


def summarize(sens: dict[str, Any], *, top: int = 10) -> list[tuple[str, str, float]]:
    """The ``top`` most damaging (dimension, choice, loss_pp) probes."""
    rows = [(d, c, v) for d, row in sens.get("probes", {}).items() for c, v in row.items()]
    return sorted(rows, key=lambda r: -r[2])[:top]
