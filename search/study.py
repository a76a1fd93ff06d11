"""The Optuna study of a run: its storage, how it is opened, and what its trials say.

One study per run (``STUDY_NAME``), two objectives, named in the study (``study.metric_names``):
``val_metric`` (the validation metric, max) and ``latency_ms`` (on the target, min). A trial's
user attributes carry what squeezer adds, in the JSON vocabulary (:mod:`search.schema`):
``cost`` (the priced policy), ``constraints`` (relative violation by limit name), ``evaluated``
(trained and scored), ``val_metric``, ``rung_metric`` (metric at the rungs), ``pruned_at``,
``worker``/``driver`` (``host:pid``), ``seed_policy``, ``surplus``. Constraints are also in the
trial's system attribute ``constraints`` (a list, in the order of the study's user attribute
``constraint_names``): what the samplers, ``FrozenTrial.constraints`` and optuna-dashboard read.
The chosen trial is the study's user attribute ``chosen_trial`` and has a note (optuna-dashboard).

Example:
    >>> import optuna
    >>> s = optuna.create_study(directions=["maximize", "minimize"])
    >>> t = s.ask(); t.set_user_attr("evaluated", True); _ = s.tell(t, [0.9, 1.0])
    >>> [x.number for x in trained_trials(s)], [x.number for x in evaluated_trials(s)], trial_reason(s.trials[0])
    ([0], [0], 'trained')
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna import storages
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import event

from .config import SearchConfig
from .errors import UserError
from .runfolder import STUDY_DB, file_lock, storage_url
from .samplers import make_sampler
from .schema import RENAMED
from .space import SearchSpace

STUDY_NAME = "squeezer"
DIRECTIONS = ["maximize", "minimize"]


#: squeezer's reason for a trial, beside Optuna's state (:func:`trial_reason`).
REASONS = ("trained", "stopped", "over_budget", "surplus", "failed", "running", "queued")

#: optuna-dashboard's note format (``optuna_dashboard/_note.py``, the same from 0.8 to 0.21): a
#: version number and the Markdown body in study system attributes of at most 2045 characters.
NOTE_CHUNK = 2045


def tell_constraints(trial: Any, cons: dict[str, float]) -> None:
    """Record a trial's constraints where Optuna and optuna-dashboard read them.

    The system attribute ``constraints`` (a list) is what the samplers and
    ``FrozenTrial.constraints`` of every Optuna version read and what optuna-dashboard (0.21)
    shows; Optuna 5's per-name attributes (``Trial.set_constraint``) are not shown by the
    dashboard, and writing both would count each violation twice. The names are in the
    user attribute (and the study's ``constraint_names``).
    """
    trial.set_user_attr("constraints", dict(cons))
    trial.storage.set_trial_system_attr(trial._trial_id, "constraints", list(cons.values()))


def user_attr(t: Any, key: str, default: Any = None) -> Any:
    """A trial's user attribute ``key``, also under its version-1 name (runs of older versions)."""
    ua = t.user_attrs
    if key in ua:
        return ua[key]
    return next((ua[old] for old, new in RENAMED.items() if new == key and old in ua), default)


def trial_reason(t: Any) -> str:
    """squeezer's reason (:data:`REASONS`) for a trial in Optuna's state: ``trained`` (COMPLETE),
    ``over_budget`` (COMPLETE: rejected by the cost model, never trained, values ``[0, latency]``),
    ``stopped`` (PRUNED at a rung), ``surplus`` (PRUNED: not needed, the asked count was reached),
    ``failed`` (FAIL: by itself, with an ``error`` attribute saying why; or with its process,
    then re-queued), ``running``, ``queued`` (WAITING)."""
    ua, state = t.user_attrs, t.state.name
    if state == "COMPLETE":
        return "trained" if ua.get("evaluated") else "over_budget"
    if state == "PRUNED":
        return "stopped" if "pruned_at" in ua else "surplus"
    return {"FAIL": "failed", "RUNNING": "running", "WAITING": "queued"}.get(state, state.lower())


def trial_counts(trials: list[Any]) -> dict[str, int]:
    """How many trials were sampled, and how many ended for each reason."""
    reasons = [trial_reason(t) for t in trials]
    return {"sampled": len(reasons), **{r: reasons.count(r) for r in REASONS}}


def trial_workers(trials: list[Any]) -> dict[str, int]:
    """The workers (``host:pid``) that trained trials, with how many each: who really ran the run."""
    out: dict[str, int] = {}
    for t in trials:
        if trial_reason(t) in ("trained", "stopped") and t.user_attrs.get("worker"):
            out[t.user_attrs["worker"]] = out.get(t.user_attrs["worker"], 0) + 1
    return dict(sorted(out.items()))


def describe_study(study: optuna.Study, *, metric: str, target: str, budget: str, constraints: list[str]) -> None:
    """Name the objectives (``study.metric_names``) and say what the study is, for optuna-dashboard
    and ``optuna.load_study`` users (study user attributes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # set_metric_names is "experimental" in some Optuna versions
        study.set_metric_names([f"val_metric ({metric})", f"latency_ms ({target})"])
    for k, v in (("metric", metric), ("target", target), ("budget", budget), ("constraint_names", constraints)):
        study.set_user_attr(k, v)


def write_note(study: optuna.Study, body: str, trial: FrozenTrial | None = None) -> None:
    """Set the optuna-dashboard note (Markdown) of ``study`` or of one of its trials."""
    storage, sid = study._storage, study._study_id
    prefix = "dashboard" if trial is None else f"dashboard:{trial._trial_id}"
    attrs = storage.get_study_system_attrs(sid)
    storage.set_study_system_attr(sid, f"{prefix}:note_ver", int(attrs.get(f"{prefix}:note_ver", 0)) + 1)
    chunks = [body[i:i + NOTE_CHUNK] for i in range(0, len(body), NOTE_CHUNK)]
    before = sum(1 for k in attrs if k.startswith(f"{prefix}:note_str:"))
    for i in range(max(len(chunks), before)):  # a shorter note blanks the old note's tail
        storage.set_study_system_attr(sid, f"{prefix}:note_str:{i}", chunks[i] if i < len(chunks) else "")


def mark_chosen(study: optuna.Study, trial: FrozenTrial, study_note: str, trial_note: str) -> None:
    """Mark the chosen trial: the study's ``chosen_trial`` and notes on the study and the trial
    (a finished trial's own attributes cannot change in Optuna)."""
    before = study.user_attrs.get("chosen_trial")
    if before is not None and before != trial.number:  # more trials (resume) chose another one
        write_note(study, f"No longer chosen: squeezer chose trial {trial.number} after more trials.",
                   study.trials[before])
    study.set_user_attr("chosen_trial", trial.number)
    write_note(study, study_note)
    write_note(study, trial_note, trial)


def _retry_callback() -> dict[str, Any]:
    """Optuna's re-queue of trials whose heartbeat stopped (a worker on another machine died)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental" notices
        if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):
            return {"heartbeat_stale_trial_callback": storages.RetryHeartbeatStaleTrialCallback(max_retry=2)}
        return {"failed_trial_callback": storages.RetryFailedTrialCallback(max_retry=2)}


def _create(storage: Any, cfg: SearchConfig, space: SearchSpace | None) -> optuna.Study:
    return optuna.create_study(study_name=STUDY_NAME, storage=storage, sampler=make_sampler(cfg, space),
                               directions=DIRECTIONS, load_if_exists=True)


def check_storage(cfg: SearchConfig, run_dir: Path, *, resuming: bool) -> None:
    """The study's storage opens and reads (before any expensive work): a URL Optuna cannot open,
    or a run's study file that is not a database, is a one-line error saying what to do."""
    if not resuming and cfg.storage is None:
        return  # a new run's own SQLite file: created with the study, once the cheap checks passed
    url = storage_url(cfg, run_dir)
    db = Path(run_dir) / STUDY_DB
    if resuming and cfg.storage is None and db.is_file() and db.stat().st_size == 0:
        raise UserError(f"{db} is empty (truncated?): the study of this run is lost; restore it from a backup, or "
                        f"start a new run (each trial's result is also in {Path(run_dir) / 'trials'})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeat is "experimental" in Optuna's terms
            storage = storages.RDBStorage(url)
        storage.get_all_studies()
        storage.engine.dispose()
    except Exception as e:  # noqa: BLE001 - a bad URL, an unreachable server, a damaged file: one line
        advice = f"; restore {db.name} from a backup, or start a new run" if url.startswith("sqlite") and db.is_file() \
            else "; check --storage (any URL optuna.storages.RDBStorage accepts)"
        raise UserError(f"cannot open storage {url}: {_first_line(e)}{advice}") from None


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def open_study(cfg: SearchConfig, run_dir: Path, *, space: SearchSpace | None = None,
               storage: Any = None) -> optuna.Study:
    """The run's study, created on first use (``storage``: any Optuna storage object instead)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if storage is not None:
        return _create(storage, cfg, space)
    url = storage_url(cfg, run_dir)
    retry = _retry_callback()
    # Two processes creating the same database at once race on its schema (and on the study
    # row): serialise creation through a lock in the run folder, and retry what another
    # machine sharing a --storage URL may still win.
    last: Exception | None = None
    run_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(run_dir / ".storage.lock"):
        for attempt in range(5):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # heartbeat is "experimental" in Optuna's terms
                    rdb = storages.RDBStorage(
                        url, heartbeat_interval=15, grace_period=60, **retry,
                        engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {})
                if url.startswith("sqlite:///"):
                    sqlite_wal(rdb)
                return _create(rdb, cfg, space)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - bad URL / unreachable DB / a lost creation race
                last = e
                if "IntegrityError" not in type(e).__name__ + str(e) and "locked" not in str(e):
                    break
                time.sleep(0.5 * (attempt + 1))
    raise UserError(f"cannot open storage {url}: {str(last).splitlines()[0]}") from None


def sqlite_wal(storage: Any) -> None:
    """Put a SQLite study in WAL mode with ``synchronous=NORMAL`` (for this storage's connections).

    Optuna commits every ``suggest_*`` and attribute separately (~80 per trial here); in
    SQLite's default mode each commit waits for an fsync (~20 ms on this machine's disk,
    1.5 s per trial). In WAL mode with ``synchronous=NORMAL`` a commit is a write to the
    log, still atomic and durable against a killed process; only a power loss can roll back
    the last commits (SQLite's documented trade-off), and resume re-runs what that loses.
    Several processes of one host share the file as before (WAL needs a local disk, not NFS).
    """
    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    event.listen(storage.engine, "connect", on_connect)
    storage.engine.dispose()  # connections opened while creating the schema get the pragmas too


def evaluated_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Trials trained and scored to the end."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.user_attrs.get("evaluated")]


def trained_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Trials that trained: evaluated ones plus those stopped early at a rung (what ``--trials`` counts)."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if t.user_attrs.get("evaluated") or (t.state == TrialState.PRUNED and "pruned_at" in t.user_attrs):
            out.append(t)
    return out


def priced_latency(trial: FrozenTrial) -> float | None:
    """The target latency (ms) the cost model priced ``trial``'s policy at (None before pricing)."""
    return (trial.user_attrs.get("cost") or {}).get("latency_ms")


def is_shared_storage(study: optuna.Study) -> bool:
    """True unless the study is in a run-local SQLite file (which only this host's processes use)."""
    url = str(getattr(getattr(study._storage, "_backend", study._storage), "url", "") or "")
    return not url.startswith("sqlite")
