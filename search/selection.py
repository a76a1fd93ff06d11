"""Which trial a search chooses, and its Pareto front.

The chosen trial is the fastest feasible one whose validation metric is within
``tolerance_pp`` points of the best feasible one (ties: the more accurate); with no feasible
trial, the least infeasible one -- a search always returns the best it found, and says how far
it is from the goal.

Example:
    >>> import optuna
    >>> s = optuna.create_study(directions=["maximize", "minimize"])
    >>> for acc, lat in ((0.90, 5.0), (0.897, 3.0), (0.80, 1.0)):
    ...     t = s.ask(); t.set_user_attr("evaluated", True); t.set_user_attr("constraints", {"size": -0.1}); _ = s.tell(t, [acc, lat])
    >>> choose_best(s, tolerance_pp=0.5)[0].number, choose_best(s, tolerance_pp=0)[0].number
    (1, 0)
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


def choose_best(study: optuna.Study, tolerance_pp: float = 0.0) -> tuple[Any, str]:
    """``(trial, "feasible" | "infeasible")`` by the rule of the module docstring."""
    feasible = [t for t in evaluated_trials(study) if _feasible(t)]
    if feasible:
        best = max(round(t.values[0], 4) for t in feasible)
        near = [t for t in feasible if round(t.values[0], 4) >= best - tolerance_pp / 100 - 1e-9]
        return min(near, key=lambda t: (t.values[1], -t.values[0])), "feasible"
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        raise UserError("the study has no finished trial; run 'squeezer resume' to continue it")
    return min(done, key=lambda t: max(constraint_values(t.user_attrs.get("constraints")) or [0.0])), "infeasible"
