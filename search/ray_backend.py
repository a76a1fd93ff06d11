"""The Ray backend: trials on a Ray cluster, the study in the run's own Optuna storage.

``squeezer search --backend ray --workers N [--address auto|HOST:PORT]`` starts N Ray actors
(one CPU each, spread over the nodes). The split is Ray Tune's ``OptunaSearch`` pattern:
the driver holds the study (``RUN/study.db`` or ``--storage``) and does all the searching --
it asks Optuna's sampler for a policy, prices it with the cost model, tells over-budget ones
at once, and hands an in-budget policy (its params, a few hundred bytes) to a free worker.
A worker only trains: it prepares data and base model once, then per trial applies the
policy, fine-tunes with rungs and returns the validation accuracy; the driver writes
``trials/NNNN.json`` and tells the study. So workers on other machines need neither a
database nor a shared file system, a trial costs one round trip, and the driver samples the
next policy while the workers train. Early stopping asks :class:`RungBoard` (one small actor)
at each rung.

Interruptions: a worker that dies has its trial failed and re-queued at once (and is
replaced). If the driver dies (``kill -9``, reboot), ``squeezer resume RUN`` finds its RUNNING
trials by their ``driver`` attribute (that process is gone), recovers the ones whose trial
file holds a result, and re-queues the rest.

Each worker needs the dataset where the driver's config says (``--data-root``); the base
model, config and sensitivity file travel with the job through Ray's object store.

Example (two machines)::

    machine-a$ ray start --head --port 6379 --num-cpus 2
    machine-b$ ray start --address machine-a:6379 --num-cpus 2
    machine-a$ squeezer search --backend ray --address auto --workers 4 --budget 2MB --target arm
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

log = logging.getLogger("squeezer")

#: Files of the run folder a worker needs (it rebuilds the rest: data, table, space).
RUN_FILES = ("config.yaml", "base/model.pt", "base/metrics.json", "sensitivity.json")


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--backend ray needs Ray: pip install 'squeezer[ray]'") from None
    return ray


class RungBoard:
    """Accuracies reported at the rungs in this sweep (a Ray actor on the driver's node).

    Workers ask it at each rung whether to stop (``job.rung_says_stop``, the rule of the
    Optuna backend); it starts from the rung accuracies already in the study.
    """

    def __init__(self, cfg: dict[str, Any], known: dict[int, tuple[dict[str, float], float | None]]) -> None:
        from .config import SearchConfig

        self.cfg = SearchConfig.from_dict(cfg)
        self.acc = {int(n): dict(r) for n, (r, _) in known.items()}
        self.latency = {int(n): lat for n, (_, lat) in known.items()}

    def report(self, number: int, step: int, acc: float, latency_ms: float | None = None) -> bool:
        from .job import rung_says_stop

        self.acc.setdefault(number, {})[str(step)] = acc
        self.latency[number] = latency_ms
        peers = [(r[str(step)], self.latency.get(n)) for n, r in self.acc.items() if n != number and str(step) in r]
        return rung_says_stop(peers, acc, self.cfg, latency_ms)


class TrialWorker:
    """One Ray actor: prepares once (data, base model, space), then trains one trial per call."""

    def __init__(self, payload: dict[str, Any], board, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        run_dir = Path(payload["run_dir"])
        if not (run_dir / "config.yaml").is_file():
            # Another machine: a local mirror of the files a worker reads.
            run_dir = Path(os.environ.get("SQUEEZER_RAY_CACHE", Path.home() / ".cache" / "squeezer" / "ray")) \
                / payload["run_name"]
            for rel, blob in payload["files"].items():
                p = run_dir / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                if not p.is_file():
                    p.write_bytes(blob)
        self.run_dir, self.payload, self.board, self.threads = run_dir, payload, board, threads
        self.ctx = None

    def setup(self) -> dict[str, Any]:
        import ray

        from . import job
        from .config import SearchConfig, worker_id

        t0 = time.time()
        cfg = SearchConfig.from_dict(self.payload["cfg"]).with_(run=str(self.run_dir), threads=self.threads)
        self.ctx = job.prepare(cfg, self.run_dir, progress=False)
        return {"worker": worker_id(), "node": socket.gethostname(),
                "node_id": ray.get_runtime_context().get_node_id(), "prepare_seconds": round(time.time() - t0, 2)}

    def train(self, number: int, params: dict[str, Any], latency_ms: float | None = None) -> dict[str, Any]:
        """Train trial ``number``; ``latency_ms`` is its price on the target (the driver's), for the rungs."""
        import ray

        from . import job

        policy = self.ctx.space.policy_from_params(params)
        on_rung = None
        if self.board is not None:
            latency = latency_ms if self.ctx.cfg.rung_latency_class else None

            def on_rung(step: int, acc: float, rung_acc: dict[str, float]) -> bool:
                return ray.get(self.board.report.remote(number, step, acc, latency))
        return job.train_trial(self.ctx, number, policy, on_rung=on_rung)


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


@dataclass
class _Sampled:
    """A trial the driver asked for and priced within budget, not yet handed to a worker."""

    trial: Any
    policy: Any
    cost: Any
    cons: list[float]


@dataclass
class _Slot:
    """A started worker: its actor, ``host:pid`` and the seconds it was available and busy."""

    actor: Any
    info: dict[str, Any]
    ready_at: float
    gone_at: float | None = None
    trials: int = 0
    busy_seconds: float = 0.0
    last_result_at: float | None = None


def run_trials_ray(ctx, study, *, progress: bool = True) -> dict[str, Any]:
    """Run trials on ``cfg.workers`` Ray actors until ``cfg.trials`` trained trials exist.

    Writes ``RUN/ray_workers.json``: the workers, and where the time went -- ``trial_work_seconds``
    (inside ``job.train_trial`` on the workers), ``slot_seconds`` (each worker's time from ready to
    the last result) and ``outside_trial_share`` = 1 - trial work / slot seconds (sampling while
    a worker waits, storage, scheduling, transfers, idle tail), plus the driver's own seconds.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    from tqdm.auto import tqdm

    from . import job
    from .config import worker_id
    from .sensitivity import file_lock

    ray = import_ray()
    cfg, run_dir = ctx.cfg, Path(ctx.run_dir)
    job.hold_worker_lock(run_dir)
    reaped = job.reap_dead_trials(study, run_dir)
    if reaped:
        log.info("re-queued or recovered %d trial(s) whose worker or driver died", reaped)
    exhausted = getattr(study.sampler, "exhausted", None)
    trained = len(job.trained_trials(study))
    if trained >= cfg.trials or (exhausted is not None and exhausted(study)):
        return {"workers": []}
    t_start = time.time()
    started = _connect(ray, cfg)
    threads = cfg.threads or 1
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    board = None
    if cfg.rung_steps:
        known = {t.number: (t.user_attrs["rung_acc"], job.priced_latency(t))
                 for t in study.get_trials(deepcopy=False) if t.user_attrs.get("rung_acc")}
        board = ray.remote(num_cpus=0)(RungBoard).options(scheduling_strategy=here).remote(cfg.to_dict(), known)
    files = {rel: (run_dir / rel).read_bytes() for rel in RUN_FILES if (run_dir / rel).is_file()}
    payload = {"cfg": cfg.to_dict(), "run_dir": str(run_dir.resolve()), "run_name": run_dir.name, "files": files}
    Worker = ray.remote(num_cpus=threads, max_restarts=0)(TrialWorker)
    start_timeout = float(os.environ.get("SQUEEZER_RAY_START_S", 180))
    starting: dict[Any, tuple[Any, float]] = {}           # setup ref -> (actor, launch time)

    def launch() -> None:
        w = Worker.options(scheduling_strategy="SPREAD").remote(payload, board, threads)
        starting[w.setup.remote()] = (w, time.time())

    for _ in range(cfg.workers):
        launch()
    did = worker_id()
    slots: list[_Slot] = []
    idle: list[_Slot] = []
    queue: collections.deque[_Sampled] = collections.deque()
    inflight: dict[Any, tuple[_Slot, _Sampled]] = {}      # train ref -> (worker, trial)
    seconds = {"sample": 0.0, "record": 0.0}
    samples, restarts, sampling_done, full = 0, 0, False, False
    max_total = len(study.trials) + 40 * cfg.trials + 200  # guard against a space that is all over budget
    deadline = None if cfg.timeout is None else t_start + cfg.timeout
    bar = tqdm(total=cfg.trials, initial=trained, desc="search (ray)", unit="trial", dynamic_ncols=True,
               disable=not progress)

    def sample_one() -> None:
        """Ask for one policy: over budget -> told at once; in budget -> queued for a worker."""
        nonlocal sampling_done, samples
        t0 = time.time()
        trial = study.ask()
        trial.set_user_attr("driver", did)
        trial.set_user_attr("worker", did)
        policy, cost, named = job.sample_trial(ctx, trial)
        cons = list(named.values())
        samples += 1
        if max(cons) > 0:
            # Over budget: rejected by the cost model, no training (the sampler learns from it).
            trial.set_user_attr("evaluated", False)
            job.write_trial_file(run_dir, job.trial_record(trial.number, did, policy, cost, cons, None))
            study.tell(trial, [0.0, float(cost.latency_ms)])
        else:
            queue.append(_Sampled(trial, policy, cost, cons))
        if len(study.trials) >= max_total or (deadline is not None and time.time() > deadline) or \
                (exhausted is not None and exhausted(study)):
            sampling_done = True
        seconds["sample"] += time.time() - t0

    def dispatch() -> None:
        """Hand queued policies to idle workers while the claim rule allows (exact count)."""
        nonlocal full
        while idle and queue and not full:
            s = queue[0]
            t0 = time.time()
            with file_lock(run_dir / ".claim.lock"):
                ok = job.try_claim(ctx, study, s.trial.number)
                if ok:
                    slot = idle.pop(0)  # the longest idle first: trials spread over the workers
                    s.trial.set_user_attr("worker", slot.info["worker"])
                    s.trial.set_user_attr("training", True)
            seconds["record"] += time.time() - t0
            if ok is None:
                return  # trials of other processes hold the last places: retry after the next wait
            if not ok:
                full = True
                return
            queue.popleft()
            inflight[slot.actor.train.remote(s.trial.number, s.trial.params, float(s.cost.latency_ms))] = (slot, s)

    def started_one(ref) -> None:
        w, _ = starting.pop(ref)
        try:
            info = ray.get(ref)
        except ray.exceptions.RayError as e:
            ray.kill(w)
            log.warning("ray: a worker failed to start: %s", str(e).splitlines()[0])
            return
        slot = _Slot(w, info, time.time())
        slots.append(slot)
        idle.append(slot)
        log.info("ray: worker %s ready on %s", info["worker"], info["node"])

    def record(ref) -> None:
        """Write the trial file, then tell the study (recoverable from the file if killed in between)."""
        nonlocal trained, restarts
        slot, s = inflight.pop(ref)
        try:
            res = ray.get(ref)
        except ray.exceptions.RayActorError:
            # The worker died (node lost, process killed): its trial goes back to the queue.
            slot.gone_at = time.time()
            job.fail_and_requeue(study, s.trial)
            log.warning("ray: worker %s died; re-queued trial %d", slot.info["worker"], s.trial.number)
            if restarts < 3 * cfg.workers:
                restarts += 1
                launch()
            return
        idle.append(slot)
        dispatch()  # the worker's next trial first, then the bookkeeping of this one
        t0 = time.time()
        job.write_trial_file(run_dir, job.trial_record(s.trial.number, slot.info["worker"], s.policy, s.cost,
                                                       s.cons, res))
        for k, v in job.result_attrs(res).items():
            s.trial.set_user_attr(k, v)
        if res["status"] == "pruned":
            study.tell(s.trial, state=_pruned())
        else:
            study.tell(s.trial, [res["val_accuracy"], float(s.cost.latency_ms)])
        trained += 1
        slot.trials += 1
        slot.busy_seconds += res["train_seconds"]
        slot.last_result_at = time.time()
        seconds["record"] += time.time() - t0
        bar.n = min(trained, cfg.trials)
        bar.refresh()

    t_end = time.time()

    def loop() -> None:
        """Sample ahead, dispatch, record results, until the count is reached or nothing is left."""
        nonlocal t_end
        while True:
            if not idle and not inflight and not starting:
                if not slots:
                    raise UserError(f"the Ray cluster has no free CPU for a worker ({threads} CPU each); "
                                    f"add nodes or lower --threads")
                log.warning("ray: no worker left; %d of %d trials trained", trained, cfg.trials)
                break
            dispatch()
            pending = list(inflight) + list(starting)
            # Sample ahead (while the workers train or start) one more trial than idle workers.
            want = not sampling_done and not full and len(queue) < len(idle) + 1 and \
                trained + len(inflight) + len(queue) < cfg.trials
            if want:
                sample_one()
                done = ray.wait(pending, num_returns=1, timeout=0)[0] if pending else []
            elif pending:
                done = ray.wait(pending, num_returns=1, timeout=1.0)[0]
            elif idle and queue and not full:
                # Trials of other processes hold the last places: wait for them (or reap them).
                job.reap_dead_trials(study, run_dir)
                time.sleep(1.0)
                done = []
            else:
                break
            for ref in done:
                if ref in starting:
                    started_one(ref)
                else:
                    record(ref)
                    t_end = time.time()
            for ref, (w, t) in list(starting.items()):
                if time.time() - t > start_timeout:   # the cluster has no free CPU for it
                    ray.kill(w)
                    del starting[ref]
                    log.warning("ray: a worker did not start within %g s (%d CPU each); going on with %d",
                                start_timeout, threads, len(idle) + len(inflight))

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")  # ask-and-tell
            loop()
    finally:
        bar.close()
        # Trials not finished here go back to the queue (a normal end leaves only surplus ones).
        for _, s in inflight.values():
            job.fail_and_requeue(study, s.trial)
        for s in queue:
            s.trial.set_user_attr("surplus", True)
            study.tell(s.trial, state=_pruned())
        for w in [sl.actor for sl in slots] + [w for w, _ in starting.values()]:
            ray.kill(w)
        if board is not None:
            ray.kill(board)
        if started:
            ray.shutdown()
    wall = time.time() - t_start
    busy = sum(sl.busy_seconds for sl in slots)
    slot_seconds = sum(max((sl.gone_at or t_end) - sl.ready_at, 0.0) for sl in slots)
    workers = [{**sl.info, "ready_after_seconds": round(sl.ready_at - t_start, 2), "trials": sl.trials,
                "busy_seconds": round(sl.busy_seconds, 2)} for sl in slots]
    first_ready = min((sl.ready_at for sl in slots), default=t_end)
    # Of the time outside trial work, how much is the end of the sweep: a worker with no trial
    # left waiting for the others' last results (shrinks as trials per worker grow).
    tail = sum(max(t_end - (sl.last_result_at or sl.ready_at), 0.0) for sl in slots if sl.gone_at is None)
    info = {"workers": workers, "restarts": restarts, "samples": samples, "wall_seconds": round(wall, 2),
            "startup_seconds": round(first_ready - t_start, 2), "loop_seconds": round(t_end - first_ready, 2),
            "trial_work_seconds": round(busy, 2), "slot_seconds": round(slot_seconds, 2),
            "tail_idle_seconds": round(tail, 2),
            "driver_sample_seconds": round(seconds["sample"], 2), "driver_record_seconds": round(seconds["record"], 2),
            "outside_trial_share": round(1 - busy / slot_seconds, 4) if slot_seconds else None,
            "outside_trial_share_without_tail": round(1 - busy / (slot_seconds - tail), 4)
            if slot_seconds > tail else None}
    job._write_json(run_dir / "ray_workers.json", info)
    return info


def _pruned():
    import optuna

    return optuna.trial.TrialState.PRUNED
