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

import errno
import fcntl
import hashlib
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
FINALISTS = "finalists.json"   # the finalists' fine-tunes (search/finalists.py)
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


class CorruptFile(UserError):
    """A run-folder file that is not what was written: truncated, not JSON, or its checksum fails."""


def _sha1(obj: dict[str, Any]) -> str:
    body = {k: v for k, v in obj.items() if k != "sha1"}
    return hashlib.sha1(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


#: Suffix of the file next to an exported artifact holding its latency measured on this machine
#: (written by ``squeezer export``, read by ``squeezer report``).
MEASURED_SUFFIX = ".latency.json"


def write_json(path: Path, obj: Any, *, checksum: bool = False) -> None:
    """Write ``obj`` as JSON, atomically: a kill or a full disk leaves the old file or the new
    one, never half of one. ``checksum``: add a ``sha1`` of the content (:func:`read_checked_json`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if checksum:
        obj = {**obj, "sha1": _sha1(obj)}
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror, str(path)) from None
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """The JSON in ``path``; a file that is not JSON is a one-line :class:`CorruptFile`."""
    try:
        return json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CorruptFile(f"{path} is corrupt (not JSON)") from None


def read_checked_json(path: Path) -> dict[str, Any]:
    """A JSON object written with ``checksum=True`` (without its ``sha1``): :class:`CorruptFile` if
    it is not JSON or its content no longer matches its ``sha1`` (files written before checksums
    have none: not checked)."""
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise CorruptFile(f"{path} is corrupt (not a JSON object)")
    if "sha1" in obj and obj["sha1"] != _sha1(obj):
        raise CorruptFile(f"{path} is corrupt (its content does not match its checksum)")
    return {k: v for k, v in obj.items() if k != "sha1"}


def display(path: Path, run_dir: Path) -> str:
    """``path`` relative to the run folder's parent (``runs/x/trials/0003.json``), as messages show it."""
    try:
        return str(Path(path).relative_to(Path(run_dir).parent))
    except ValueError:
        return str(path)


def disk_full_error(e: BaseException | None) -> BaseException | None:
    """The error in ``e`` or in what caused it that says the disk (or the quota) is full: an
    ``OSError`` of errno ENOSPC/EDQUOT, SQLite's "database or disk is full", torch's "file write
    failed" (Optuna can raise its own error while handling one: the chain is searched)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e)
        if (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or "database or disk is full" in text \
                or "No space left on device" in text or "file write failed" in text:
            return e
        e = e.__cause__ or e.__context__
    return None


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
