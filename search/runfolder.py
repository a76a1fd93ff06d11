"""The run folder: where every file of a run lives, and how files are written there safely.

Layout (``runs/<name>/``)::

    config.yaml          the search's settings (resume reads them)
    study.db             the Optuna study (SQLite, unless --storage says otherwise)
    trials/NNNN.json     each trial's policy and metrics
    base/model.pt        the base model checkpoint; base/metrics.json its metrics
    sensitivity.json     the probes; narrowed.json the narrowed space
    best/                policy.json, model.pt, metrics.json of the chosen policy
    summary.json         what the last search printed

Concurrent processes of one run on one machine take turns through ``fcntl`` locks in the
folder (:func:`file_lock`); JSON files are replaced atomically (:func:`write_json`).

Example:
    >>> import tempfile
    >>> run = Path(tempfile.mkdtemp())
    >>> write_json(trial_path(run, 7), {"number": 7})
    >>> read_json(run / "trials" / "0007.json")
    {'number': 7}
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .config import SearchConfig
from .errors import UserError

CONFIG = "config.yaml"
STUDY_DB = "study.db"
BASE_MODEL = Path("base") / "model.pt"
BASE_METRICS = Path("base") / "metrics.json"
SENSITIVITY = "sensitivity.json"
NARROWED = "narrowed.json"
BEST = "best"
SUMMARY = "summary.json"
#: Settings a resumed or joined run may change (the rest must match ``config.yaml``).
CHANGEABLE = frozenset({"trials", "timeout", "storage", "threads", "backend", "workers", "address"})


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``fcntl`` lock (processes of one run on one machine take turns)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON, atomically: a kill leaves the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """The JSON in ``path``; a file that is not JSON is a one-line :class:`UserError`."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is corrupt (not JSON)") from None


def trial_path(run_dir: Path, number: int) -> Path:
    return Path(run_dir) / "trials" / f"{number:04d}.json"


def storage_url(cfg: SearchConfig, run_dir: Path) -> str:
    """The study's storage: ``--storage``, else the run's own SQLite file."""
    return cfg.storage or f"sqlite:///{(Path(run_dir) / STUDY_DB).resolve()}"


def new_run_dir(cfg: SearchConfig, root: Path = Path("runs")) -> Path:
    """``cfg.run``, else ``runs/<model>-<target>-<time>``."""
    if cfg.run:
        return Path(cfg.run)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    model = cfg.model.replace(":", "_").replace("/", "_")
    return root / f"{model}-{cfg.target.replace('/', '_').replace('.yaml', '')}-{stamp}"


def load_config(run_dir: Path) -> SearchConfig:
    """The settings of an existing run (one-line errors for a missing or unreadable folder)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    if not (run_dir / CONFIG).is_file():
        raise UserError(f"{run_dir} is not a squeezer run (no {CONFIG})")
    try:
        return SearchConfig.load(run_dir / CONFIG)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None


def claim_folder(cfg: SearchConfig, run_dir: Path) -> None:
    """Write ``config.yaml``, or check that the folder holds this same search (a second
    process joining it, or a rerun) -- settings outside :data:`CHANGEABLE` must match."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG
    if path.is_file():
        old = SearchConfig.load(path).to_dict()
        diff = {k for k, v in cfg.to_dict().items() if k not in CHANGEABLE and old.get(k) != v}
        if diff:
            raise UserError(f"run folder {run_dir} holds a different search ({', '.join(sorted(diff))} differ); "
                            f"use 'squeezer resume {run_dir}' or another --run")
    cfg.save(path)
