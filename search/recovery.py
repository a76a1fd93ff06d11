"""Dead workers and their trials: who is alive, and what happens to a trial whose process died.

A process running trials holds ``RUN/.workers/<host>-<pid>.lock`` (:func:`hold_worker_lock`),
so the others see it is alive. A RUNNING trial whose worker is gone is re-queued with the same
parameters (:func:`fail_and_requeue`), unless its ``trials/NNNN.json`` already holds the
finished result (the process died between writing the file and committing the trial): then
the study is told that result (:func:`recover_from_trial_file`) and nothing is trained again.
"""

from __future__ import annotations

import datetime
import fcntl
import logging
import os
import socket
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from .errors import UserError
from .records import read_trial_file, result_attrs
from .runfolder import CorruptFile, file_lock, trial_path
from .schema import upgrade
from .study import is_shared_storage

log = logging.getLogger("squeezer")

_WORKER_LOCK: dict[str, Any] = {}
#: A trial with no worker recorded (killed before its first attribute) is reaped after this long.
ORPHAN_AGE_S = 600


def hold_worker_lock(run_dir: Path) -> None:
    """Hold ``RUN/.workers/<host>-<pid>.lock`` while this process runs trials (others see it is alive)."""
    path = Path(run_dir) / ".workers" / f"{socket.gethostname()}-{os.getpid()}.lock"
    if str(path) in _WORKER_LOCK:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    fcntl.flock(fh, fcntl.LOCK_EX)
    _WORKER_LOCK[str(path)] = fh


def other_live_workers(run_dir: Path) -> int:
    """Processes on this host, other than this one, that hold a worker lock of ``run_dir``."""
    n = 0
    for f in (Path(run_dir) / ".workers").glob("*.lock"):
        if str(f) in _WORKER_LOCK:
            continue
        try:
            with open(f, "a+") as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    n += 1  # held: that worker is alive
                    continue
                fcntl.flock(fh, fcntl.LOCK_UN)
            f.unlink(missing_ok=True)  # its process is gone
        except FileNotFoundError:
            pass
    return n


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dead_here(ident: str) -> bool:
    """``host:pid`` names a process of this host, not this one, that is gone."""
    h, _, pid = ident.rpartition(":")
    return h == socket.gethostname() and pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid))


def _orphaned(study: optuna.Study, trial: FrozenTrial, alone: bool) -> bool:
    """A trial with no worker recorded: reaped when no other worker of the run is alive on this
    host (the run's own SQLite storage) or when it is older than :data:`ORPHAN_AGE_S`."""
    age = (datetime.datetime.now() - trial.datetime_start).total_seconds() if trial.datetime_start else 0.0
    return (alone and not is_shared_storage(study)) or age > ORPHAN_AGE_S


def reap_dead_trials(study: optuna.Study, run_dir: Path | None = None, *,
                     dead_workers: set[str] | None = None) -> int:
    """Fail RUNNING trials whose worker process on this host is gone, and re-queue them (or
    recover their result from the trial file).

    ``dead_workers`` (``host:pid``) are workers known dead elsewhere (the Ray backend's lost
    actors). A trial whose ``driver`` (the Ray backend's driver process, which asked for it) is
    dead on this host is reaped too. Trials of other hosts are otherwise left to Optuna's
    heartbeat. Trials a stopped process left FAIL (:func:`requeue_stopped`) are re-queued too.
    Returns the number of trials re-queued or recovered.
    """
    n = requeue_stopped(study, run_dir) if run_dir is not None else 0
    alone: bool | None = None
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        w, d = t.user_attrs.get("worker", ""), t.user_attrs.get("driver", "")
        orphan = False
        if not w and not d and run_dir is not None:
            if alone is None:
                alone = other_live_workers(run_dir) == 0
            orphan = _orphaned(study, t, alone)
        if orphan or (dead_workers and w in dead_workers) or _dead_here(w) or _dead_here(d):
            n += 1
            if run_dir is not None and recover_from_trial_file(study, t, run_dir):
                continue
            fail_and_requeue(study, t)
    return n


