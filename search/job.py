"""The main job: base model -> policy search -> final fine-tune -> test -> export.

Everything a run computes lives in its folder (``runs/<name>/``), so any stage can be
resumed: the base model is cached, the study is in Optuna storage (SQLite by default), each
trial is also written to ``trials/NNNN.json``, and the final model to ``best/``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..compressors.apply import apply_policy_
from ..compressors.policy import DistillConfig, Policy
from ..compressors.sparsity import sparsity_step_hook
from ..evaluators.checkpoint import load_checkpoint, load_state_dict_into, save_checkpoint
from ..evaluators.datasets import DataSplits, load_dataset
from ..evaluators.models import build_model
from ..evaluators.train import evaluate, recalibrate_bn_, train

from .budget import format_bytes
from .config import SearchConfig, worker_id
from .errors import UserError
from .space import SearchSpace

log = logging.getLogger("squeezer")

STUDY_NAME = "squeezer"


# --- hardware model adapters ---------------------------------------------------------------

def resolve_target(name: str):
    from .. import hw_models

    try:
        return hw_models.get_target(name)
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise UserError(str(e).strip("'\"")) from None


def target_bits(target) -> tuple[tuple[int | None, ...], tuple[int | None, ...]]:
    """Weight and activation widths worth searching on ``target`` (what it can run)."""
    storage = set(getattr(target, "storage_bits", (4, 8, 32)))
    compute = set(getattr(target, "compute_bits", (8, 32)))
    wbits: list[int | None] = [b for b in (2, 4, 8) if b in storage]
    if 16 in storage and 16 in compute and not wbits:
        wbits.append(16)
    if 32 in storage or not wbits:
        wbits.append(None)
    abits: list[int | None] = [b for b in (4, 8) if b in compute]
    if 32 in compute or not abits:
        abits.append(None)
    return tuple(wbits), tuple(abits)


def target_sram(target) -> int | None:
    """On-chip SRAM that must hold the live activations (MCU-class targets), else ``None``."""
    cap = getattr(target, "capacity", {}) or {}
    return cap.get("sram_contiguous_bytes") or cap.get("sram_bytes")


def constraints_of(cost, cfg: SearchConfig, sram: int | None) -> list[float]:
    """Relative violations (``<= 0`` = satisfied), Optuna's constraint convention.

    Order: size, then peak memory (if the target has an SRAM), latency, energy (if limited).
    """
    return list(named_constraints(cost, cfg, sram).values())


def total_violation(cost, cfg: SearchConfig, sram: int | None) -> float:
    """The summed relative violations of the limits ``cost`` breaks (0: it meets them all)."""
    return sum(max(0.0, c) for c in constraints_of(cost, cfg, sram))


def named_constraints(cost, cfg: SearchConfig, sram: int | None) -> dict[str, float]:
    cons = {"size": cost.size_bytes / cfg.budget_bytes - 1.0}
    if sram:
        cons["peak_memory"] = cost.peak_memory_bytes / sram - 1.0
    if cfg.max_latency_ms:
        cons["latency"] = cost.latency_ms / cfg.max_latency_ms - 1.0
    if cfg.max_energy_mj:
        cons["energy"] = cost.energy_mj / cfg.max_energy_mj - 1.0
    return cons


def _tell_constraints(trial, cons: dict[str, float]) -> None:
    """Record constraints where the sampler reads them (Optuna >= 5: ``Trial.set_constraint``)."""
    trial.set_user_attr("constraints", list(cons.values()))
    if hasattr(trial, "set_constraint"):
        for k, v in cons.items():
            trial.set_constraint(k, v)


def cost_dict(cost) -> dict[str, float]:
    return {"size_bytes": int(cost.size_bytes), "latency_ms": float(cost.latency_ms),
            "energy_mj": float(cost.energy_mj), "peak_memory_bytes": int(cost.peak_memory_bytes),
            "macs": int(cost.macs)}


# --- the run ---------------------------------------------------------------------------------

@dataclass
class Context:
    """What every stage of a run shares (built once per process)."""

    cfg: SearchConfig
    run_dir: Path
    data: DataSplits
    base: nn.Module
    base_metrics: dict[str, Any]
    target: Any
    table: Any
    space: SearchSpace
    trial_train: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.data.input_shape

    def estimate(self, policy: Policy | None):
        """Totals only (no per-op rows): the search prices thousands of policies."""
        from .. import hw_models

        return hw_models.estimate_table(self.table, policy, self.target, layers=False)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def storage_url(cfg: SearchConfig, run_dir: Path) -> str:
    return cfg.storage or f"sqlite:///{(run_dir / 'study.db').resolve()}"


def _cache_root(run_dir: Path) -> Path:
    return run_dir.parent / ".cache"


def load_data(cfg: SearchConfig) -> DataSplits:
    try:
        return load_dataset(cfg.dataset, cfg.data_root, val_size=cfg.val_size, seed=cfg.seed)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    except ValueError as e:
        raise UserError(str(e)) from None


def build_base(cfg: SearchConfig, data: DataSplits, run_dir: Path, *, progress: bool = True) -> tuple[nn.Module, dict]:
    """The trained base model: ``--checkpoint``, else the cache, else train it once (from an
    initialisation ``cfg.seed`` fixes: one seed, one base)."""
    seed_everything(cfg.seed)
    try:
        model = build_model(cfg.model, in_channels=data.input_shape[0], num_classes=data.num_classes)
    except ValueError as e:
        raise UserError(str(e)) from None
    base_path = run_dir / "base" / "model.pt"
    if base_path.is_file():
        loaded = load_checkpoint(base_path)
        return loaded.model, loaded.meta
    meta: dict[str, Any]
    if cfg.checkpoint:
        from ..evaluators.checkpoint import CheckpointError

        try:
            load_state_dict_into(model, cfg.checkpoint)
        except CheckpointError as e:
            raise UserError(str(e)) from None
        meta = {"source": str(cfg.checkpoint)}
    else:
        key = f"{cfg.model.replace(':', '_').replace('/', '_')}-{cfg.dataset.replace(':', '_').replace('/', '_')}" \
              f"-s{cfg.seed}-e{cfg.base_epochs:g}-v{cfg.val_size}.pt"
        cache = _cache_root(run_dir) / key
        if cache.is_file():
            log.info("base model: cached %s", cache)
            loaded = load_checkpoint(cache)
            model, meta = loaded.model, loaded.meta
        else:
            log.info("base model: training %s on %s for %g epochs (cached for later runs)",
                     cfg.model, cfg.dataset, cfg.base_epochs)
            t0 = time.time()
            train(model, data.train, epochs=cfg.base_epochs, lr=cfg.base_lr, batch_size=cfg.batch_size,
                  seed=cfg.seed, augment=data.input_shape[1] >= 16, progress=progress, desc="base model")
            meta = {"source": "trained", "train_seconds": round(time.time() - t0, 1)}
            save_checkpoint(cache, model, model_name=cfg.model, input_shape=data.input_shape,
                            num_classes=data.num_classes, normalization={"mean": data.mean, "std": data.std},
                            meta=meta)
    model.eval()
    save_checkpoint(base_path, model, model_name=cfg.model, input_shape=data.input_shape,
                    num_classes=data.num_classes, normalization={"mean": data.mean, "std": data.std}, meta=meta)
    return model, meta


def prepare(cfg: SearchConfig, run_dir: Path, *, progress: bool = True) -> Context:
    """Data, base model, target, traced table and search space (everything before trials)."""
    from .. import hw_models

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    target = resolve_target(cfg.target)
    data = load_data(cfg)
    # The architecture alone fixes the table, the space and the smallest reachable size:
    # check the budget before spending minutes on the base model.
    try:
        arch = build_model(cfg.model, in_channels=data.input_shape[0], num_classes=data.num_classes)
    except ValueError as e:
        raise UserError(str(e)) from None
    try:
        with torch.no_grad():
            arch.eval()(torch.zeros(1, *data.input_shape))
    except RuntimeError as e:
        raise UserError(f"model {cfg.model} cannot run on {cfg.dataset}'s {'x'.join(map(str, data.input_shape))} "
                        f"inputs: {str(e).splitlines()[0]}") from None
    table = hw_models.trace(arch, data.input_shape)
    wbits, abits = target_bits(target)
    space = SearchSpace.build(arch, data.input_shape, weight_bits=wbits, act_bits=abits, distill=cfg.distill,
                              criterion=cfg.criterion, quantizer=cfg.quantizer,
                              prune_choices=cfg.prune_ratio_choices)
    smallest = hw_models.estimate_table(table, space.smallest_policy(), target)
    if smallest.size_bytes > cfg.budget_bytes:
        raise UserError(f"budget {cfg.budget} ({cfg.budget_bytes:,} bytes) is below the smallest size "
                        f"{cfg.model} can reach on {cfg.target}: {int(smallest.size_bytes):,} bytes "
                        f"({format_bytes(smallest.size_bytes)}); raise --budget or pick a smaller --model")
    from .sensitivity import file_lock

    with file_lock(run_dir / ".base.lock"):  # concurrent processes of one run train it once
        base, meta = build_base(cfg, data, run_dir, progress=progress)
    base_cost = hw_models.estimate_table(table, None, target)
    metrics_path = run_dir / "base" / "metrics.json"
    if metrics_path.is_file():
        base_metrics = json.loads(metrics_path.read_text())
    else:
        base_metrics = {**cost_dict(base_cost), "val_accuracy": evaluate(base, data.val),
                        "test_accuracy": evaluate(base, data.test), "model": cfg.model, "dataset": cfg.dataset,
                        "target": cfg.target, **{k: v for k, v in meta.items() if k != "normalization"}}
        metrics_path.write_text(json.dumps(base_metrics, indent=2) + "\n")
    ctx = Context(cfg, run_dir, data, base, base_metrics, target, table, space)
    ctx.trial_train = data.train.subset(cfg.trial_train_size, seed=cfg.seed)
    ctx.extra["smallest_size_bytes"] = int(smallest.size_bytes)
    return ctx


# --- the study -------------------------------------------------------------------------------

def _constraints(trial) -> list[float]:
    return list(trial.user_attrs.get("constraints", [0.0]))


def _new_constraint_api() -> bool:
    import optuna

    return hasattr(optuna.trial.Trial, "set_constraint")


def make_sampler(cfg: SearchConfig, *, n_startup: int = 4, space: SearchSpace | None = None):
    import warnings

    import optuna

    name = cfg.sampler
    # Optuna >= 5 reads constraints set on the trial; older versions need constraints_func.
    cf = {} if _new_constraint_api() else {"constraints_func": _constraints}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # experimental-feature notices for `group`
        if name == "tpe":
            return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=n_startup, multivariate=True,
                                              group=True, **cf)
        if name == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=cfg.seed, population_size=8, **cf)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    if name == "grid":
        from .samplers import UniformGridSampler
        from .space import PRUNE_CHOICES

        return UniformGridSampler(prune_choices=space.prune_choices if space else PRUNE_CHOICES,
                                  weight_bits=space.weight_bits if space else (2, 4, 8),
                                  act_bits=space.act_bits if space else (8,), seed=cfg.seed)
    from ..compressors.registry import did_you_mean

    raise UserError(did_you_mean(name, ["tpe", "nsga2", "random", "grid"], "sampler"))


def open_study(cfg: SearchConfig, run_dir: Path, *, create: bool, space: SearchSpace | None = None,
               storage=None):
    import warnings

    import optuna
    from optuna import storages

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage_url(cfg, run_dir)
    if storage is not None:  # a storage object the caller built (any Optuna BaseStorage)
        return optuna.create_study(study_name=STUDY_NAME, storage=storage, sampler=make_sampler(cfg, space=space),
                                   directions=["maximize", "minimize"], load_if_exists=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "experimental" notices
        if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):
            retry = {"heartbeat_stale_trial_callback": storages.RetryHeartbeatStaleTrialCallback(max_retry=2)}
        else:
            retry = {"failed_trial_callback": storages.RetryFailedTrialCallback(max_retry=2)}
    from .sensitivity import file_lock

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
                    storage = storages.RDBStorage(
                        url, heartbeat_interval=15, grace_period=60, **retry,
                        engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {})
                if url.startswith("sqlite:///"):
                    sqlite_wal(storage)
                return optuna.create_study(study_name=STUDY_NAME, storage=storage,
                                           sampler=make_sampler(cfg, space=space),
                                           directions=["maximize", "minimize"], load_if_exists=True)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - bad URL / unreachable DB / a lost creation race
                last = e
                if "IntegrityError" not in type(e).__name__ + str(e) and "locked" not in str(e):
                    break
                time.sleep(0.5 * (attempt + 1))
    raise UserError(f"cannot open storage {url}: {str(last).splitlines()[0]}") from None


def sqlite_wal(storage) -> None:
    """Put a SQLite study in WAL mode with ``synchronous=NORMAL`` (for this storage's connections).

    Optuna commits every ``suggest_*`` and attribute separately (~80 per trial here); in
    SQLite's default mode each commit waits for an fsync (~20 ms on this machine's disk,
    1.5 s per trial). In WAL mode with ``synchronous=NORMAL`` a commit is a write to the
    log, still atomic and durable against a killed process; only a power loss can roll back
    the last commits (SQLite's documented trade-off), and resume re-runs what that loses.
    Several processes of one host share the file as before (WAL needs a local disk, not NFS).
    """
    from sqlalchemy import event

    def on_connect(dbapi_conn, _record) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    event.listen(storage.engine, "connect", on_connect)
    storage.engine.dispose()  # connections opened while creating the schema get the pragmas too


def evaluated_trials(study) -> list:
    import optuna

    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if t.user_attrs.get("evaluated")]


def trained_trials(study) -> list:
    """Trials that trained: evaluated ones plus those stopped early at a rung (what ``--trials`` counts)."""
    import optuna

    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)):
        if t.user_attrs.get("evaluated") or (t.state == optuna.trial.TrialState.PRUNED and "pruned_at" in t.user_attrs):
            out.append(t)
    return out


_WORKER_LOCK: dict[str, Any] = {}


def hold_worker_lock(run_dir: Path) -> None:
    """Hold ``RUN/.workers/<host>-<pid>.lock`` while this process runs trials (others see it is alive)."""
    import fcntl

    path = Path(run_dir) / ".workers" / f"{socket.gethostname()}-{os.getpid()}.lock"
    if str(path) in _WORKER_LOCK:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    fcntl.flock(fh, fcntl.LOCK_EX)
    _WORKER_LOCK[str(path)] = fh


def other_live_workers(run_dir: Path) -> int:
    """Processes on this host, other than this one, that hold a worker lock of ``run_dir``."""
    import fcntl

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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_dead_trials(study, run_dir: Path | None = None, *, dead_workers: set[str] | None = None) -> int:
    """Fail RUNNING trials whose worker process on this host is gone, and re-queue them.

    A trial whose ``trials/NNNN.json`` already holds its finished result (the process died
    after writing it, before the study committed the trial) is instead told to the study
    from the file (:func:`recover_from_trial_file`): nothing computed is trained again.

    A trial killed between its creation and its first attribute has no ``worker``: it is
    reaped when no other worker of the run is alive on this host (the run's own SQLite
    storage) or when it is older than 10 minutes. ``dead_workers`` (``host:pid``) are
    workers known dead elsewhere (the Ray backend's lost actors). A trial whose ``driver``
    (the Ray backend's driver process, which asked for it) is dead on this host is reaped
    too. Trials of other hosts are otherwise left to Optuna's heartbeat.
    Returns the number of trials re-queued or recovered.
    """
    import datetime

    import optuna

    host = socket.gethostname()
    n = 0
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    alone = None

    def dead_here(ident: str) -> bool:
        h, _, pid = ident.rpartition(":")
        return h == host and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid))

    for t in running:
        w, d = t.user_attrs.get("worker", ""), t.user_attrs.get("driver", "")
        orphan = False
        if not w and not d and run_dir is not None:
            if alone is None:
                alone = other_live_workers(run_dir) == 0
            age = (datetime.datetime.now() - t.datetime_start).total_seconds() if t.datetime_start else 0.0
            orphan = (alone and not _shared_storage(study)) or age > 600
        if orphan or (dead_workers and w in dead_workers) or dead_here(w) or dead_here(d):
            n += 1
            if run_dir is not None and recover_from_trial_file(study, t, run_dir):
                continue
            fail_and_requeue(study, t)
    return n


def fail_and_requeue(study, trial) -> None:
    """Mark a RUNNING trial FAIL and enqueue its params again (the same policy runs later).

    A trial killed while its policy was still being sampled (the Ray driver asks, then
    samples) holds only the params drawn so far: those, plus any it was enqueued with, are
    re-queued and the retry draws the rest.
    """
    import optuna

    params = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
    study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
    study.enqueue_trial(params, user_attrs={"retried_from": trial.number}, skip_if_exists=False)


def recover_from_trial_file(study, trial, run_dir: Path) -> bool:
    """Tell the study a RUNNING ``trial``'s result from its ``trials/NNNN.json``, if that holds one.

    The file is written just before the study commits a trial; a kill in between leaves a
    finished result on disk and a RUNNING trial in the study. The file counts only if it
    is this trial's (same worker, same priced size: a folder reused with a new ``--storage``
    has files of other trials under the same numbers). Returns whether it recovered.
    """
    import optuna

    try:
        rec = json.loads((Path(run_dir) / "trials" / f"{trial.number:04d}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    ua, metrics = trial.user_attrs, rec.get("metrics") or {}
    if rec.get("number") != trial.number or rec.get("worker") != ua.get("worker") or \
            (ua.get("cost") or {}).get("size_bytes") != metrics.get("size_bytes"):
        return False
    status = rec.get("status")
    attrs: dict[str, Any] = {"recovered_from_file": True}
    if status == "over_budget":
        attrs["evaluated"] = False
        state, values = optuna.trial.TrialState.COMPLETE, [0.0, float(metrics["latency_ms"])]
    elif status in ("evaluated", "pruned"):
        result = {"status": status, "val_accuracy": metrics.get("val_accuracy"), "steps": rec.get("steps"),
                  "train_seconds": rec.get("train_seconds"), "rung_accuracy": rec.get("rung_accuracy") or {},
                  "pruned_at": rec.get("pruned_at", rec.get("steps"))}
        if status == "evaluated" and result["val_accuracy"] is None:
            return False
        attrs.update(result_attrs(result))
        state = optuna.trial.TrialState.COMPLETE if status == "evaluated" else optuna.trial.TrialState.PRUNED
        values = [float(result["val_accuracy"]), float(metrics["latency_ms"])] if status == "evaluated" else None
    else:
        return False
    for k, v in attrs.items():
        study._storage.set_trial_user_attr(trial._trial_id, k, v)
    study._storage.set_trial_state_values(trial._trial_id, state, values)
    log.info("trial %d: recovered its %s result from %s", trial.number, status, f"trials/{trial.number:04d}.json")
    return True


def _shared_storage(study) -> bool:
    """True unless the study is in a run-local SQLite file (which only this host's processes use)."""
    url = str(getattr(getattr(study._storage, "_backend", study._storage), "url", "") or "")
    return not url.startswith("sqlite")


def narrow(ctx: Context, sens: dict[str, Any], threshold_pp: float | None = None,
           ) -> tuple[dict[str, list], list[tuple[str, Any, float]]]:
    """The search space's narrowed choices: drop those the probes say lose more than
    ``threshold_pp`` (the run's by default) alone, then give back the least damaging of them
    that the run's budget and limits need (:func:`search.sensitivity.relax_narrowing`).
    Returns ``(narrowed, readmitted)``."""
    from .sensitivity import narrowed_choices, relax_narrowing, space_choices

    thr = ctx.cfg.sensitivity_threshold_pp if threshold_pp is None else threshold_pp
    narrowed = narrowed_choices(sens, space_choices(ctx.space), threshold_pp=thr)
    sram = target_sram(ctx.target)

    def violation(params):
        return total_violation(ctx.estimate(ctx.space.trial_policy(params)), ctx.cfg, sram)

    return relax_narrowing(ctx.space, sens, narrowed, violation)


def run_narrowing(ctx: Context, sens: dict[str, Any]) -> tuple[dict[str, list], list[tuple[str, Any, float]]]:
    """:func:`narrow` at the run's threshold, computed once per run and kept in
    ``RUN/narrowed.json``: Optuna needs a parameter's choices to stay the same, and the give-back
    depends on the cost model, which a later version or a calibration may change."""
    from .sensitivity import file_lock

    path = Path(ctx.run_dir) / "narrowed.json"
    key = {"threshold_pp": ctx.cfg.sensitivity_threshold_pp,
           "probes_sha1": hashlib.sha1(json.dumps(sens.get("probes"), sort_keys=True).encode()).hexdigest()}
    with file_lock(Path(ctx.run_dir) / ".sensitivity.lock"):
        saved = json.loads(path.read_text()) if path.is_file() else {}
        if all(saved.get(k) == v for k, v in key.items()):
            return saved["narrowed"], [tuple(r) for r in saved["readmitted"]]
        # First time, or the probes were measured again (`squeezer sensitivity --force`).
        narrowed, readmitted = narrow(ctx, sens)
        _write_json(path, {**key, "narrowed": narrowed, "readmitted": readmitted})
        return narrowed, readmitted


def sensitivity_first(ctx: Context, *, progress: bool = True) -> None:
    """Measure (or load) per-layer sensitivity and narrow the space (``cfg.sensitivity``).

    Only the model-based samplers (``tpe``, ``nsga2``) use it: ``random`` and ``grid`` are
    the baselines and search the full space.
    """
    if not ctx.cfg.sensitivity or ctx.cfg.sampler not in ("tpe", "nsga2"):
        return
    from .sensitivity import load_or_measure, space_choices

    sens = load_or_measure(ctx, progress=progress)
    ctx.extra["sensitivity"] = sens
    full = space_choices(ctx.space)
    narrowed, readmitted = run_narrowing(ctx, sens)
    ctx.extra["narrowed"], ctx.extra["readmitted"] = narrowed, readmitted
    if narrowed:
        dropped = sum(len(full[d]) - len(v) for d, v in narrowed.items())
        log.info("sensitivity: dropped %d choice(s) losing > %g pp alone, in %d dimension(s)",
                 dropped, ctx.cfg.sensitivity_threshold_pp, len(narrowed))
    if readmitted:
        log.info("sensitivity: gave back %d dropped choice(s) (probes: up to %.0f pp lost alone, before "
                 "fine-tuning) so that the narrowed space can still meet the constraints",
                 len(readmitted), max(loss for _, _, loss in readmitted))


def enqueue_seeds(ctx: Context, study) -> list[Policy]:
    """Uniform policies that meet the budget (strong, cheap starting points), plus
    sensitivity-guided ones when sensitivity was measured (``sensitivity_first``)."""
    if ctx.cfg.sampler not in ("tpe", "nsga2"):
        return []  # the baselines start from nothing
    from .sensitivity import backed_off_params, filled_params, guided_params, project_params

    narrowed = ctx.extra.get("narrowed") or {}
    sp, seeds = ctx.space, []
    sram = target_sram(ctx.target)
    abits = 8 if 8 in sp.act_bits else sp.act_bits[-1]
    uniform = []
    for bits in sorted((b for b in sp.weight_bits if b is not None), reverse=True):
        for p in sp.prune_choices:
            # Priced as the trial will run it: projected into the narrowed space.
            params = sp.canonical_params(project_params(
                sp.params_for(sp.uniform_policy(prune_ratio=p, weight_bits=bits, act_bits=abits)), narrowed))
            pol = sp.policy_from_params(params)
            if max(constraints_of(ctx.estimate(pol), ctx.cfg, sram)) <= 0:
                seeds.append(pol)
                uniform.append(params)
                break
        if len(seeds) >= 2:
            break
    for params in uniform:
        study.enqueue_trial(params, user_attrs={"seed_policy": "uniform"})
    sens = ctx.extra.get("sensitivity")
    if not sens:
        return seeds

    def add(params, kind):
        params = sp.canonical_params(params)
        pol = sp.policy_from_params(params)
        if pol not in seeds:
            seeds.append(pol)
            study.enqueue_trial(params, user_attrs={"seed_policy": kind})

    # What the greedy steps reduce: bytes under a size budget alone; with a latency, energy or
    # SRAM limit too, the summed relative violation (bytes alone can run out of steps, e.g.
    # at a latency limit that only pruning meets).
    multi = bool(ctx.cfg.max_latency_ms or ctx.cfg.max_energy_mj or sram)

    def fill(params):
        """Under a latency/energy/SRAM limit, spend what a seed leaves of the limits (the grid's
        0.25 steps can leave a uniform seed far inside a latency limit)."""
        if not multi:
            return params
        return filled_params(sp, sens, params, lambda pol: -max(constraints_of(ctx.estimate(pol), ctx.cfg, sram)),
                             narrowed=narrowed)

    for params in uniform:
        add(fill(params), "uniform-filled")

    def fits(pol):
        v = total_violation(cost := ctx.estimate(pol), ctx.cfg, sram)
        return v <= 0, (v if multi else float(cost.size_bytes))

    log.info("seeds: sensitivity-guided policies that meet the budget%s (cost model only, no training)",
             ", then latency cuts" if ctx.cfg.latency_seed_fractions else "")
    # 8-bit activations first; under a latency/energy/SRAM limit, float ones where that cannot
    # meet it (at tiny, heavily pruned layers the (de)quantize ops can cost more than int8
    # kernels save).
    act8 = 8 if 8 in sp.act_bits else None
    acts = (act8, None) if multi and act8 is not None else (act8,)
    guided = []
    for per_byte in (True, False):
        for act in acts:
            params = guided_params(sp, sens, fits, narrowed=narrowed, per_byte=per_byte, act_bits=act)
            if params is not None:
                guided.append(params := fill(params))
                add(params, "sensitivity")
                break
    if not guided:  # limits the forward greedy cannot reach: back off from the extreme instead
        params = backed_off_params(sp, sens, fits, narrowed=narrowed)
        if params is not None:
            guided.append(params)
            add(params, "sensitivity")
    if guided:
        for params in latency_seeds(ctx, sens, guided[0], narrowed, seeds):
            add(params, "sensitivity-latency")
    return seeds


def latency_seeds(ctx: Context, sens: dict[str, Any], start: dict[str, Any], narrowed: dict[str, list],
                  seeds: list[Policy] = ()) -> list[dict[str, Any]]:
    """From the sensitivity-guided policy that meets the budget, go on cutting latency on the
    target: the least accuracy loss per millisecond saved, one step at a time, until the
    latency is ``cfg.latency_seeds`` times the reference (each fraction one seed; all within
    budget). The reference is the fastest of ``start`` and the other ``seeds`` the probes
    predict to lose at most 1 point more than ``start`` (e.g. uniform int8 where the budget
    lets the guided seed keep fp32 layers).

    The budget alone says nothing about speed: where it barely binds, these seeds put trials
    on the fast end of the front, so the tolerance rule can pick a faster policy that loses
    little accuracy.
    """
    from .sensitivity import guided_params, predicted_loss, project_params

    fractions = ctx.cfg.latency_seed_fractions
    if not fractions:
        return []
    sp, sram = ctx.space, target_sram(ctx.target)
    limit = predicted_loss(sens, start) + 1.0
    ref = float(ctx.estimate(sp.trial_policy(start)).latency_ms)
    for pol in seeds:
        if predicted_loss(sens, project_params(sp.params_for(pol), narrowed)) <= limit:
            ref = min(ref, float(ctx.estimate(pol).latency_ms))
    out = []
    for frac in fractions:
        def fits(pol, goal=frac * ref):
            cost = ctx.estimate(pol)
            lat = float(cost.latency_ms)
            return max(constraints_of(cost, ctx.cfg, sram)) <= 0 and lat <= goal, lat

        params = guided_params(sp, sens, fits, narrowed=narrowed, start=start, act_steps=True,
                               act_bits=8 if 8 in sp.act_bits else None)
        if params is not None:
            out.append(params)
            start = params  # the next (smaller) fraction goes on from here
    return out


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def sample_trial(ctx: Context, trial) -> tuple[Policy, Any, dict[str, float]]:
    """Ask ``trial`` for a policy (narrowed by sensitivity) and price it on the target.

    Records the cost and the constraints on the trial (what the sampler learns from).
    """
    from .sensitivity import NarrowedTrial

    narrowed = ctx.extra.get("narrowed") or {}
    policy = ctx.space.sample(NarrowedTrial(trial, narrowed) if narrowed else trial)
    cost = ctx.estimate(policy)
    named = named_constraints(cost, ctx.cfg, target_sram(ctx.target))
    _tell_constraints(trial, named)
    trial.set_user_attr("cost", cost_dict(cost))
    return policy, cost, named


class _StopAtRung(Exception):
    pass


def train_trial(ctx: Context, number: int, policy: Policy, *, on_rung=None, bar=None) -> dict[str, Any]:
    """Trial work: apply ``policy`` to a copy of the base model, short fine-tune, validation accuracy.

    ``on_rung(step, acc, rung_acc) -> bool`` is called at each rung step; True stops the
    trial there (multi-fidelity). Returns ``status`` ("evaluated" | "pruned"),
    ``val_accuracy`` (None when stopped), ``rung_accuracy``, ``steps``, ``train_seconds``
    (the time of all of the above: what "trial work" means in the scaling numbers).
    """
    cfg = ctx.cfg
    t0 = time.time()
    seed_everything(cfg.seed + number)
    model = copy.deepcopy(ctx.base)
    batches = ctx.trial_train.first_batches(8, cfg.batch_size, seed=number)
    apply_policy_(model, policy, ctx.input_shape, data=batches)
    rungs = set(cfg.rung_steps)
    steps_done = 0
    rung_acc: dict[str, float] = {}

    def on_step(step: int, total: int, loss: float) -> None:
        nonlocal steps_done
        steps_done = step
        if bar is not None:
            bar.set_postfix_str(f"trial {number}: step {step}/{total} loss {loss:.3f}")
        if step in rungs and step < total and on_rung is not None:
            if "rung_val" not in ctx.extra:
                ctx.extra["rung_val"] = ctx.data.val.subset(min(cfg.rung_val_size, len(ctx.data.val)), seed=cfg.seed)
            rung_acc[str(step)] = evaluate(model, ctx.extra["rung_val"])
            if on_rung(step, rung_acc[str(step)], dict(rung_acc)):
                raise _StopAtRung

    distill = policy.distill if cfg.distill else None
    out: dict[str, Any] = {"status": "evaluated", "val_accuracy": None}
    try:
        train(model, ctx.trial_train, max_steps=cfg.trial_steps, epochs=10, lr=cfg.trial_lr,
              batch_size=cfg.batch_size, teacher=ctx.base if distill else None, distill=distill,
              seed=cfg.seed + number, progress=on_step, step_hook=sparsity_step_hook(model))
    except _StopAtRung:
        out.update(status="pruned", pruned_at=steps_done)
    else:
        out["val_accuracy"] = evaluate(model, ctx.data.val)
    return {**out, "rung_accuracy": rung_acc, "steps": steps_done, "train_seconds": round(time.time() - t0, 3)}


def trial_record(number: int, worker: str | None, policy: Policy, cost, cons: list[float],
                 result: dict[str, Any] | None) -> dict[str, Any]:
    """The ``trials/NNNN.json`` record (``result`` from :func:`train_trial`; None = over budget)."""
    rec: dict[str, Any] = {"number": number, "worker": worker, "policy": policy.to_dict(),
                           "metrics": cost_dict(cost), "constraints": cons}
    if result is None:
        return {**rec, "status": "over_budget"}
    if result["val_accuracy"] is not None:
        rec["metrics"] = {**rec["metrics"], "val_accuracy": result["val_accuracy"]}
    rec.update(status=result["status"], rung_accuracy=result["rung_accuracy"], steps=result["steps"],
               train_seconds=result["train_seconds"])
    if "pruned_at" in result:
        rec["pruned_at"] = result["pruned_at"]
    return rec


def result_attrs(result: dict[str, Any]) -> dict[str, Any]:
    """User attributes a finished trial carries (from :func:`train_trial`'s result)."""
    attrs: dict[str, Any] = {"train_seconds": result["train_seconds"], "steps": result["steps"]}
    if result["rung_accuracy"]:
        attrs["rung_acc"] = dict(result["rung_accuracy"])
    if result["status"] == "pruned":
        attrs["pruned_at"] = result["pruned_at"]
    else:
        attrs.update(evaluated=True, val_accuracy=result["val_accuracy"])
    return attrs


def write_trial_file(run_dir: Path, rec: dict[str, Any]) -> None:
    _write_json(Path(run_dir) / "trials" / f"{rec['number']:04d}.json", rec)


def make_objective(ctx: Context, *, bar=None):
    import optuna

    cfg = ctx.cfg

    def objective(trial: optuna.Trial):
        trial.set_user_attr("worker", worker_id())
        policy, cost, named = sample_trial(ctx, trial)
        cons = list(named.values())
        if max(cons) > 0:
            # Over budget: rejected by the cost model, no training (the sampler learns from it).
            trial.set_user_attr("evaluated", False)
            write_trial_file(ctx.run_dir, trial_record(trial.number, worker_id(), policy, cost, cons, None))
            return 0.0, float(cost.latency_ms)
        if not _claim(ctx, trial):
            # Enough trials trained or in training elsewhere (concurrent workers): not counted.
            trial.set_user_attr("surplus", True)
            trial.study.stop()
            raise optuna.TrialPruned("the asked number of trials is reached")

        def on_rung(step: int, acc: float, rung_acc: dict[str, float]) -> bool:
            # Published at once: concurrent workers compare against it at their rungs.
            trial.set_user_attr("rung_acc", rung_acc)
            return should_stop_at_rung(trial.study, trial.number, step, acc, cfg,
                                       float(cost.latency_ms) if cfg.rung_latency_class else None)

        result = train_trial(ctx, trial.number, policy, on_rung=on_rung, bar=bar)
        # The file first: if the process dies before Optuna commits the trial, resume
        # recovers the result from it (recover_from_trial_file) instead of training again.
        write_trial_file(ctx.run_dir, trial_record(trial.number, worker_id(), policy, cost, cons, result))
        for k, v in result_attrs(result).items():
            trial.set_user_attr(k, v)
        if result["status"] == "pruned":
            raise optuna.TrialPruned(f"validation accuracy {result['rung_accuracy'][str(result['pruned_at'])]:.4f} "
                                     f"at step {result['pruned_at']} is below the best 1/{cfg.prune_eta} of its rung "
                                     "(among trials at least as fast)")
        return result["val_accuracy"], float(cost.latency_ms)

    return objective


#: Peers up to this much slower still count as "as fast" at a rung (cost-model resolution:
#: e.g. 4- and 8-bit weights both compute at int8 on ARM and differ only in bytes read).
RUNG_LATENCY_SLACK = 0.05


def should_stop_at_rung(study, number: int, step: int, acc: float, cfg: SearchConfig,
                        latency_ms: float | None = None) -> bool:
    """Asynchronous successive halving on accuracy within a latency class: stop unless ``acc``
    is in the best ``1/prune_eta`` of the accuracies reported at this ``step`` by the trials at
    least as fast as this one (``latency_ms`` on the target, within ``RUNG_LATENCY_SLACK``; all
    trials when None). Decided only once ``rung_min_trials`` such trials reached the rung, so
    the first ones, and the fastest, go on: a fast policy that learns slower is not stopped by slower, more accurate ones.
    (``rung_latency_class: false`` in a config gives plain successive halving.)"""
    peers = [(t.user_attrs["rung_acc"][str(step)], priced_latency(t)) for t in study.get_trials(deepcopy=False)
             if t.number != number and str(step) in (t.user_attrs.get("rung_acc") or {})]
    return rung_says_stop(peers, acc, cfg, latency_ms)


def priced_latency(trial) -> float | None:
    """The target latency (ms) the cost model priced ``trial``'s policy at (None before pricing)."""
    return (trial.user_attrs.get("cost") or {}).get("latency_ms")


def rung_says_stop(peers: list[tuple[float, float | None]], acc: float, cfg: SearchConfig,
                   latency_ms: float | None = None) -> bool:
    """The rung rule of :func:`should_stop_at_rung` given the other trials' ``(accuracy,
    latency_ms)`` there."""
    peers = [a for a, lat in peers if latency_ms is None or lat is None or lat <= latency_ms * (1 + RUNG_LATENCY_SLACK)]
    vals = sorted(list(peers) + [acc], reverse=True)
    if len(vals) < cfg.rung_min_trials:
        return False
    k = max(1, len(vals) // cfg.prune_eta)
    return acc < vals[k - 1]


def try_claim(ctx: Context, study, trial_number: int) -> bool | None:
    """One claim attempt under the run's lock: True = ``trial_number`` may train (the caller
    marks it ``training``), False = enough trials trained, None = the last places are held by
    trials in training elsewhere (wait and retry)."""
    import optuna

    trained = len(trained_trials(study))
    if trained >= ctx.cfg.trials:
        return False
    busy = [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
            if t.user_attrs.get("training") and t.number != trial_number]
    return True if trained + len(busy) < ctx.cfg.trials else None


def _claim(ctx: Context, trial) -> bool:
    """Whether this trial should train: trained + in-training trials stay <= ``cfg.trials``.

    Concurrent workers of one run take turns under a file lock; a worker whose peers hold the
    last places waits for them (a peer that dies is reaped and its place freed).
    """
    from .sensitivity import file_lock

    while True:
        with file_lock(ctx.run_dir / ".claim.lock"):
            ok = try_claim(ctx, trial.study, trial.number)
            if ok:
                trial.set_user_attr("training", True)
            if ok is not None:
                return ok
        reap_dead_trials(trial.study, ctx.run_dir)
        time.sleep(1.0)


def run_trials(ctx: Context, study, *, progress: bool = True) -> None:
    """Run trials until ``cfg.trials`` trained trials exist in the study (over-budget ones are free)."""
    import optuna
    from tqdm.auto import tqdm

    cfg = ctx.cfg
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    hold_worker_lock(ctx.run_dir)
    reaped = reap_dead_trials(study, ctx.run_dir)
    if reaped:
        log.info("re-queued or recovered %d trial(s) whose worker died", reaped)
    done = len(trained_trials(study))
    exhausted = getattr(study.sampler, "exhausted", None)
    if done >= cfg.trials or (exhausted is not None and exhausted(study)):
        return
    bar = tqdm(total=cfg.trials, initial=done, desc="search", unit="trial", dynamic_ncols=True,
               disable=not progress)
    max_total = len(study.trials) + 40 * cfg.trials + 200  # guard against a space that is all over budget
    deadline = None if cfg.timeout is None else time.time() + cfg.timeout

    def stop_when_done(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        n = len(trained_trials(study))
        bar.n = min(n, cfg.trials)
        best = [t.values[0] for t in evaluated_trials(study)]
        if best:
            bar.set_postfix_str(f"best val acc {max(best):.4f}")
        bar.refresh()
        if n >= cfg.trials or len(study.trials) >= max_total or (exhausted is not None and exhausted(study)):
            study.stop()

    try:
        study.optimize(make_objective(ctx, bar=bar), n_trials=None,
                       timeout=None if deadline is None else max(1.0, deadline - time.time()),
                       callbacks=[stop_when_done], gc_after_trial=False, catch=())
    finally:
        bar.close()
    if len(evaluated_trials(study)) == 0:
        log.warning("no candidate within the budget was found in %d samples", len(study.trials))


# --- choosing and finishing -------------------------------------------------------------------

def pareto_front(trials: list) -> list:
    """Non-dominated evaluated feasible trials (max accuracy, min latency)."""
    pts = [t for t in trials if t.user_attrs.get("evaluated") and max(t.user_attrs.get("constraints", [0])) <= 0]
    front = []
    for t in pts:
        a, l = t.values
        dominated = any((u.values[0] >= a and u.values[1] <= l) and (u.values[0] > a or u.values[1] < l) for u in pts)
        if not dominated:
            front.append(t)
    return sorted(front, key=lambda t: t.values[1])


def choose_best(study, tolerance_pp: float = 0.0) -> tuple[Any, str]:
    """The chosen trial: the fastest feasible one whose validation accuracy is within
    ``tolerance_pp`` points of the best feasible accuracy (ties: the more accurate); with no
    feasible trial, the least infeasible one."""
    trials = evaluated_trials(study)
    feasible = [t for t in trials if max(t.user_attrs.get("constraints", [0])) <= 0]
    if feasible:
        best = max(round(t.values[0], 4) for t in feasible)
        near = [t for t in feasible if round(t.values[0], 4) >= best - tolerance_pp / 100 - 1e-9]
        return min(near, key=lambda t: (t.values[1], -t.values[0])), "feasible"
    import optuna

    allc = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not allc:
        raise UserError("the study has no finished trial; run 'squeezer resume' to continue it")
    best = min(allc, key=lambda t: max(t.user_attrs.get("constraints", [0])))
    return best, "infeasible"


def finish(ctx: Context, study, *, progress: bool = True) -> dict[str, Any]:
    """Full fine-tune (QAT + distillation) of the chosen policy, test accuracy, export.

    Runs once per run: concurrent processes wait on a lock and then read ``best/metrics.json``.
    """
    from .sensitivity import file_lock

    with file_lock(ctx.run_dir / ".finish.lock"):
        return _finish(ctx, study, progress=progress)


def _finish(ctx: Context, study, *, progress: bool = True) -> dict[str, Any]:
    from .. import hw_models

    cfg = ctx.cfg
    best_dir = ctx.run_dir / "best"
    metrics_path = best_dir / "metrics.json"
    if metrics_path.is_file():
        return json.loads(metrics_path.read_text())
    trial, status = choose_best(study, cfg.tolerance_pp)
    policy = ctx.space.sample(optuna_fixed(trial))
    cost = ctx.estimate(policy)
    if status != "feasible":
        cons = constraints_of(cost, cfg, target_sram(ctx.target))
        log.warning("no trained candidate met every constraint; using trial %d, %.1f%% over its tightest limit",
                    trial.number, 100 * max(cons))
    log.info("final fine-tune of trial %d (%g epochs, QAT + distillation)", trial.number, cfg.final_epochs)
    seed_everything(cfg.seed)
    model = copy.deepcopy(ctx.base)
    batches = ctx.data.train.first_batches(8, cfg.batch_size, seed=0)
    policy = apply_policy_(model, policy, ctx.input_shape, data=batches).policy or policy
    t0 = time.time()
    distill = policy.distill if cfg.distill else None
    if distill is None and cfg.distill:
        distill = DistillConfig()
    if cfg.final_epochs > 0:
        train(model, ctx.data.train, epochs=cfg.final_epochs, lr=cfg.final_lr, batch_size=cfg.batch_size,
              teacher=ctx.base if distill else None, distill=distill, seed=cfg.seed,
              augment=ctx.input_shape[1] >= 16, progress=progress, desc="final fine-tune",
              step_hook=sparsity_step_hook(model))
    ft_seconds = time.time() - t0
    val_acc = evaluate(model, ctx.data.val)
    test_acc = evaluate(model, ctx.data.test)
    packed = _packed_size(model, policy)
    metrics = {**cost_dict(cost), "val_accuracy": val_acc, "test_accuracy": test_acc, "trial": trial.number,
               "status": status, "target": cfg.target, "budget_bytes": cfg.budget_bytes,
               "packed_bytes": packed, "finetune_seconds": round(ft_seconds, 1)}
    policy.save(best_dir / "policy.json", meta={"model": cfg.model, "dataset": cfg.dataset, "target": cfg.target,
                                                "trial": trial.number, "test_accuracy": test_acc})
    save_checkpoint(best_dir / "model.pt", model, model_name=cfg.model, input_shape=ctx.input_shape,
                    num_classes=ctx.data.num_classes, policy=policy,
                    normalization={"mean": ctx.data.mean, "std": ctx.data.std}, meta=metrics)
    _write_json(metrics_path, metrics)
    return metrics


def _packed_size(model: nn.Module, policy: Policy) -> int:
    """Exact stored bytes of the final model, Huffman-coded where the policy says so."""
    from ..compressors.packing import pack_model

    return len(pack_model(model, coding=policy.coding))


class optuna_fixed:
    """A stand-in trial that answers ``suggest_*`` from a finished trial's params."""

    def __init__(self, trial) -> None:
        self.params = dict(trial.params)

    def suggest_categorical(self, name, choices):
        return self.params[name]

    def suggest_float(self, name, low, high, **kw):
        return self.params[name]

    def suggest_int(self, name, low, high, **kw):
        return self.params[name]


# --- entry points ------------------------------------------------------------------------------

def new_run_dir(cfg: SearchConfig, root: Path = Path("runs")) -> Path:
    if cfg.run:
        return Path(cfg.run)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return root / f"{cfg.model.replace(':', '_').replace('/', '_')}-{cfg.target.replace('/', '_').replace('.yaml', '')}-{stamp}"


def search(cfg: SearchConfig, *, progress: bool = True, extend=None) -> dict[str, Any]:
    """Run (or continue) the main job in ``cfg.run``; return the summary.

    ``extend(study) -> int``: asked after the trials, before the final stage: how many more
    trained trials to run (0 = none; asked again after those), e.g. to spend a fine-tune step
    budget that rung-stopped trials left unspent. ``config.yaml`` records the final count.
    """
    run_dir = new_run_dir(cfg)
    cfg = cfg.with_(run=str(run_dir))
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        old = SearchConfig.load(cfg_path)
        keep = {"trials", "timeout", "storage", "threads", "backend", "workers", "address"}
        diff = {k for k, v in cfg.to_dict().items() if k not in keep and old.to_dict().get(k) != v}
        if diff:
            raise UserError(f"run folder {run_dir} holds a different search ({', '.join(sorted(diff))} differ); "
                            f"use 'squeezer resume {run_dir}' or another --run")
    cfg.save(cfg_path)
    return _run(cfg, run_dir, progress=progress, fresh=True, extend=extend)


def resume(run_dir: str | Path, *, trials: int | None = None, progress: bool = True,
           storage: str | None = None) -> dict[str, Any]:
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    if not cfg_path.is_file():
        raise UserError(f"{run_dir} is not a squeezer run (no config.yaml)")
    try:
        cfg = SearchConfig.load(cfg_path)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    changes: dict[str, Any] = {}
    if trials is not None:
        changes["trials"] = trials
    if storage is not None:
        changes["storage"] = storage
    if changes:
        cfg = cfg.with_(**changes)
        if trials is not None and (run_dir / "best" / "metrics.json").is_file():
            # More trials asked for: the chosen model may change, so redo the final stage.
            for f in ("metrics.json",):
                (run_dir / "best" / f).unlink()
        cfg.save(cfg_path)
    return _run(cfg, run_dir, progress=progress, fresh=False)


def _run(cfg: SearchConfig, run_dir: Path, *, progress: bool, fresh: bool, extend=None) -> dict[str, Any]:
    t0 = time.time()
    ctx = prepare(cfg, run_dir, progress=progress)
    sensitivity_first(ctx, progress=progress)
    study = open_study(cfg, run_dir, create=fresh, space=ctx.space)
    from .sensitivity import file_lock

    with file_lock(run_dir / ".seed.lock"):  # concurrent processes of one run seed it once
        if fresh and len(study.trials) == 0:
            seeds = enqueue_seeds(ctx, study)
            log.info("search space: %d dimensions (%d layers, %d channel groups); %d seed policies",
                     ctx.space.n_dims, len(ctx.space.layers), len(ctx.space.groups), len(seeds))
    t_search = time.time()
    while True:
        if cfg.backend == "ray":
            from .ray_backend import run_trials_ray

            run_trials_ray(ctx, study, progress=progress)
        else:
            run_trials(ctx, study, progress=progress)
        more = extend(study) if extend is not None else 0
        if more <= 0:
            break
        ctx.cfg = cfg = cfg.with_(trials=cfg.trials + int(more))
        cfg.save(run_dir / "config.yaml")
    search_seconds = time.time() - t_search
    best = finish(ctx, study, progress=progress)
    summary = {"run": str(run_dir), "base": ctx.base_metrics, "best": best,
               "trials": len(evaluated_trials(study)), "samples": len(study.trials),
               "search_seconds": round(search_seconds, 1), "wall_seconds": round(time.time() - t0, 1)}
    _write_json(run_dir / "summary.json", summary)
    return summary
