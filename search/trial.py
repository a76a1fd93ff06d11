"""One trial's lifecycle, shared by both backends.

1. :func:`sample_trial`: the sampler picks a policy (within the narrowed space); the cost model
   prices it; its cost and constraints are recorded on the trial (what the sampler learns from).
2. Over a limit: :func:`reject` -- recorded as rejected, never trained.
3. :func:`claim`: at most ``--trials`` trials train, over all processes and workers of a run.
4. :func:`train_trial` (on a worker): compress a copy of the base model, fine-tune it briefly
   (distilled from the base), score it on the validation split; at each rung the
   early-stopping rule may stop it.
5. :func:`record`: the trial file first, then the study's attributes (a kill in between
   loses nothing: :mod:`search.recovery`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import optuna

from ..compressors.policy import Policy
from ..evaluators.finetune import compress, distill_config, finetune
from .context import Context
from .errors import UserError
from .limits import cost_dict, named_constraints, target_sram
from .narrowing import NarrowedTrial
from .records import result_attrs, trial_record, write_trial_file
from .recovery import reap_dead_trials
from .runfolder import file_lock
from .study import tell_constraints, trained_trials
from .workload import seed_everything

log = logging.getLogger("squeezer")

#: Calibration batches the data-driven pruning criteria see when a trial compresses the base.
CALIB_BATCHES = 8


@dataclass
class Sampled:
    """A trial whose policy was sampled and priced."""

    trial: Any
    policy: Policy
    cost: Any
    cons: dict[str, float]

    @property
    def over_budget(self) -> bool:
        return max(self.cons.values()) > 0

    @property
    def latency_ms(self) -> float:
        return float(self.cost.latency_ms)


def sample_trial(ctx: Context, trial: Any) -> Sampled:
    """Ask ``trial`` for a policy (narrowed by sensitivity) and price it on the target."""
    policy = ctx.space.sample(NarrowedTrial(trial, ctx.narrowed) if ctx.narrowed else trial)
    cost = ctx.estimate(policy)
    named = named_constraints(cost, ctx.cfg, target_sram(ctx.target))
    tell_constraints(trial, named)
    trial.set_user_attr("cost", cost_dict(cost))
    return Sampled(trial, policy, cost, named)


def reject(ctx: Context, s: Sampled, worker: str) -> list[float]:
    """Record an over-budget trial (rejected by the cost model, never trained); its values."""
    s.trial.set_user_attr("evaluated", False)
    write_trial_file(ctx.run_dir, trial_record(s.trial.number, worker, s.policy, s.cost, s.cons, None))
    return [0.0, s.latency_ms]


def try_claim(ctx: Context, study: optuna.Study, trial_number: int) -> bool | None:
    """One claim attempt (call it under the run's claim lock): True = ``trial_number`` may train
    (the caller marks it ``training``), False = enough trials trained, None = the last places
    are held by trials in training elsewhere (wait and retry)."""
    trained = len(trained_trials(study))
    if trained >= ctx.cfg.trials:
        return False
    busy = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if t.user_attrs.get("training") and t.number != trial_number]
    return True if trained + len(busy) < ctx.cfg.trials else None


def claim(ctx: Context, trial: Any) -> bool:
    """Whether this trial should train: trained + in-training trials stay <= ``cfg.trials``.

    Concurrent workers of one run take turns under a file lock; a worker whose peers hold the
    last places waits for them (a peer that dies is reaped and its place freed).
    """
    while True:
        with file_lock(ctx.run_dir / ".claim.lock"):
            ok = try_claim(ctx, trial.study, trial.number)
            if ok:
                trial.set_user_attr("training", True)
            if ok is not None:
                return ok
        reap_dead_trials(trial.study, ctx.run_dir)
        time.sleep(1.0)


class _StopAtRung(Exception):
    pass


class TrialFailed(Exception):
    """A trial that failed by itself (its fine-tune diverged or raised): recorded, the sweep goes on."""


#: A sweep stops when this many trials failed by themselves before any trained to the end.
MAX_FAILED_BEFORE_SUCCESS = 3


def failure_reason(e: Exception) -> str:
    """What made a trial fail, in one line."""
    text = (str(e).strip().splitlines() or [""])[0]
    return text if isinstance(e, FloatingPointError) else f"{type(e).__name__}: {text}"


def check_failing(study: optuna.Study) -> None:
    """Stop a sweep whose first trials all failed by themselves (a loss, data or model that
    cannot work): a few failures say it, the other trials would say it again."""
    failed = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,))
              if t.user_attrs.get("error")]
    if len(failed) >= MAX_FAILED_BEFORE_SUCCESS and not trained_trials(study):
        last = failed[-1]
        raise UserError(f"the first {len(failed)} trained trials all failed (trial {last.number}: "
                        f"{last.user_attrs['error']}); nothing to choose from: check the loss, the learning "
                        "rates (trial_lr, final_lr) and the model; the run folder keeps what was done")


def train_trial(ctx: Context, number: int, policy: Policy, *,
                on_rung: Callable[[int, float, dict[str, float]], bool] | None = None, bar: Any = None,
                ) -> dict[str, Any]:
    """Trial work: compress a copy of the base model, short fine-tune, validation metric.

    ``on_rung(step, metric, rung_metric) -> bool`` is called at each rung step; True stops the
    trial there (multi-fidelity). Returns ``reason`` ("trained" | "stopped" | "failed", then with
    ``error``: why), ``val_metric`` (None unless trained), ``rung_metric``, ``steps``,
    ``train_seconds`` (the time of all of the above: what "trial work" means in the scaling
    numbers).
    """
    cfg = ctx.cfg
    t0 = time.time()
    seed_everything(cfg.seed + number)
    calib = ctx.trial_train.first_batches(CALIB_BATCHES, cfg.batch_size, seed=number)
    try:
        model, _ = compress(ctx.base, policy, ctx.input_shape, calib=calib)
    except (ValueError, RuntimeError) as e:  # a policy this model cannot take: the trial's own failure
        log.warning("trial %d failed: %s", number, failure_reason(e))
        return {"reason": "failed", "val_metric": None, "error": failure_reason(e), "rung_metric": {},
                "steps": 0, "train_seconds": round(time.time() - t0, 3)}
    rungs = set(cfg.rung_steps)
    steps_done = 0
    rung_metric: dict[str, float] = {}

    def on_step(step: int, total: int, loss: float) -> None:
        nonlocal steps_done
        steps_done = step
        if bar is not None:
            bar.set_postfix_str(f"trial {number}: step {step}/{total} loss {loss:.3f}")
        if step in rungs and step < total and on_rung is not None:
            rung_metric[str(step)] = ctx.score(model, ctx.rung_val)
            if on_rung(step, rung_metric[str(step)], dict(rung_metric)):
                raise _StopAtRung

    out: dict[str, Any] = {"reason": "trained", "val_metric": None}
    try:
        finetune(model, ctx.trial_train, teacher=ctx.base, distill=distill_config(policy, cfg.distill),
                 max_steps=cfg.trial_steps, epochs=10, lr=cfg.trial_lr, batch_size=cfg.batch_size,
                 seed=cfg.seed + number, progress=on_step, loss_fn=ctx.workload.loss)
        out["val_metric"] = ctx.score(model, ctx.data.val)
    except _StopAtRung:
        out.update(reason="stopped", pruned_at=steps_done)
    except OSError:
        raise  # the machine's fault (a full disk, a lost file), not the trial's: the run stops
    except Exception as e:  # noqa: BLE001 - the trial's own failure: recorded, the sweep goes on
        out.update(reason="failed", error=failure_reason(e))
        log.warning("trial %d failed: %s", number, out["error"])
    return {**out, "rung_metric": rung_metric, "steps": steps_done, "train_seconds": round(time.time() - t0, 3)}


def record(ctx: Context, s: Sampled, worker: str, result: dict[str, Any]) -> list[float] | None:
    """Write a trained trial's file, then its study attributes; its values (None: stopped at a
    rung, or failed)."""
    write_trial_file(ctx.run_dir, trial_record(s.trial.number, worker, s.policy, s.cost, s.cons, result))
    for k, v in result_attrs(result).items():
        s.trial.set_user_attr(k, v)
    if result["reason"] in ("stopped", "failed"):
        return None
    return [result["val_metric"], s.latency_ms]


def stopped_message(result: dict[str, Any], cfg: Any) -> str:
    """Why a trial stopped at a rung, in words."""
    step = result["pruned_at"]
    return (f"validation metric {result['rung_metric'][str(step)]:.4f} at step {step} is below the best "
            f"1/{cfg.prune_eta} of its rung (among trials at least as fast)")


def sample_limit(study: optuna.Study, cfg: Any) -> int:
    """Samples after which a sweep stops even short of ``--trials``: a guard against a space that
    is (nearly) all over budget, where rejected samples cost no training but never end."""
    return len(study.trials) + 40 * cfg.trials + 200