def requeue_stopped(study: optuna.Study, run_dir: Path) -> int:
    """Enqueue again the policy of each trial that failed because its process stopped (Ctrl-C,
    ``SIGTERM``, a full disk: FAIL with no ``error`` of its own) and was not re-queued yet.
    A trial that failed by itself (diverged, raised) is not: it would fail again."""
    with file_lock(Path(run_dir) / ".requeue.lock"):  # two processes of one run re-queue a trial once
        trials = study.get_trials(deepcopy=False)
        retried = {t.user_attrs.get("retried_from") for t in trials} | {t.system_attrs.get("failed_trial")
                                                                         for t in trials}
        stopped = [t for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("error")
                   and t.number not in retried]
        for t in stopped:
            params = {**t.system_attrs.get("fixed_params", {}), **t.params}
            study.enqueue_trial(params, user_attrs={"retried_from": t.number}, skip_if_exists=False)
    if stopped:
        log.info("re-queued %d trial(s) stopped with their process: %s", len(stopped),
                 ", ".join(str(t.number) for t in stopped))
    return len(stopped)


def fail_and_requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """Mark a RUNNING trial FAIL and enqueue its params again (the same policy runs later).

    A trial killed while its policy was still being sampled (the Ray driver asks, then
    samples) holds only the params drawn so far: those, plus any it was enqueued with, are
    re-queued and the retry draws the rest.
    """
    params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
    study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    study.enqueue_trial(params, user_attrs={"retried_from": trial.number}, skip_if_exists=False)


def _recovered_state(rec: dict[str, Any]) -> tuple[dict[str, Any], TrialState, list[float] | None] | None:
    """(attributes, state, values) a trial file's finished result gives its trial; None if none."""
    reason, metrics = rec.get("reason"), rec.get("metrics") or {}
    attrs: dict[str, Any] = {"recovered_from_file": True}
    if reason == "over_budget":
        attrs["evaluated"] = False
        return attrs, TrialState.COMPLETE, [0.0, float(metrics["latency_ms"])]
    if reason not in ("trained", "stopped"):
        return None
    result = {"reason": reason, "val_metric": metrics.get("val_metric"), "steps": rec.get("steps"),
              "train_seconds": rec.get("train_seconds"), "rung_metric": rec.get("rung_metric") or {},
              "pruned_at": rec.get("pruned_at", rec.get("steps"))}
    if reason == "trained" and result["val_metric"] is None:
        return None
    attrs.update(result_attrs(result))
    if reason == "stopped":
        return attrs, TrialState.PRUNED, None
    return attrs, TrialState.COMPLETE, [float(result["val_metric"]), float(metrics["latency_ms"])]


def recover_from_trial_file(study: optuna.Study, trial: FrozenTrial, run_dir: Path) -> bool:
    """Tell the study a RUNNING ``trial``'s result from its ``trials/NNNN.json``, if that holds one.

    The file is written just before the study commits a trial; a kill in between leaves a
    finished result on disk and a RUNNING trial in the study. The file counts only if it
    is this trial's (same worker, same priced size: a folder reused with a new ``--storage``
    has files of other trials under the same numbers). Returns whether it recovered.
    """
    if not trial_path(run_dir, trial.number).is_file():
        return False
    try:
        rec = upgrade(read_trial_file(run_dir, trial.number), "trial")
    except CorruptFile as e:
        log.warning("%s: not used; trial %d runs again", e, trial.number)
        return False
    except UserError:  # a schema this version does not know
        return False
    ua, metrics = trial.user_attrs, rec.get("metrics") or {}
    if rec.get("number") != trial.number or rec.get("worker") != ua.get("worker") or \
            (ua.get("cost") or {}).get("size_bytes") != metrics.get("size_bytes"):
        return False
    recovered = _recovered_state(rec)
    if recovered is None:
        return False
    attrs, state, values = recovered
    for k, v in attrs.items():
        study._storage.set_trial_user_attr(trial._trial_id, k, v)
    study._storage.set_trial_state_values(trial._trial_id, state, values)
    log.info("trial %d: recovered its %s result from %s", trial.number, rec.get("reason"),
             f"trials/{trial.number:04d}.json")
    return True
