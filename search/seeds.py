"""Seed policies: the first trials of a search, chosen by the cost model and the probes alone.

Uniform policies that meet the limits (the same settings in every layer), the same filled up
to the limits, sensitivity-guided policies (the cheapest compression steps by the probes,
one at a time, until the limits are met) and latency seeds cut further from them. They cost
no training: the sampler starts from strong points and learns from their results.
"""

from __future__ import annotations

import logging
from typing import Any

from ..compressors.policy import Policy
from .context import Context
from .limits import constraints_of, is_feasible, target_sram, total_violation
from .narrowing import MODEL_BASED_SAMPLERS, allowed_choices, extreme_params, project_params
from .sensitivity import choice_loss, damage_table, predicted_loss
from .space import KD_DEFAULTS

log = logging.getLogger("squeezer")

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
        cur.update({k: (start or {}).get(k, v) for k, v in KD_DEFAULTS.items()})

    def check(p):
        return fits(space.trial_policy(p))

    ok, amount = check(cur)
    steps = 0
    while not ok and steps < max_steps:
        best = None
        for d, lad in ladder.items():
            if d.startswith("abits:") and not act_steps:
                continue  # activation bits do not change the stored size
            for nxt in _steps(lad, cur[d], both_ways=d.startswith("abits:")):
                loss = choice_loss(probes, d, nxt) + eps
                _, a = check({**cur, d: nxt})
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
    return undo_compression(space, probes, ladder, min(feasible, key=lambda t: t[0])[1],
                             lambda pol: 0.0 if fits(pol)[0] else -1.0, per_room=False, eps=eps,
                             max_steps=max_steps)


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
    return undo_compression(space, probes, allowed_choices(space, narrowed), start, headroom, per_room=True,
                             eps=eps, max_steps=max_steps)


