"""Finalists: the fast end of the Pareto front, fine-tuned longer before one is chosen.

A trial's score comes from a short fine-tune (``trial_steps``), and a short fine-tune
under-rates the most compressed policies: they lose the most at first and recover the most in
the final fine-tune. So the final stage does not trust the short scores at the fast end: it
takes the trial the selection rule chooses (:func:`search.selection.choose_best`) and up to
``finalists - 1`` faster trials of the Pareto front whose short score is within
``finalist_margin_pp`` points of the best, fine-tunes each on the training split (for
``finalist_epochs``; by default the final fine-tune itself, whose model the chosen finalist
keeps), scores it on the validation split, and applies the same rule to those scores
(:func:`search.selection.fastest_acceptable`). The test split is never looked at. Each result
is written to ``finalists.json`` as it is measured, so a stopped run resumes without
repeating one.

Example:
    >>> import optuna
    >>> s = optuna.create_study(directions=["maximize", "minimize"])
    >>> for acc, lat in ((0.90, 5.0), (0.897, 3.0), (0.88, 2.0), (0.80, 1.0)):
    ...     t = s.ask(); t.set_user_attr("evaluated", True); t.set_user_attr("constraints", {"size": -0.1}); _ = s.tell(t, [acc, lat])
    >>> [t.number for t in finalist_trials(s, finalists=3, tolerance_pp=0.5, margin_pp=3.0)]
    [1, 2]
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial

from .runfolder import FINALISTS, write_json
from .schema import read_run_json, stamped
from .selection import choose_best, fastest_acceptable, pareto_front

log = logging.getLogger("squeezer")

#: ``measure(trial) -> validation metric`` after the finalists' fine-tune.
Measure = Callable[[FrozenTrial], float]


def finalist_trials(study: optuna.Study, *, finalists: int, tolerance_pp: float, margin_pp: float,
                    base_metric: float | None = None) -> list[FrozenTrial]:
    """The trial the rule chooses, then the faster trials of the front within ``margin_pp`` of
    the best short score, fastest first, ``finalists`` in all (just the first when the rule
    has no feasible trial or ``finalists <= 1``)."""
    return _candidates(study, *choose_best(study, tolerance_pp, base_metric), finalists=finalists,
                       margin_pp=margin_pp)


def _candidates(study: optuna.Study, chosen: FrozenTrial, status: str, *, finalists: int,
                margin_pp: float) -> list[FrozenTrial]:
    """:func:`finalist_trials` given the rule's choice and its status."""
    if status != "feasible" or finalists <= 1:
        return [chosen]
    front = pareto_front(study.get_trials(deepcopy=False))
    best = max(t.values[0] for t in front)
    faster = [t for t in front if t.values[1] < chosen.values[1] and t.values[0] >= best - margin_pp / 100 - 1e-9]
    return [chosen] + faster[:finalists - 1]


def choose_final(study: optuna.Study, cfg: Any, run_dir: Any, measure: Measure,
                 base_metric: float | None = None) -> tuple[FrozenTrial, str, dict]:
    """``(trial, "feasible" | "infeasible", record)``: the trial the final fine-tune trains, and
    the finalists' record (``{}`` when there is only one candidate). ``base_metric``: the base
    model's validation metric (the rule's reference, see :mod:`search.selection`)."""
    chosen, status = choose_best(study, cfg.tolerance_pp, base_metric)
    candidates = _candidates(study, chosen, status, finalists=cfg.finalists, margin_pp=cfg.finalist_margin_pp)
    if len(candidates) == 1:
        return chosen, status, {}
    path = run_dir / FINALISTS
    record = read_run_json(path, "finalists")
    epochs = cfg.finalist_fine_tune_epochs
    if record is None or record.get("epochs") != epochs:  # scores of other fine-tunes do not count
        record = stamped("finalists", {"epochs": epochs, "trials": []})
    record["candidates"], record["rule_choice"] = [t.number for t in candidates], candidates[0].number
    log.info("finalists: trials %s (the rule's choice and the faster ones within %g points), %g epochs each",
             ", ".join(str(t.number) for t in candidates), cfg.finalist_margin_pp, epochs)
    done = {r["number"]: r for r in record["trials"]}
    for t in candidates:
        if t.number not in done:
            done[t.number] = {"number": t.number, "val_metric": measure(t), "trial_val_metric": t.values[0],
                              "latency_ms": t.values[1]}
            record["trials"] = list(done.values())
            write_json(path, record)
        log.info("finalist trial %d: validation %.4f after %g epochs (%.4f after %d steps), %.4g ms",
                 t.number, done[t.number]["val_metric"], epochs, t.values[0], cfg.trial_steps,
                 t.values[1])
    number = fastest_acceptable([(t.number, done[t.number]["val_metric"], t.values[1]) for t in candidates],
                                tolerance_pp=cfg.tolerance_pp, base_metric=base_metric)
    record["chosen"] = number
    write_json(path, record)
    return next(t for t in candidates if t.number == number), "feasible", record
