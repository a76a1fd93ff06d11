"""Narrowing: the search space without the choices the probes say lose too much alone.

A choice whose probe lost more than ``--sensitivity-threshold`` points alone is dropped for
its dimension (:func:`narrowed_choices`; the mildest choice always stays), then dropped
choices are given back until the narrowed space can meet the run's limits again
(:func:`relax_narrowing`). The result is computed once per run and kept in
``RUN/narrowed.json`` (Optuna needs a parameter's choices to stay the same), and trials sample
through :class:`NarrowedTrial`.

Example:
    >>> sens = {"probes": {"wbits:conv": {"8": 0.1, "4": 0.5, "2": 30.0}}, "base_accuracy": 0.9}
    >>> narrowed_choices(sens, {"wbits:conv": [2, 4, 8, None]}, threshold_pp=5.0)
    {'wbits:conv': [4, 8, None]}
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from .context import Context
from .limits import target_sram, total_violation
from .runfolder import NARROWED, CorruptFile, file_lock, read_checked_json, write_json
from .sensitivity import _key, aggressiveness, choice_loss, load_or_measure, space_choices
from .space import KD_DEFAULTS

log = logging.getLogger("squeezer")

#: Samplers that model the results and so use the probes (narrowing and seeds); the others are
#: the baselines and search the full space from nothing.
MODEL_BASED_SAMPLERS = ("tpe", "nsga2")

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
        mildest = min(cs, key=lambda c: aggressiveness(dim, c))
        keep = [c for c in cs if c == mildest or row.get(_key(c), 0.0) <= threshold_pp]
        if len(keep) < len(cs):
            out[dim] = keep
    return out


def allowed_choices(space, narrowed: dict[str, list] | None) -> dict[str, list]:
    """Every dimension's allowed choices, mildest first (``narrowed`` where it narrows)."""
    narrowed = narrowed or {}
    return {d: sorted(narrowed.get(d, cs), key=lambda c, d=d: aggressiveness(d, c))
            for d, cs in space_choices(space).items()}


def most_aggressive(space, allowed: dict[str, list]) -> dict[str, Any]:
    """The params taking each dimension's most aggressive allowed choice (the smallest, and
    as a rule the fastest, policy a space holds)."""
    p = {d: max(cs, key=lambda c: aggressiveness(d, c)) for d, cs in allowed.items()}
    return {**p, **KD_DEFAULTS} if space.distill else p


def extreme_params(space, allowed: dict[str, list]) -> list[dict[str, Any]]:
    """The most aggressive params ``allowed`` holds, and its variants with the ranks and/or
    the activation bits at their mildest: the most aggressive choice is not always the
    fastest (a low-rank pair of convs, or integer activations into a float kernel, can be
    slower); as a rule the smallest and the fastest policy of a space are among these four."""
    p = most_aggressive(space, allowed)
    out = [p]
    for kinds in (("rank",), ("abits",), ("rank", "abits")):
        q = {**p, **{d: min(allowed[d], key=lambda c, d=d: aggressiveness(d, c))
                     for d in allowed if d.split(":", 1)[0] in kinds}}
        if q not in out:
            out.append(q)
    return out


def least_violation(space, allowed: dict[str, list], violation) -> float:
    """The least ``violation`` over :func:`extreme_params` (``<= 0``: ``allowed`` holds a
    policy that meets the limits)."""
    return min(violation(p) for p in extreme_params(space, allowed))


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
            top = max(aggressiveness(d, c) for c in allowed[d])
            beyond = [c for c in choices[d] if c not in allowed[d] and aggressiveness(d, c) > top]
            if not beyond:
                continue
            nxt = min(beyond, key=lambda c: aggressiveness(d, c))
            v1 = least_violation(space, {**allowed, d: allowed[d] + [nxt]}, violation)
            loss = choice_loss(probes, d, nxt)
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
            v = aggressiveness(dim, out[dim])
            milder = [c for c in allowed if aggressiveness(dim, c) <= v]
            pool = milder or allowed
            out[dim] = max(pool, key=lambda c: aggressiveness(dim, c))
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


