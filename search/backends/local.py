"""The ``optuna`` backend: trials in this process, through ``study.optimize``.

Several processes (``squeezer search --run SAME``, or workers sharing one ``--storage`` URL)
can run this backend on one study at once; :func:`search.trial.claim` keeps the count exact.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import optuna
from tqdm.auto import tqdm

from ..config import worker_id
from ..context import Context
from ..recovery import hold_worker_lock, reap_dead_trials
from ..rungs import RungPruner
from ..study import evaluated_trials, trained_trials
from ..trial import (
    TrialFailed,
    check_failing,
    claim,
    record,
    reject,
    sample_limit,
    sample_trial,
    stopped_message,
    train_trial,
)

log = logging.getLogger("squeezer")


class Objective:
    """The Optuna objective: one trial's lifecycle (:mod:`search.trial`) in this process."""

    def __init__(self, ctx: Context, *, bar: Any = None) -> None:
        self.ctx, self.bar, self.pruner = ctx, bar, RungPruner(ctx.cfg)

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        ctx, me = self.ctx, worker_id()
        trial.set_user_attr("worker", me)
        s = sample_trial(ctx, trial)
        if s.over_budget:
            return tuple(reject(ctx, s, me))  # type: ignore[return-value]
        if not claim(ctx, trial):
            # Enough trials trained or in training elsewhere (concurrent workers): not counted.
            trial.set_user_attr("surplus", True)
            trial.study.stop()
            raise optuna.TrialPruned("the asked number of trials is reached")
        result = train_trial(ctx, trial.number, s.policy, on_rung=lambda *a: self._at_rung(trial, *a), bar=self.bar)
        values = record(ctx, s, me, result)
        if result["reason"] == "failed":
            raise TrialFailed(result["error"])
        if values is None:
            raise optuna.TrialPruned(stopped_message(result, ctx.cfg))
        return tuple(values)  # type: ignore[return-value]

    def _at_rung(self, trial: optuna.Trial, step: int, metric: float, rung_metric: dict[str, float]) -> bool:
        # Published at once: concurrent workers compare against it at their rungs.
        trial.set_user_attr("rung_metric", rung_metric)
        return self.pruner.prune(trial.study, trial.study._storage.get_trial(trial._trial_id))


class _Progress:
    """The sweep's bar, and the callback that stops the sweep when enough trials trained."""

    def __init__(self, study: optuna.Study, cfg: Any, *, progress: bool) -> None:
        self.cfg, self.limit = cfg, sample_limit(study, cfg)
        self.exhausted = getattr(study.sampler, "exhausted", None)
        self.bar = tqdm(total=cfg.trials, initial=len(trained_trials(study)), desc="search", unit="trial",
                        dynamic_ncols=True, disable=not progress)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state == optuna.trial.TrialState.FAIL:
            check_failing(study)
        n = len(trained_trials(study))
        self.bar.n = min(n, self.cfg.trials)
        best = [t.values[0] for t in evaluated_trials(study)]
        if best:
            self.bar.set_postfix_str(f"best val {max(best):.4f}")
        self.bar.refresh()
        if n >= self.cfg.trials or len(study.trials) >= self.limit or (self.exhausted and self.exhausted(study)):
            study.stop()


def run_trials(ctx: Context, study: optuna.Study, *, progress: bool = True) -> None:
    """Run trials until ``cfg.trials`` trained trials exist in the study (over-budget ones are free)."""
    cfg = ctx.cfg
    # ERROR: a failed trial is logged as one line of ours, not as Optuna's warning with a traceback.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    hold_worker_lock(ctx.run_dir)
    reaped = reap_dead_trials(study, ctx.run_dir)
    if reaped:
        log.info("re-queued or recovered %d trial(s) whose worker died", reaped)
    exhausted = getattr(study.sampler, "exhausted", None)
    if len(trained_trials(study)) >= cfg.trials or (exhausted is not None and exhausted(study)):
        return
    done = _Progress(study, cfg, progress=progress)
    deadline = None if cfg.timeout is None else time.time() + cfg.timeout
    try:
        study.optimize(Objective(ctx, bar=done.bar), n_trials=None,
                       timeout=None if deadline is None else max(1.0, deadline - time.time()),
                       callbacks=[done], gc_after_trial=False, catch=(TrialFailed,))
    finally:
        done.bar.close()
    if len(evaluated_trials(study)) == 0:
        log.warning("no candidate within the budget was found in %d samples", len(study.trials))
