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

Example:
    >>> from squeezer.search.sensitivity import narrowed_choices
    >>> sens = {"probes": {"wbits:conv": {"8": 0.1, "4": 0.5, "2": 30.0}}, "base_accuracy": 0.9}
    >>> narrowed_choices(sens, {"wbits:conv": [2, 4, 8, None]}, threshold_pp=5.0)
    {'wbits:conv': [4, 8, None]}
"""

from __future__ import annotations

import copy
import fcntl
import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

log = logging.getLogger("squeezer")

SCHEMA = "squeezer.sensitivity/1"
#: Settings the probes leave alone: float weights and activations, no pruning, no rank.
NEUTRAL = {"prune": 0.0, "wbits": None, "abits": None, "rank": None}
#: Divergence recorded for a setting that cannot be applied (maximally bad).
MAX_KL = 100.0


def _key(v: Any) -> str:
    """JSON key of a choice (``None`` -> ``"none"``)."""
    return "none" if v is None else str(v)


def _neutral_params(space) -> dict[str, Any]:
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


def _aggressiveness(dim: str, v: Any) -> float:
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
            seed: int = 0, calib=None, bn_data=None, bn_images: int = 0, progress: bool = False) -> dict[str, Any]:
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

    Returns:
        ``{"schema", "base_accuracy", "val_size", "bn_images", "seconds",
        "probes": {dim: {choice: loss_pp}}, "divergence": {dim: {choice: kl_nats}}}``;
        ``base_accuracy`` is the reference's. ``divergence`` is the mean KL divergence of the
        probe's predictions from the reference's on the same images: on 128 images top-1
        accuracy moves in steps of 0.78 pp, and most single-layer settings change fewer
        predictions than that, while the divergence ranks them almost as it would on 1,024
        (Spearman 0.997 against 0.77 for the accuracy loss, resnet20 on Fashion-MNIST).
    """
    from ..compressors.apply import apply_policy_
    from ..evaluators.train import recalibrate_bn_

    sub = data.subset(min(val_size, len(data)), seed=seed) if hasattr(data, "subset") else data
    bn_images = min(bn_images, len(bn_data)) if bn_data is not None else 0

    def outputs(m: torch.nn.Module) -> torch.Tensor:
        """Log-probabilities of ``m`` on the probe images, its BN statistics re-estimated first if
        asked (then ``m`` must be a copy: its statistics change)."""
        if bn_images > 0:
            recalibrate_bn_(m, bn_data, batches=1, batch_size=bn_images)
        was = m.training
        m.eval()
        with torch.no_grad():
            out = torch.cat([m(xb) for xb, _ in sub.batches(batch_size)]).log_softmax(1)
        m.train(was)
        return out

    ref = outputs(copy.deepcopy(model) if bn_images > 0 else model)
    base_acc = float((ref.argmax(1) == sub.y).float().mean())

    def score(m: torch.nn.Module) -> tuple[float, float]:
        """Accuracy of ``m`` on the probe images, and the KL divergence of its predictions from
        the reference's."""
        out = outputs(m)
        kl = float(torch.nn.functional.kl_div(out, ref, log_target=True, reduction="batchmean"))
        return float((out.argmax(1) == sub.y).float().mean()), kl

    neutral = _neutral_params(space)
    probes: dict[str, dict[str, float]] = {}
    divergence: dict[str, dict[str, float]] = {}
    t0 = time.time()
    dims = space_choices(space)
    n_total = sum(1 for d, cs in dims.items() for c in cs if c != NEUTRAL[d.split(":", 1)[0]])
    done = 0
    for dim, choices in dims.items():
        kind = dim.split(":", 1)[0]
        row: dict[str, float] = {}
        div: dict[str, float] = {}
        for c in choices:
            if c == NEUTRAL[kind]:
                row[_key(c)] = div[_key(c)] = 0.0
                continue
            params = {**neutral, dim: c}
            pol = space.policy_from_params(params)
            try:
                if kind == "prune":
                    m = copy.deepcopy(model)  # pruning changes every layer of the channel group
                    apply_policy_(m, pol, input_shape, data=calib)
                    acc, kl = score(m)
                else:
                    # One layer changes: swap a compressed copy of it in (no copy of the whole
                    # model, unless BN statistics are re-estimated: they are the copy's own).
                    acc, kl = _swap_probe(copy.deepcopy(model) if bn_images > 0 else model,
                                          dim.split(":", 1)[1], pol, score)
            except Exception as e:  # noqa: BLE001 - a setting that cannot be applied is maximally bad
                log.debug("sensitivity probe %s=%s failed: %s", dim, c, e)
                acc, kl = 0.0, MAX_KL
            row[_key(c)] = round(100.0 * (base_acc - acc), 3)
            div[_key(c)] = round(max(0.0, kl), 6)
            done += 1
            if progress and done % 25 == 0:
                log.info("sensitivity: %d/%d probes", done, n_total)
        probes[dim] = row
        divergence[dim] = div
    return {"schema": SCHEMA, "base_accuracy": base_acc, "val_size": len(sub), "bn_images": bn_images,
            "seconds": round(time.time() - t0, 2), "n_probes": n_total, "probes": probes,
            "divergence": divergence}


