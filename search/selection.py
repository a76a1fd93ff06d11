"""Which trial a search chooses, and its Pareto front.

The chosen trial is the fastest feasible one whose validation metric is within
``tolerance_pp`` points of the reference: the base model's validation metric, or the best
feasible trial's where that is lower (ties: the more accurate). What a user asks of a
compressed model is to lose at most so much against the model they gave; when fine-tuning
lifts trials above an under-trained base, holding them to the best trial instead would throw
away speed that costs nothing against the base. With no feasible trial, the least infeasible
one -- a search always returns the best it found, and says how far it is from the goal.

Example:
    >>> import optuna
    >>> s = optuna.create_study(directions=["maximize", "minimize"])
    >>> for acc, lat in ((0.90, 5.0), (0.897, 3.0), (0.80, 1.0)):
    ...     t = s.ask(); t.set_user_attr("evaluated", True); t.set_user_attr("constraints", {"size": -0.1}); _ = s.tell(t, [acc, lat])
    >>> choose_best(s, tolerance_pp=0.5)[0].number, choose_best(s, tolerance_pp=0)[0].number
    (1, 0)
    >>> choose_best(s, tolerance_pp=0.5, base_metric=0.85)[0].number   # trials above the base: 0.5 below it is enough
    1
    >>> fastest_acceptable([("a", 0.90, 5.0), ("b", 0.86, 2.0)], tolerance_pp=0.5, base_metric=0.863)
    'b'
    >>> [t.number for t in pareto_front(s.trials)]
    [2, 1, 0]
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from .errors import UserError
from .limits import constraint_values, is_feasible
from .study import evaluated_trials


def _feasible(t: FrozenTrial) -> bool:
    return is_feasible(t.user_attrs.get("constraints"))


def pareto_front(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Non-dominated evaluated feasible trials (max metric, min latency), fastest first."""
    pts = [t for t in trials if t.user_attrs.get("evaluated") and _feasible(t)]
    front = []
    for t in pts:
        a, lat = t.values
        dominated = any((u.values[0] >= a and u.values[1] <= lat) and (u.values[0] > a or u.values[1] < lat)
                        for u in pts)
        if not dominated:
            front.append(t)
    return sorted(front, key=lambda t: t.values[1])


def fastest_acceptable(items: list[tuple[Any, float, float]], *, tolerance_pp: float,
                       base_metric: float | None = None) -> Any:
    """The key of the fastest ``(key, metric, latency)`` item within ``tolerance_pp`` points of
    the reference (the module docstring's rule; ties: the more accurate)."""
    reference = max(round(m, 4) for _, m, _ in items)
    if base_metric is not None:
        reference = min(reference, round(base_metric, 4))
    near = [it for it in items if round(it[1], 4) >= reference - tolerance_pp / 100 - 1e-9]
    return min(near, key=lambda it: (it[2], -it[1]))[0]


def choose_best(study: optuna.Study, tolerance_pp: float = 0.0,
                base_metric: float | None = None) -> tuple[Any, str]:
    """``(trial, "feasible" | "infeasible")`` by the rule of the module docstring."""
    feasible = [t for t in evaluated_trials(study) if _feasible(t)]
    if feasible:
        return fastest_acceptable([(t, t.values[0], t.values[1]) for t in feasible], tolerance_pp=tolerance_pp,
                                  base_metric=base_metric), "feasible"
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        raise UserError("the study has no finished trial; run 'squeezer resume' to continue it")
    return min(done, key=lambda t: max(constraint_values(t.user_attrs.get("constraints")) or [0.0])), "infeasible"
