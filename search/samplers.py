"""The samplers a search can use, by name (:data:`SAMPLERS`): Optuna's and a grid of uniform policies.

``tpe`` (multi-objective TPE with constraints, the default), ``nsga2``, ``random`` (a baseline)
and ``grid``: :class:`UniformGridSampler`.

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
import warnings
from typing import Any, Callable, Sequence

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from ..compressors.registry import Registry, UnknownNameError
from .config import SearchConfig
from .errors import UserError
from .limits import constraint_values
from .space import KD_DEFAULTS, PRUNE_CHOICES, SearchSpace


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


#: Samplers by name: ``factory(cfg, space) -> optuna.samplers.BaseSampler``.
SAMPLERS: Registry[Callable[[SearchConfig, SearchSpace | None], BaseSampler]] = Registry("sampler")
#: Trials of the model-based samplers drawn at random before they model the results.
N_STARTUP_TRIALS = 4


def _constraints(trial: FrozenTrial) -> list[float]:
    return constraint_values(trial.user_attrs.get("constraints")) or [0.0]


def _constraint_kwargs() -> dict[str, Any]:
    """Optuna >= 5 reads the constraints recorded on the trial (``search.study.tell_constraints``);
    older versions need ``constraints_func``."""
    return {} if hasattr(optuna.trial.Trial, "set_constraint") else {"constraints_func": _constraints}


@SAMPLERS.register("tpe", summary="multi-objective TPE with constraints (the default)")
def _tpe(cfg: SearchConfig, space: SearchSpace | None) -> BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental-feature notices for `group`
        return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=N_STARTUP_TRIALS, multivariate=True,
                                          group=True, **_constraint_kwargs())


@SAMPLERS.register("nsga2", summary="NSGA-II, population 8")
def _nsga2(cfg: SearchConfig, space: SearchSpace | None) -> BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return optuna.samplers.NSGAIISampler(seed=cfg.seed, population_size=8, **_constraint_kwargs())


@SAMPLERS.register("random", summary="uniform random policies (a baseline)")
def _random(cfg: SearchConfig, space: SearchSpace | None) -> BaseSampler:
    return optuna.samplers.RandomSampler(seed=cfg.seed)


@SAMPLERS.register("grid", summary="the grid of uniform policies, each once (a baseline)")
def _grid(cfg: SearchConfig, space: SearchSpace | None) -> BaseSampler:
    return UniformGridSampler(prune_choices=space.prune_choices if space else PRUNE_CHOICES,
                              weight_bits=space.weight_bits if space else (2, 4, 8),
                              act_bits=space.act_bits if space else (8,), seed=cfg.seed)


def make_sampler(cfg: SearchConfig, space: SearchSpace | None = None) -> BaseSampler:
    """The sampler ``cfg.sampler`` names (a one-line error for an unknown name)."""
    try:
        factory = SAMPLERS.get(cfg.sampler)
    except UnknownNameError as e:
        raise UserError(str(e)) from None
    return factory(cfg, space)