def _swap_probe(model: torch.nn.Module, name: str, policy, score) -> Any:
    """``score(model)`` with layer ``name`` replaced by its compressed copy (as ``apply_policy_``
    would), the original put back afterwards."""
    from ..compressors.apply import _compress_layer_
    from ..compressors.lowrank import DECOMPOSITIONS

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


def narrowed_choices(sens: dict[str, Any], choices: dict[str, list], *, threshold_pp: float) -> dict[str, list]:
    """Drop, per dimension, the choices whose probe lost more than ``threshold_pp``.

    The mildest choice of each dimension is always kept (a layer is never left without
    a setting); only dimensions that lose something are listed.
    """
    out: dict[str, list] = {}
    probes = sens.get("probes", {})
    for dim, cs in choices.items():
        row = probes.get(dim)
        if not row:
            continue
        mildest = min(cs, key=lambda c: _aggressiveness(dim, c))
        keep = [c for c in cs if c == mildest or row.get(_key(c), 0.0) <= threshold_pp]
        if len(keep) < len(cs):
            out[dim] = keep
    return out


#: Distillation settings of the seeded policies (the search samples its own afterwards).
SEED_KD = {"kd_temperature": 4.0, "kd_alpha": 0.5}


def allowed_choices(space, narrowed: dict[str, list] | None) -> dict[str, list]:
    """Every dimension's allowed choices, mildest first (``narrowed`` where it narrows)."""
    narrowed = narrowed or {}
    return {d: sorted(narrowed.get(d, cs), key=lambda c, d=d: _aggressiveness(d, c))
            for d, cs in space_choices(space).items()}


def most_aggressive(space, allowed: dict[str, list]) -> dict[str, Any]:
    """The params taking each dimension's most aggressive allowed choice (the smallest, and
    as a rule the fastest, policy a space holds)."""
    p = {d: max(cs, key=lambda c: _aggressiveness(d, c)) for d, cs in allowed.items()}
    return {**p, **SEED_KD} if space.distill else p


def extreme_params(space, allowed: dict[str, list]) -> list[dict[str, Any]]:
    """The most aggressive params ``allowed`` holds, and its variants with the ranks and/or
    the activation bits at their mildest: the most aggressive choice is not always the
    fastest (a low-rank pair of convs, or integer activations into a float kernel, can be
    slower); as a rule the smallest and the fastest policy of a space are among these four."""
    p = most_aggressive(space, allowed)
    out = [p]
    for kinds in (("rank",), ("abits",), ("rank", "abits")):
        q = {**p, **{d: min(allowed[d], key=lambda c, d=d: _aggressiveness(d, c))
                     for d in allowed if d.split(":", 1)[0] in kinds}}
        if q not in out:
            out.append(q)
    return out


def least_violation(space, allowed: dict[str, list], violation) -> float:
    """The least ``violation`` over :func:`extreme_params` (``<= 0``: ``allowed`` holds a
    policy that meets the limits)."""
    return min(violation(p) for p in extreme_params(space, allowed))


