"""Samplers beyond Optuna's own: a grid of uniform policies.

``UniformGridSampler`` walks the grid prune ratio x weight bits x activation bits, giving
every layer the same settings in a trial (no low-rank, default distillation). Each grid
point is used once, also across processes sharing the study (the point is stored in the
trial's ``grid_id`` system attribute); when all are used the study stops.

Example:
    >>> import optuna
    >>> s = UniformGridSampler(prune_choices=(0.0, 0.5), weight_bits=(8,), act_bits=(8,))
    >>> study = optuna.create_study(sampler=s)
    >>> study.optimize(lambda t: t.suggest_categorical("prune:a", [0.0, 0.25, 0.5]), n_trials=2)
    >>> [t.params["prune:a"] for t in study.trials], s.exhausted(study)
    ([0.0, 0.5], True)
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

KD_DEFAULTS = {"kd_temperature": 4.0, "kd_alpha": 0.5}


def _nearest(v: Any, choices: Sequence[Any]) -> Any:
    if v in choices:
        return v
    if v is None:
        return None if None in choices else max((c for c in choices if c is not None), default=choices[0])
    nums = [c for c in choices if c is not None]
    return min(nums, key=lambda c: abs(c - v)) if nums else choices[0]


class UniformGridSampler(BaseSampler):
    """Every trial is one uniform policy of the grid (mildest first)."""

    def __init__(self, *, prune_choices: Sequence[float], weight_bits: Sequence[int | None],
                 act_bits: Sequence[int | None], seed: int | None = None) -> None:
        wb = sorted(weight_bits, key=lambda b: -(b or 64))
        ab = sorted(act_bits, key=lambda b: -(b or 64))
        self.grid = list(itertools.product(sorted(prune_choices), wb, ab))
        self._fallback = optuna.samplers.RandomSampler(seed=seed)

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if "fixed_params" in trial.system_attrs or "grid_id" in trial.system_attrs:
            return
        used = {t.system_attrs.get("grid_id") for t in study.get_trials(deepcopy=False)
                if t.number != trial.number and t.state != TrialState.FAIL}
        free = [i for i in range(len(self.grid)) if i not in used]
        if not free:
            if getattr(study._thread_local, "in_optimize_loop", False):  # ask-and-tell callers check exhausted()
                study.stop()
            gid = trial.number % len(self.grid)
        else:
            gid = free[0]
        study._storage.set_trial_system_attr(trial._trial_id, "grid_id", gid)
        trial.system_attrs["grid_id"] = gid

    def sample_independent(self, study, trial: FrozenTrial, param_name: str,
                           param_distribution: BaseDistribution) -> Any:
        gid = trial.system_attrs.get("grid_id")
        if gid is None:
            return self._fallback.sample_independent(study, trial, param_name, param_distribution)
        prune, wbits, abits = self.grid[gid]
        kind = param_name.split(":", 1)[0]
        if isinstance(param_distribution, CategoricalDistribution):
            choices = list(param_distribution.choices)
            want = {"prune": prune, "wbits": wbits, "abits": abits, "rank": None}.get(kind, choices[0])
            return _nearest(want, choices)
        if param_name in KD_DEFAULTS:
            lo, hi = param_distribution.low, param_distribution.high  # type: ignore[attr-defined]
            return min(hi, max(lo, KD_DEFAULTS[param_name]))
        return self._fallback.sample_independent(study, trial, param_name, param_distribution)

    def exhausted(self, study: optuna.Study) -> bool:
        used = {t.system_attrs.get("grid_id") for t in study.get_trials(deepcopy=False)
                if t.state != TrialState.FAIL}
        return all(i in used for i in range(len(self.grid)))