def undo_compression(space, probes: dict[str, dict[str, float]], ladder: dict[str, list], start: dict[str, Any],
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
            gain = choice_loss(probes, d, cur[d]) - choice_loss(probes, d, lad[i - 1])
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


def _steps(ladder: list, cur: Any, *, both_ways: bool) -> list:
    """The choices one step from ``cur`` on a mildest-first ladder: the next more aggressive
    one, and with ``both_ways`` also the next milder one (activation bits: float activations
    can be the faster ones, where (de)quantizing costs more than an integer kernel saves)."""
    i = ladder.index(cur) if cur in ladder else 0
    return ladder[i + 1:i + 2] + (ladder[i - 1:i] if both_ways and i > 0 else [])


def uniform_seeds(ctx: Context) -> list[dict[str, Any]]:
    """Params of the uniform policies that meet the limits: for the two widest integer weight
    widths, the mildest pruning ratio of the grid that fits, with the activation width the
    target runs fastest (8-bit on a tie, and where the target has it), priced as the trial will
    run them (projected into the narrowed space)."""
    sp, sram, out = ctx.space, target_sram(ctx.target), []
    for bits in sorted((b for b in sp.weight_bits if b is not None), reverse=True):
        for p in sp.prune_choices:
            fits = []   # (latency, params) of the activation widths that meet the limits
            for a in _act_widths(sp):
                params = sp.canonical_params(project_params(
                    sp.params_for(sp.uniform_policy(prune_ratio=p, weight_bits=bits, act_bits=a)), ctx.narrowed))
                cost = ctx.estimate(sp.policy_from_params(params))
                if is_feasible(constraints_of(cost, ctx.cfg, sram)):
                    fits.append((float(cost.latency_ms), params))
            if fits:
                out.append(min(fits, key=lambda f: f[0])[1])  # the fastest; the preferred width on a tie
                break
        if len(out) >= 2:
            break
    return out


def _act_widths(sp) -> list[int | None]:
    """The space's uniform activation widths, the preferred (8-bit, else the narrowest) first."""
    first = 8 if 8 in sp.act_bits else sp.act_bits[-1]
    return [first] + [a for a in sp.act_bits if a != first]


class _Seeds:
    """The seeds enqueued so far (each policy once), and the limits they are priced against."""

    def __init__(self, ctx: Context, study: Any) -> None:
        self.ctx, self.study, self.sp, self.sram = ctx, study, ctx.space, target_sram(ctx.target)
        self.policies: list[Policy] = []
        # What the greedy steps reduce: bytes under a size budget alone; with a latency, energy or
        # SRAM limit too, the summed relative violation (bytes alone can run out of steps, e.g.
        # at a latency limit that only pruning meets).
        self.multi = bool(ctx.cfg.max_latency_ms or ctx.cfg.max_energy_mj or self.sram)

    def add(self, params: dict[str, Any], kind: str) -> None:
        params = self.sp.canonical_params(params)
        pol = self.sp.policy_from_params(params)
        if pol not in self.policies:
            self.policies.append(pol)
            self.study.enqueue_trial(params, user_attrs={"seed_policy": kind})

    def fill(self, params: dict[str, Any]) -> dict[str, Any]:
        """Under a latency/energy/SRAM limit, spend what a seed leaves of the limits (the grid's
        0.25 steps can leave a uniform seed far inside a latency limit)."""
        if not self.multi:
            return params
        ctx = self.ctx
        return filled_params(self.sp, ctx.sensitivity, params,
                             lambda pol: -max(constraints_of(ctx.estimate(pol), ctx.cfg, self.sram)),
                             narrowed=ctx.narrowed)

    def fits(self, pol: Policy) -> tuple[bool, float]:
        v = total_violation(cost := self.ctx.estimate(pol), self.ctx.cfg, self.sram)
        return v <= 0, (v if self.multi else float(cost.size_bytes))

    def guided(self) -> list[dict[str, Any]]:
        """Sensitivity-guided params that meet the limits: 8-bit activations first; under a
        latency/energy/SRAM limit, float ones where that cannot meet it (at tiny, heavily pruned
        layers the (de)quantize ops can cost more than int8 kernels save); backed off from the
        extreme where the forward greedy cannot reach the limits."""
        sp, sens, narrowed = self.sp, self.ctx.sensitivity, self.ctx.narrowed
        act8 = 8 if 8 in sp.act_bits else None
        acts = (act8, None) if self.multi and act8 is not None else (act8,)
        out = []
        for per_byte in (True, False):
            for act in acts:
                params = guided_params(sp, sens, self.fits, narrowed=narrowed, per_byte=per_byte, act_bits=act)
                if params is not None:
                    out.append(self.fill(params))
                    break
        if not out:
            params = backed_off_params(sp, sens, self.fits, narrowed=narrowed)
            if params is not None:
                out.append(params)
        return out


def enqueue_seeds(ctx: Context, study: Any) -> list[Policy]:
    """Uniform policies that meet the budget (strong, cheap starting points), plus
    sensitivity-guided ones when sensitivity was measured (``sensitivity_first``)."""
    if ctx.cfg.sampler not in MODEL_BASED_SAMPLERS:
        return []  # the baselines start from nothing
    seeds = _Seeds(ctx, study)
    uniform = uniform_seeds(ctx)
    for params in uniform:
        seeds.policies.append(ctx.space.policy_from_params(params))
        study.enqueue_trial(params, user_attrs={"seed_policy": "uniform"})
    if not ctx.sensitivity:
        return seeds.policies
    for params in uniform:
        seeds.add(seeds.fill(params), "uniform-filled")
    log.info("seeds: sensitivity-guided policies that meet the budget%s (cost model only, no training)",
             ", then latency cuts" if ctx.cfg.latency_seed_fractions else "")
    guided = seeds.guided()
    for params in guided:
        seeds.add(params, "sensitivity")
    if guided:
        for params in latency_seeds(ctx, ctx.sensitivity, guided[0], ctx.narrowed, seeds.policies):
            seeds.add(params, "sensitivity-latency")
    return seeds.policies


def latency_seeds(ctx: Context, sens: dict[str, Any], start: dict[str, Any], narrowed: dict[str, list],
                  seeds: list[Policy] = ()) -> list[dict[str, Any]]:
    """From the sensitivity-guided policy that meets the budget, go on cutting latency on the
    target: the least accuracy loss per millisecond saved, one step at a time, until the
    latency is ``cfg.latency_seeds`` times the reference (each fraction one seed; all within
    budget). The reference is the fastest of ``start`` and the other ``seeds`` the probes
    predict to lose at most 1 point more than ``start`` (e.g. uniform int8 where the budget
    lets the guided seed keep fp32 layers).

    The budget alone says nothing about speed: where it barely binds, these seeds put trials
    on the fast end of the front, so the tolerance rule can pick a faster policy that loses
    little accuracy.
    """

    fractions = ctx.cfg.latency_seed_fractions
    if not fractions:
        return []
    sp, sram = ctx.space, target_sram(ctx.target)
    limit = predicted_loss(sens, start) + 1.0
    ref = float(ctx.estimate(sp.trial_policy(start)).latency_ms)
    for pol in seeds:
        if predicted_loss(sens, project_params(sp.params_for(pol), narrowed)) <= limit:
            ref = min(ref, float(ctx.estimate(pol).latency_ms))
    out = []
    for frac in fractions:
        def fits(pol, goal=frac * ref):
            cost = ctx.estimate(pol)
            lat = float(cost.latency_ms)
            return is_feasible(constraints_of(cost, ctx.cfg, sram)) and lat <= goal, lat

        params = guided_params(sp, sens, fits, narrowed=narrowed, start=start, act_steps=True,
                               act_bits=8 if 8 in sp.act_bits else None)
        if params is not None:
            out.append(params)
            start = params  # the next (smaller) fraction goes on from here
    return out