def backed_off_params(space, sens: dict[str, Any], fits, *, narrowed: dict[str, list] | None = None,
                      max_steps: int = 2000) -> dict[str, Any] | None:
    """The other way round from :func:`guided_params`: start from the space's extreme policy
    that meets the limits (:func:`extreme_params`) and undo compression one step at a time
    (one dimension one choice milder), the step that buys back the most accuracy by the
    probes first among those that keep ``fits`` true, until no step does. ``None`` if no
    extreme policy fits.

    For limits the forward greedy cannot reach: it only ever compresses further, and where
    the cost is not monotone in each choice it can run out of steps that help.
    """
    ladder = allowed_choices(space, narrowed)
    probes, eps = damage_table(sens)

    def check(p):
        return fits(space.trial_policy(p))

    scored = [(check(p), p) for p in extreme_params(space, ladder)]
    feasible = [(amount, p) for (ok, amount), p in scored if ok]
    if not feasible:
        return None
    return _undo_compression(space, probes, ladder, min(feasible, key=lambda t: t[0])[1],
                             lambda pol: 0.0 if fits(pol)[0] else -1.0, per_room=False, eps=eps,
                             max_steps=max_steps)


def relax_narrowing(space, sens: dict[str, Any], narrowed: dict[str, list], violation,
                    ) -> tuple[dict[str, list], list[tuple[str, Any, float]]]:
    """Give dropped choices back until the narrowed space can meet the constraints again.

    The probes judge each choice alone and without fine-tuning, so they overstate some
    losses by far (pruning a quarter of resnet20's first residual stream loses ~70 pp before
    a fine-tune that wins nearly all of it back). Under a tight latency or size limit,
    narrowing can then leave no policy that meets it. ``violation(params) -> float`` (``<= 0``:
    every constraint met) is asked of the narrowed space (:func:`least_violation`). While it
    violates, one dropped choice is re-admitted per step: in each dimension, the next one
    beyond the most aggressive allowed, and of those the one with the least probe loss per
    unit of violation removed (the least loss alone where none removes any).

    Returns ``(narrowed, readmitted)``, ``readmitted`` as ``(dimension, choice, probe loss)``
    in the order given back. Nothing changes where the narrowed space can already meet the
    constraints, or where even the full space cannot (then narrowing costs nothing).
    """
    choices = space_choices(space)
    probes = sens.get("probes", {})
    allowed = allowed_choices(space, narrowed)
    v = least_violation(space, allowed, violation)
    if v <= 0 or not narrowed or least_violation(space, choices, violation) > 0:
        return narrowed, []
    readmitted: list[tuple[str, Any, float]] = []
    while v > 0:
        best = None
        for d in narrowed:
            top = max(_aggressiveness(d, c) for c in allowed[d])
            beyond = [c for c in choices[d] if c not in allowed[d] and _aggressiveness(d, c) > top]
            if not beyond:
                continue
            nxt = min(beyond, key=lambda c: _aggressiveness(d, c))
            v1 = least_violation(space, {**allowed, d: allowed[d] + [nxt]}, violation)
            loss = _choice_loss(probes, d, nxt)
            key = ((loss + 1e-3) / (v - v1) if v1 < v else float("inf"), loss)
            if best is None or key < best[0]:
                best = (key, d, nxt, v1)
        if best is None:  # cannot happen while the full space meets the constraints
            break
        (_, loss), d, nxt, v = best
        allowed[d].append(nxt)
        readmitted.append((d, nxt, loss))
    out = {d: [c for c in choices[d] if c in allowed[d]] for d in narrowed}
    return {d: cs for d, cs in out.items() if len(cs) < len(choices[d])}, readmitted


def project_params(params: dict[str, Any], narrowed: dict[str, list]) -> dict[str, Any]:
    """Move each value to the nearest allowed choice that is no more aggressive (for seeds)."""
    out = dict(params)
    for dim, allowed in narrowed.items():
        if dim in out and out[dim] not in allowed:
            v = _aggressiveness(dim, out[dim])
            milder = [c for c in allowed if _aggressiveness(dim, c) <= v]
            pool = milder or allowed
            out[dim] = max(pool, key=lambda c: _aggressiveness(dim, c))
    return out


