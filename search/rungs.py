"""Early stopping at rungs: asynchronous successive halving within a latency class.

A trial scores its validation metric at the rung steps (``--rungs 20,40``); it stops there
unless it is in the best ``1/prune_eta`` of the trials at least as fast as it on the target
(within :data:`RUNG_LATENCY_SLACK`) that reached the same rung -- decided only once
``rung_min_trials`` such trials did, so the first ones, and the fastest, go on: a fast policy
that learns slower is not stopped by slower, more accurate ones (``rung_latency_class: false``
gives plain successive halving over all trials).

:class:`RungPruner` is the rule as an Optuna pruner. Optuna cannot call a pruner of a
multi-objective study itself (``Trial.should_prune`` raises), so the local backend calls
:meth:`RungPruner.prune` at each rung, and the Ray backend's rung board calls
:meth:`RungPruner.decide` with the accuracies its workers report.

Example:
    >>> from squeezer.search.config import SearchConfig
    >>> p = RungPruner(SearchConfig(rungs="20", trial_steps=60))
    >>> p.decide([(0.9, 1.0), (0.8, 1.0)], 0.5, latency_ms=1.0)    # worst of 3: stop
    True
    >>> p.decide([(0.9, 1.0), (0.8, 1.0)], 0.5, latency_ms=0.5)    # faster than all: no peers yet
    False
"""

from __future__ import annotations

import optuna
from optuna.pruners import BasePruner
from optuna.trial import FrozenTrial

from .config import SearchConfig
from .study import priced_latency, user_attr

#: Peers up to this much slower still count as "as fast" at a rung (cost-model resolution:
#: e.g. 4- and 8-bit weights both compute at int8 on ARM and differ only in bytes read).
RUNG_LATENCY_SLACK = 0.05


class RungPruner(BasePruner):
    """The rung rule of the module docstring, for the settings of ``cfg``."""

    def __init__(self, cfg: SearchConfig) -> None:
        self.eta, self.min_trials, self.latency_class = cfg.prune_eta, cfg.rung_min_trials, cfg.rung_latency_class

    def decide(self, peers: list[tuple[float, float | None]], acc: float, latency_ms: float | None = None) -> bool:
        """Stop a trial scoring ``acc`` at a rung where the other trials scored ``peers``
        (``(metric, latency_ms)`` pairs)? ``latency_ms`` None: compare with all of them."""
        if not self.latency_class:
            latency_ms = None
        vals = [a for a, lat in peers if latency_ms is None or lat is None or lat <= latency_ms * (1 + RUNG_LATENCY_SLACK)]
        vals = sorted(vals + [acc], reverse=True)
        if len(vals) < self.min_trials:
            return False
        k = max(1, len(vals) // self.eta)
        return acc < vals[k - 1]

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        """Stop ``trial`` at the last rung it reported (its ``rung_metric`` user attribute)?"""
        rungs = user_attr(trial, "rung_metric") or {}
        if not rungs:
            return False
        step = max(rungs, key=int)
        return self.decide(peers_at(study, int(step), but=trial.number), rungs[step], priced_latency(trial))


def peers_at(study: optuna.Study, step: int, *, but: int) -> list[tuple[float, float | None]]:
    """``(metric, latency_ms)`` of the trials other than number ``but`` that reached rung ``step``."""
    key = str(step)
    rungs = {t.number: (user_attr(t, "rung_metric") or {}, priced_latency(t)) for t in study.get_trials(deepcopy=False)}
    return [(r[key], lat) for n, (r, lat) in rungs.items() if n != but and key in r]