def narrow(ctx: Context, sens: dict[str, Any], threshold_pp: float | None = None,
           ) -> tuple[dict[str, list], list[tuple[str, Any, float]]]:
    """The search space's narrowed choices: drop those the probes say lose more than
    ``threshold_pp`` (the run's by default) alone, then give back the least damaging of them
    that the run's budget and limits need (:func:`relax_narrowing`). Returns
    ``(narrowed, readmitted)``."""
    thr = ctx.cfg.sensitivity_threshold_pp if threshold_pp is None else threshold_pp
    narrowed = narrowed_choices(sens, space_choices(ctx.space), threshold_pp=thr)
    sram = target_sram(ctx.target)

    def violation(params):
        return total_violation(ctx.estimate(ctx.space.trial_policy(params)), ctx.cfg, sram)

    return relax_narrowing(ctx.space, sens, narrowed, violation)


def run_narrowing(ctx: Context, sens: dict[str, Any]) -> tuple[dict[str, list], list[tuple[str, Any, float]]]:
    """:func:`narrow` at the run's threshold, computed once per run and kept in
    ``RUN/narrowed.json``: Optuna needs a parameter's choices to stay the same, and the give-back
    depends on the cost model, which a later version or a calibration may change."""
    path = Path(ctx.run_dir) / NARROWED
    key = {"threshold_pp": ctx.cfg.sensitivity_threshold_pp,
           "probes_sha1": hashlib.sha1(json.dumps(sens.get("probes"), sort_keys=True).encode()).hexdigest()}
    with file_lock(Path(ctx.run_dir) / ".sensitivity.lock"):
        saved = _saved_narrowing(path)
        if all(saved.get(k) == v for k, v in key.items()):
            return saved["narrowed"], [tuple(r) for r in saved["readmitted"]]
        # First time, or the probes were measured again (`squeezer sensitivity --force`).
        narrowed, readmitted = narrow(ctx, sens)
        write_json(path, {**key, "narrowed": narrowed, "readmitted": readmitted}, checksum=True)
        return narrowed, readmitted


def _saved_narrowing(path: Path) -> dict[str, Any]:
    """The kept narrowing, or {} (none yet, or a damaged file: computed again from the probes)."""
    if not path.is_file():
        return {}
    try:
        return read_checked_json(path)
    except CorruptFile as e:
        log.warning("%s; narrowing again from the probes", e)
        return {}


def sensitivity_first(ctx: Context, *, progress: bool = True) -> None:
    """Measure (or load) per-layer sensitivity and narrow the space (``cfg.sensitivity``).

    Only the model-based samplers (``tpe``, ``nsga2``) use it: ``random`` and ``grid`` are
    the baselines and search the full space.
    """
    if not ctx.cfg.sensitivity or ctx.cfg.sampler not in MODEL_BASED_SAMPLERS:
        return
    sens = load_or_measure(ctx, progress=progress)
    full = space_choices(ctx.space)
    narrowed, readmitted = run_narrowing(ctx, sens)
    ctx.sensitivity, ctx.narrowed, ctx.readmitted = sens, narrowed, readmitted
    if narrowed:
        dropped = sum(len(full[d]) - len(v) for d, v in narrowed.items())
        log.info("sensitivity: dropped %d choice(s) losing > %g pp alone, in %d dimension(s)",
                 dropped, ctx.cfg.sensitivity_threshold_pp, len(narrowed))
    if readmitted:
        log.info("sensitivity: gave back %d dropped choice(s) (probes: up to %.0f pp lost alone, before "
                 "fine-tuning) so that the narrowed space can still meet the constraints",
                 len(readmitted), max(loss for _, _, loss in readmitted))