class NarrowedTrial:
    """An Optuna trial whose categorical choices are narrowed per parameter name.

    ``SearchSpace.sample`` asks it exactly as it asks an Optuna trial.
    """

    def __init__(self, trial, narrowed: dict[str, list]) -> None:
        self._trial, self._narrowed = trial, narrowed

    def suggest_categorical(self, name, choices):
        return self._trial.suggest_categorical(name, list(self._narrowed.get(name, choices)))

    def __getattr__(self, item):
        return getattr(self._trial, item)


def guided_params(space, sens: dict[str, Any], fits, *, narrowed: dict[str, list] | None = None,
                  act_bits: int | None = 8, per_byte: bool = True, max_steps: int = 2000,
                  start: dict[str, Any] | None = None, act_steps: bool = False) -> dict[str, Any] | None:
    """Greedy: start from the mildest setting (8-bit where allowed) and apply, one at a time,
    the cheapest next step (least accuracy loss, per unit saved if ``per_byte``) until
    ``fits(policy)`` holds. Returns the params, or ``None`` if the budget is never met.

    ``fits(policy) -> (ok, amount)``: ``amount`` is what the steps must reduce (bytes for a
    size budget, milliseconds for a latency target). ``start``: begin from these params
    instead (e.g. a seed that already meets the budget, to go on cutting latency).
    ``act_steps``: also consider lowering activation bits (they change latency, not size).
    """
    ladder = allowed_choices(space, narrowed)
    probes, eps = damage_table(sens)
    # Start: no pruning/rank, the widest weight bits allowed, act_bits where allowed.
    cur: dict[str, Any] = {}
    for d, lad in ladder.items():
        kind = d.split(":", 1)[0]
        if start is not None and start.get(d, object()) in lad:
            cur[d] = start[d]
        elif kind == "abits" and act_bits in lad:
            cur[d] = act_bits
        else:
            cur[d] = lad[0]
    if space.distill:
        cur.update({k: (start or {}).get(k, v) for k, v in SEED_KD.items()})

    def check(p):
        return fits(space.trial_policy(p))

    ok, amount = check(cur)
    steps = 0
    while not ok and steps < max_steps:
        best = None
        for d, lad in ladder.items():
            if d.startswith("abits:") and not act_steps:
                continue  # activation bits do not change the stored size
            i = lad.index(cur[d]) if cur[d] in lad else 0
            if i + 1 >= len(lad):
                continue
            nxt = lad[i + 1]
            loss = _choice_loss(probes, d, nxt) + eps
            trial_p = {**cur, d: nxt}
            _, a = check(trial_p)
            saved = amount - a
            if saved <= 0:
                continue
            score = loss / saved if per_byte else loss
            if best is None or score < best[0]:
                best = (score, d, nxt)
        if best is None:
            return None
        _, d, nxt = best
        cur[d] = nxt
        ok, amount = check(cur)
        steps += 1
    return cur if ok else None


def predicted_loss(sens: dict[str, Any], params: dict[str, Any]) -> float:
    """Accuracy points ``params`` would lose by the probes, summed over its dimensions (additive
    model, no fine-tune: a ranking, not a forecast)."""
    probes = sens.get("probes", {})
    return float(sum(_choice_loss(probes, d, v) for d, v in params.items() if d in probes))


def _choice_loss(probes: dict[str, dict[str, float]], dim: str, choice: Any) -> float:
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


def filled_params(space, sens: dict[str, Any], start: dict[str, Any], headroom, *,
                  narrowed: dict[str, list] | None = None, max_steps: int = 2000) -> dict[str, Any]:
    """Spend what ``start`` leaves of its limits: undo compression one step at a time (one
    dimension one choice milder), the most damage bought back per unit of headroom spent
    first, while every limit is still met. ``headroom(policy) -> float``: what is left of the
    tightest limit (``>= 0``: all met). Returns ``start`` itself where no step fits.

    Under a latency or energy limit, a policy well inside it (a uniform seed whose grid step
    lands far below the limit) leaves accuracy unclaimed that the user's limit allows.
    """
    probes, eps = damage_table(sens)
    return _undo_compression(space, probes, allowed_choices(space, narrowed), start, headroom, per_room=True,
                             eps=eps, max_steps=max_steps)


