"""The Optuna study of a run: its storage, how it is opened, and what its trials say.

One study per run (``STUDY_NAME``), two objectives: validation metric (max) and target latency
in ms (min). A trial's user attributes carry what squeezer adds: ``cost`` (the priced policy),
``constraints`` (relative violations), ``evaluated`` (trained and scored), ``rung_acc``
(metric at the rungs), ``worker``/``driver`` (``host:pid``), ``seed_policy``.

Example:
    >>> import optuna
    >>> s = optuna.create_study(directions=["maximize", "minimize"])
    >>> t = s.ask(); t.set_user_attr("evaluated", True); _ = s.tell(t, [0.9, 1.0])
    >>> [x.number for x in trained_trials(s)], [x.number for x in evaluated_trials(s)]
    ([0], [0])
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
from .space import SearchSpace

STUDY_NAME = "squeezer"
DIRECTIONS = ["maximize", "minimize"]


def tell_constraints(trial: Any, cons: dict[str, float]) -> None:
    """Record constraints where the sampler reads them (Optuna >= 5: ``Trial.set_constraint``)."""
    trial.set_user_attr("constraints", list(cons.values()))
    if hasattr(trial, "set_constraint"):
        for k, v in cons.items():
            trial.set_constraint(k, v)


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
