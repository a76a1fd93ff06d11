"""The Ray backend: trials on a Ray cluster, the study in the run's own Optuna storage.

``squeezer search --backend ray --workers N [--address auto|HOST:PORT]`` starts N Ray actors
(one CPU each, spread over the nodes), each running the same trial loop as the Optuna
backend (``job.run_trials``: Optuna's sampler, cost-model rejection, short fine-tune with
rungs). They share one study through :class:`RayStorageProxy`: every storage call goes to
one actor on the driver's node that holds the run's storage (``RUN/study.db`` or
``--storage``), so workers on other machines need neither a database server nor a shared
file system, and ``squeezer report`` / ``resume`` read the study as for the Optuna backend.
Heartbeats go through the proxy too, so a trial of a worker that vanished is failed after
the grace period and re-queued; a worker the driver sees die is reaped at once and replaced.

Each worker needs the dataset where the driver's config says (``--data-root``); the base
model, config and sensitivity file travel with the job through Ray's object store.

Example (two machines)::

    machine-a$ ray start --head --port 6379 --num-cpus 2
    machine-b$ ray start --address machine-a:6379 --num-cpus 2
    machine-a$ squeezer search --backend ray --address auto --workers 4 --budget 2MB --target arm
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from optuna.storages import BaseStorage
from optuna.storages._heartbeat import BaseHeartbeat

from .errors import UserError

log = logging.getLogger("squeezer")

#: Files of the run folder a worker needs (it rebuilds the rest: data, table, space).
RUN_FILES = ("config.yaml", "base/model.pt", "base/metrics.json", "sensitivity.json")
_FORWARDED = sorted({n for n in dir(BaseStorage) if not n.startswith("_")} |
                    {n for n in dir(BaseHeartbeat) if not n.startswith("__") and n != "_abc_impl"})


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--backend ray needs Ray: pip install 'squeezer[ray]'") from None
    return ray


class RayStorageProxy(BaseStorage, BaseHeartbeat):
    """An Optuna storage whose every call runs in a :class:`StorageServer` actor."""

    def __init__(self, actor) -> None:
        self._actor = actor

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        import ray

        return ray.get(self._actor.call.remote(name, *args, **kwargs))


def _forward(name: str):
    def method(self, *args, **kwargs):
        return self._call(name, *args, **kwargs)

    method.__name__ = name
    return method


for _name in _FORWARDED:
    setattr(RayStorageProxy, _name, _forward(_name))
RayStorageProxy.__abstractmethods__ = frozenset()


class StorageServer:
    """Holds the run's Optuna storage on the driver's node (a Ray actor: calls run one at a time)."""

    def __init__(self, url: str) -> None:
        import warnings

        import optuna
        from optuna import storages

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):
                retry = {"heartbeat_stale_trial_callback": storages.RetryHeartbeatStaleTrialCallback(max_retry=2)}
            else:
                retry = {"failed_trial_callback": storages.RetryFailedTrialCallback(max_retry=2)}
            self.storage = storages.RDBStorage(
                url, heartbeat_interval=15, grace_period=60, **retry,
                engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {})

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.storage, name)(*args, **kwargs)


class TrialWorker:
    """One Ray actor = one trial at a time, ``threads`` torch threads."""

    def __init__(self, payload: dict[str, Any], server, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        run_dir = Path(payload["run_dir"])
        if not (run_dir / "config.yaml").is_file():
            # Another machine: a local mirror of the run folder (trial files come back via the study).
            run_dir = Path(os.environ.get("SQUEEZER_RAY_CACHE", Path.home() / ".cache" / "squeezer" / "ray")) \
                / payload["run_name"]
            for rel, blob in payload["files"].items():
                p = run_dir / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                if not p.is_file():
                    p.write_bytes(blob)
        self.run_dir, self.payload, self.server, self.threads = run_dir, payload, server, threads

    def ident(self) -> str:
        from .config import worker_id

        return worker_id()

    def run(self) -> dict[str, Any]:
        from . import job
        from .config import SearchConfig, worker_id

        cfg = SearchConfig.from_dict(self.payload["cfg"]).with_(run=str(self.run_dir), threads=self.threads)
        t0 = time.time()
        ctx = job.prepare(cfg, self.run_dir, progress=False)
        job.sensitivity_first(ctx, progress=False)
        study = job.open_study(cfg, self.run_dir, create=False, space=ctx.space,
                               storage=RayStorageProxy(self.server))
        t1 = time.time()
        job.run_trials(ctx, study, progress=False)
        import ray

        return {"worker": worker_id(), "node": socket.gethostname(),
                "node_id": ray.get_runtime_context().get_node_id(), "prepare_seconds": round(t1 - t0, 2),
                "trial_loop_seconds": round(time.time() - t1, 2)}


def _connect(ray, cfg) -> bool:
    """Join ``cfg.address`` or start a local cluster; True if this call started Ray."""
    if ray.is_initialized():
        return False
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if cfg.address:
            ray.init(address=cfg.address, **kw)
        else:
            ray.init(address="local", num_cpus=max(cfg.workers, 1), **kw)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot join the Ray cluster at {cfg.address or 'a new local one'}: "
                        f"{str(e).splitlines()[0]}") from None
    return True


def run_trials_ray(ctx, study, *, progress: bool = True) -> dict[str, Any]:
    """Run trials on ``cfg.workers`` Ray actors until ``cfg.trials`` trained trials exist."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from tqdm.auto import tqdm

    from . import job

    ray = import_ray()
    cfg, run_dir = ctx.cfg, Path(ctx.run_dir)
    job.hold_worker_lock(run_dir)
    reaped = job.reap_dead_trials(study, run_dir)
    if reaped:
        log.info("re-queued %d trial(s) whose worker died", reaped)
    if len(job.trained_trials(study)) >= cfg.trials:
        return {"workers": []}
    t_start = time.time()
    started = _connect(ray, cfg)
    threads = cfg.threads or 1
    here = ray.get_runtime_context().get_node_id()
    server = ray.remote(num_cpus=0)(StorageServer).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False)).remote(job.storage_url(cfg, run_dir))
    files = {rel: (run_dir / rel).read_bytes() for rel in RUN_FILES if (run_dir / rel).is_file()}
    payload = {"cfg": cfg.to_dict(), "run_dir": str(run_dir.resolve()), "run_name": run_dir.name, "files": files}
    Worker = ray.remote(num_cpus=threads, max_restarts=0)(TrialWorker)

    def start():
        w = Worker.options(scheduling_strategy="SPREAD").remote(payload, server, threads)
        try:
            return w, ray.get(w.ident.remote(), timeout=float(os.environ.get("SQUEEZER_RAY_START_S", 180)))
        except ray.exceptions.GetTimeoutError:
            ray.kill(w)  # the cluster has no free CPU for it
            return None, None

    live: dict[Any, tuple[Any, str]] = {}
    for _ in range(cfg.workers):
        w, ident = start()
        if w is None:
            log.warning("ray: the cluster has room for only %d of %d worker(s) (%d CPU each)",
                        len(live), cfg.workers, threads)
            break
        live[w.run.remote()] = (w, ident)
    if not live:
        ray.kill(server)
        raise UserError(f"the Ray cluster has no free CPU for a worker ({threads} CPU each); "
                        f"add nodes or lower --threads")
    log.info("ray: %d worker(s) on %d node(s): %s", len(live), len({i.rsplit(':', 1)[0] for _, i in live.values()}),
             ", ".join(i for _, i in live.values()))
    bar = tqdm(total=cfg.trials, initial=len(job.trained_trials(study)), desc="search (ray)", unit="trial",
               dynamic_ncols=True, disable=not progress)
    results, restarts = [], 0
    try:
        while live:
            ready, _ = ray.wait(list(live), num_returns=1, timeout=2.0)
            bar.n = min(len(job.trained_trials(study)), cfg.trials)
            bar.refresh()
            for ref in ready:
                w, ident = live.pop(ref)
                try:
                    results.append(ray.get(ref))
                except ray.exceptions.RayActorError:
                    # The worker died (node lost, process killed): its trial goes back to the queue.
                    n = job.reap_dead_trials(study, run_dir, dead_workers={ident})
                    log.warning("ray: worker %s died; re-queued %d trial(s)", ident, n)
                    if len(job.trained_trials(study)) < cfg.trials and restarts < 3 * cfg.workers:
                        restarts += 1
                        w2, ident2 = start()
                        if w2 is not None:
                            live[w2.run.remote()] = (w2, ident2)
    finally:
        bar.close()
        for w, _ in live.values():
            ray.kill(w)
        ray.kill(server)
        if started:
            ray.shutdown()
    sync_trial_files(ctx, study)
    info = {"workers": results, "restarts": restarts, "wall_seconds": round(time.time() - t_start, 2)}
    job._write_json(run_dir / "ray_workers.json", info)
    return info


def sync_trial_files(ctx, study) -> int:
    """Write ``trials/NNNN.json`` for trials that ran on other machines (from the study)."""
    from . import job

    n = 0
    for t in study.get_trials(deepcopy=False):
        path = Path(ctx.run_dir) / "trials" / f"{t.number:04d}.json"
        if path.is_file() or t.state.name not in ("COMPLETE", "PRUNED") or not t.params:
            continue
        ua = t.user_attrs
        status = "evaluated" if ua.get("evaluated") else ("pruned" if "pruned_at" in ua else "over_budget")
        try:
            policy = ctx.space.policy_from_params(dict(t.params)).to_dict()
        except Exception:  # noqa: BLE001 - a record without a policy is still worth keeping
            policy = None
        rec = {"number": t.number, "worker": ua.get("worker"), "policy": policy,
               "metrics": {**(ua.get("cost") or {}), **({"val_accuracy": ua["val_accuracy"]} if "val_accuracy" in ua else {})},
               "constraints": ua.get("constraints"), "status": status, "rung_accuracy": ua.get("rung_acc", {}),
               "train_seconds": ua.get("train_seconds"), "steps": ua.get("steps")}
        job._write_json(path, rec)
        n += 1
    return n