def _undo_compression(space, probes: dict[str, dict[str, float]], ladder: dict[str, list], start: dict[str, Any],
                      room, *, per_room: bool, eps: float, max_steps: int) -> dict[str, Any]:
    """From ``start``, make one dimension one choice milder at a time while ``room(policy) >= 0``
    still holds: the step that buys back the most damage first (per unit of room it spends if
    ``per_room``), until no step that buys back any keeps ``room`` non-negative."""
    cur = dict(start)
    left = room(space.trial_policy(cur))
    for _ in range(max_steps):
        steps = []  # (damage bought back, dimension, its milder choice), in ladder order
        for d, lad in ladder.items():
            i = lad.index(cur[d]) if d in cur and cur[d] in lad else 0
            if i == 0:
                continue  # not in the policy (a dimension it leaves out), off the ladder, or mildest
            gain = _choice_loss(probes, d, cur[d]) - _choice_loss(probes, d, lad[i - 1])
            if gain > 0:
                steps.append((gain, d, lad[i - 1]))
        best = None
        if per_room:  # the score needs every step's room
            for gain, d, milder in steps:
                r = room(space.trial_policy({**cur, d: milder}))
                score = gain / max(left - r, eps)
                if r >= 0 and (best is None or score > best[0]):
                    best = (score, d, milder, r)
        else:  # the largest gain that fits: price steps in that order, stop at the first that fits
            for gain, d, milder in sorted(steps, key=lambda t: -t[0]):
                r = room(space.trial_policy({**cur, d: milder}))
                if r >= 0:
                    best = (gain, d, milder, r)
                    break
        if best is None:
            break
        _, d, milder, left = best
        cur[d] = milder
    return cur


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``fcntl`` lock (processes of one run on one machine take turns)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def load_or_measure(ctx, *, force: bool = False, val_size: int = 128, progress: bool = False) -> dict[str, Any]:
    """``RUN/sensitivity.json``, measured once (under a lock, so concurrent processes share it)."""
    path = Path(ctx.run_dir) / "sensitivity.json"
    with file_lock(Path(ctx.run_dir) / ".sensitivity.lock"):
        if path.is_file() and not force:
            try:
                sens = json.loads(path.read_text())
                if sens.get("schema") == SCHEMA:
                    return sens
            except json.JSONDecodeError:
                pass
        calib = ctx.trial_train.first_batches(2, ctx.cfg.batch_size, seed=0) \
            if ctx.trial_train is not None else None
        bn = ctx.cfg.sensitivity_bn_images if ctx.trial_train is not None else 0
        log.info("sensitivity: probing %d dimensions of %s (no fine-tune, %d validation images%s)",
                 len(space_choices(ctx.space)), ctx.cfg.model, min(val_size, len(ctx.data.val)),
                 f", BN statistics re-estimated on {bn} training images" if bn else "")
        sens = measure(ctx.base, ctx.space, ctx.data.val, ctx.input_shape, val_size=val_size,
                       seed=ctx.cfg.seed, calib=calib, bn_data=ctx.trial_train, bn_images=bn,
                       progress=progress)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(sens, indent=1) + "\n")
        os.replace(tmp, path)
        log.info("sensitivity: %d probes in %.1f s -> %s", sens["n_probes"], sens["seconds"], path)
        return sens


def summarize(sens: dict[str, Any], *, top: int = 10) -> list[tuple[str, str, float]]:
    """The ``top`` most damaging (dimension, choice, loss_pp) probes."""
    rows = [(d, c, v) for d, row in sens.get("probes", {}).items() for c, v in row.items()]
    return sorted(rows, key=lambda r: -r[2])[:top]
