"""The main job, stage by stage: base model -> sensitivity -> seeds -> trials -> final fine-tune.

Everything a run computes lives in its folder (:mod:`search.runfolder`), so any stage can be
resumed: the base model is cached, the study is in Optuna storage (SQLite by default), each
trial is also written to ``trials/NNNN.json``, and the final model to ``best/``.
"""

from __future__ import annotations

import logging
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna

from .backends import BACKENDS
from .config import SearchConfig
from .context import Context, prepare
from .errors import RunStopped
from .finish import finish
from .limits import limits_of, target_sram
from .narrowing import sensitivity_first
from .runfolder import (
    BEST,
    CONFIG,
    SUMMARY,
    claim_folder,
    disk_full_error,
    file_lock,
    load_config,
    new_run_dir,
    write_json,
)
from .schema import stamped
from .seeds import enqueue_seeds
from .study import check_storage, describe_study, open_study, trial_counts, trial_workers
from .workload import Workload, named_workload

log = logging.getLogger("squeezer")

#: ``extend(study) -> int``: asked after the trials: how many more trained trials to run.
Extend = Callable[[optuna.Study], int]


def start(cfg: SearchConfig, workload: Workload | None = None, *, progress: bool = True,
          extend: Extend | None = None) -> tuple[Context, dict[str, Any]]:
    """Run (or continue) the main job in ``cfg.run`` (a new folder if None); returns the context
    and the summary.

    ``extend(study) -> int``: asked after the trials, before the final stage: how many more
    trained trials to run (0 = none; asked again after those), e.g. to spend a fine-tune step
    budget that rung-stopped trials left unspent. ``config.yaml`` records the final count.
    """
    run_dir = new_run_dir(cfg)
    cfg = cfg.with_(run=str(run_dir))
    claim_folder(cfg, run_dir)
    return run(cfg, run_dir, workload or named_workload(cfg), progress=progress, fresh=True, extend=extend)


def reopen(run_dir: str | Path, workload: Workload | None = None, *, trials: int | None = None,
           storage: str | None = None, progress: bool = True) -> tuple[Context, dict[str, Any]]:
    """Continue the run in ``run_dir`` (to ``trials`` trained trials, if given)."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    changes: dict[str, Any] = {k: v for k, v in (("trials", trials), ("storage", storage)) if v is not None}
    if changes:
        cfg = cfg.with_(**changes)
        if trials is not None:
            # More trials asked for: the chosen model may change, so redo the final stage.
            (run_dir / BEST / "metrics.json").unlink(missing_ok=True)
        cfg.save(run_dir / CONFIG)
    return run(cfg, run_dir, workload or named_workload(cfg), progress=progress, fresh=False)


def seed_study(ctx: Context, study: optuna.Study, *, fresh: bool) -> None:
    """Enqueue the seed policies once per run (concurrent processes of one run seed it once)."""
    with file_lock(ctx.run_dir / ".seed.lock"):
        if fresh and len(study.trials) == 0:
            seeds = enqueue_seeds(ctx, study)
            log.info("search space: %d dimensions (%d layers, %d channel groups); %d seed policies",
                     ctx.space.n_dims, len(ctx.space.layers), len(ctx.space.groups), len(seeds))


@contextmanager
def stage(run_dir: Path, what: str) -> Iterator[None]:
    """Run one stage; a signal or a full disk stops the run with one line saying how to go on
    (:class:`RunStopped`): what it finished is in the run folder, and resume starts from there."""
    resume = f"`squeezer resume {run_dir}` continues"
    try:
        yield
    except KeyboardInterrupt as e:
        signum = int(getattr(e, "signum", signal.SIGINT))
        raise RunStopped(f"stopped by {signal.Signals(signum).name} during {what}; finished work is kept: {resume}",
                         128 + signum) from None
    except Exception as e:  # noqa: BLE001 - only a full disk is turned into a stop; the rest is re-raised
        full = disk_full_error(e)
        if full is None:
            raise
        where = getattr(full, "filename", None) or str(run_dir)
        raise RunStopped(f"error: no space left on device (writing {where}) during {what}; free some space, "
                         f"then {resume}") from None


def run(cfg: SearchConfig, run_dir: Path, workload: Workload, *, progress: bool, fresh: bool,
        extend: Extend | None = None) -> tuple[Context, dict[str, Any]]:
    t0 = time.time()
    check_storage(cfg, run_dir, resuming=not fresh)  # before any expensive work
    with stage(run_dir, "the base model"):
        ctx = prepare(cfg, run_dir, workload, progress=progress)
    with stage(run_dir, "the sensitivity probes"):
        sensitivity_first(ctx, progress=progress)
    with stage(run_dir, "the trials"):
        study = open_study(cfg, run_dir, space=ctx.space)
        describe_study(study, metric=ctx.workload.metric_name, target=cfg.target, budget=cfg.budget,
                       constraints=list(limits_of(cfg, target_sram(ctx.target))))
        seed_study(ctx, study, fresh=fresh)
        t_search = time.time()
        run_trials(ctx, study, extend, progress=progress)
        search_seconds = time.time() - t_search
    with stage(run_dir, "the final fine-tune"):
        best = finish(ctx, study, progress=progress)
    trials = study.get_trials(deepcopy=False)
    summary = stamped("summary", {
        "run": str(run_dir), "base": ctx.base_metrics, "best": best, "trial_counts": trial_counts(trials),
        "workers": trial_workers(trials), "search_seconds": round(search_seconds, 1),
        "wall_seconds": round(time.time() - t0, 1)})
    write_json(run_dir / SUMMARY, summary)
    return ctx, summary


def run_trials(ctx: Context, study: optuna.Study, extend: Extend | None, *, progress: bool) -> None:
    """Trials until ``--trials`` trained ones exist (and as many more as ``extend`` asks)."""
    while True:
        BACKENDS.get(ctx.cfg.backend)(ctx, study, progress=progress)
        more = extend(study) if extend is not None else 0
        if more <= 0:
            return
        ctx.cfg = ctx.cfg.with_(trials=ctx.cfg.trials + int(more))
        ctx.cfg.save(ctx.run_dir / CONFIG)
