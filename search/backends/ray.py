"""The ``ray`` backend: trials on a Ray cluster, the study in the run's own Optuna storage.

``squeezer search --backend ray --workers N [--address auto|HOST:PORT]`` starts N Ray actors
(one CPU each, spread over the nodes). The split is Ray Tune's ``OptunaSearch`` pattern:
the driver holds the study (``RUN/study.db`` or ``--storage``) and does all the searching --
it asks Optuna's sampler for a policy, prices it with the cost model, tells over-budget ones
at once, and hands an in-budget policy (its params, a few hundred bytes) to a free worker.
A worker only trains: it prepares data and base model once, then per trial runs
:func:`search.trial.train_trial` and returns the result; the driver records it
(:func:`search.trial.record`). So workers on other machines need neither a database nor a
shared file system, a trial costs one round trip, and the driver samples the next policy while
the workers train. Early stopping asks :class:`RungBoard` (one small actor) at each rung.

A model, data, metric or loss passed as Python objects travel to the workers through Ray
(cloudpickle); one that cannot be pickled is a one-line error before any worker starts.

Interruptions: a worker that dies has its trial failed and re-queued at once (and is
replaced). If the driver dies (``kill -9``, reboot), ``squeezer resume RUN`` finds its RUNNING
trials by their ``driver`` attribute (that process is gone), recovers the ones whose trial
file holds a result, and re-queues the rest.

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

import optuna
import torch
from tqdm.auto import tqdm

from ..config import SearchConfig, worker_id
from ..context import Context, prepare
from ..errors import UserError
from ..recovery import fail_and_requeue, hold_worker_lock, reap_dead_trials
from ..runfolder import BASE_METRICS, BASE_MODEL, CONFIG, SENSITIVITY, file_lock, write_json
from ..rungs import RungPruner
from ..study import priced_latency, trained_trials, user_attr
from ..trial import Sampled, check_failing, record, reject, sample_limit, sample_trial, train_trial, try_claim
from ..workload import Workload, named_workload

log = logging.getLogger("squeezer")

#: Files of the run folder a worker needs (it rebuilds the rest: data, table, space).
RUN_FILES = (CONFIG, str(BASE_MODEL), str(BASE_METRICS), SENSITIVITY)


def import_ray() -> Any:
    try:
        import ray  # an optional extra, and 1-2 s to import: only for --backend ray
    except ImportError:
        raise UserError("--backend ray needs Ray: pip install 'squeezer[ray]'") from None
    return ray


def check_picklable(workload: Workload) -> None:
    """Everything of ``workload`` the workers receive as objects can be pickled (else one line
    saying which one and what to do)."""
    if not workload.needs_objects():
        return  # named model and data: each worker loads them itself
    ray = import_ray()
    for what, obj in (("model", workload.model), ("data", workload.data), ("metric", workload.metric),
                      ("loss", workload.loss)):
        if obj is None:
            continue
        try:
            ray.cloudpickle.dumps(obj)
        except Exception as e:  # noqa: BLE001 - any pickling failure is the same advice
            raise UserError(f"--backend ray sends the {what} to its workers, but it cannot be pickled "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); define it at "
                            "module level without open files, locks or threads, or use backend='optuna'") from None


class RungBoard:
    """Metrics reported at the rungs in this sweep (a Ray actor on the driver's node): workers
    ask it at each rung whether to stop (the :class:`search.rungs.RungPruner` rule); it starts
    from the rung metrics already in the study."""

    def __init__(self, cfg: dict[str, Any], known: dict[int, tuple[dict[str, float], float | None]]) -> None:
        self.pruner = RungPruner(SearchConfig.from_dict(cfg))
        self.acc = {int(n): dict(r) for n, (r, _) in known.items()}
        self.latency = {int(n): lat for n, (_, lat) in known.items()}

    def report(self, number: int, step: int, acc: float, latency_ms: float | None = None) -> bool:
        self.acc.setdefault(number, {})[str(step)] = acc
        self.latency[number] = latency_ms
        peers = [(r[str(step)], self.latency.get(n)) for n, r in self.acc.items() if n != number and str(step) in r]
        return self.pruner.decide(peers, acc, latency_ms)


class TrialWorker:
    """One Ray actor: prepares once (data, base model, space), then trains one trial per call."""

    def __init__(self, payload: dict[str, Any], board: Any, threads: int) -> None:
        torch.set_num_threads(threads)
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        run_dir = Path(payload["run_dir"])
        if not (run_dir / CONFIG).is_file():
            # Another machine: a local mirror of the files a worker reads.
            run_dir = Path(os.environ.get("SQUEEZER_RAY_CACHE", Path.home() / ".cache" / "squeezer" / "ray")) \
                / payload["run_name"]
            for rel, blob in payload["files"].items():
                p = run_dir / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                if not p.is_file():
                    p.write_bytes(blob)
        self.run_dir, self.payload, self.board, self.threads = run_dir, payload, board, threads
        self.ctx: Context | None = None

    def setup(self) -> dict[str, Any]:
        ray = import_ray()
        t0 = time.time()
        cfg = SearchConfig.from_dict(self.payload["cfg"]).with_(run=str(self.run_dir), threads=self.threads)
        workload = self.payload["workload"] or named_workload(cfg)
        self.ctx = prepare(cfg, self.run_dir, workload, progress=False)
        return {"worker": worker_id(), "node": socket.gethostname(),
                "node_id": ray.get_runtime_context().get_node_id(), "prepare_seconds": round(time.time() - t0, 2)}

    def train(self, number: int, params: dict[str, Any], latency_ms: float | None = None) -> dict[str, Any]:
        """Train trial ``number``; ``latency_ms`` is its price on the target (the driver's), for the rungs."""
        ray = import_ray()
        policy = self.ctx.space.policy_from_params(params)
        on_rung = None
        if self.board is not None:
            def on_rung(step: int, metric: float, rung_metric: dict[str, float]) -> bool:
                return ray.get(self.board.report.remote(number, step, metric, latency_ms))
        return train_trial(self.ctx, number, policy, on_rung=on_rung)


def _connect(ray: Any, cfg: SearchConfig) -> bool:
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
class _Slot:
    """A started worker: its actor, ``host:pid`` and the seconds it was available and busy."""

    actor: Any
    info: dict[str, Any]
    ready_at: float
    gone_at: float | None = None
    trials: int = 0
    busy_seconds: float = 0.0
    last_result_at: float | None = None


class _Driver:
    """The driver's loop: sample ahead, hand in-budget policies to idle workers, record results,
    until ``cfg.trials`` trained trials exist or nothing is left to do."""

    def __init__(self, ctx: Context, study: optuna.Study, ray: Any, *, progress: bool, t_start: float) -> None:
        self.ctx, self.study, self.ray, self.cfg = ctx, study, ray, ctx.cfg
        self.run_dir = Path(ctx.run_dir)
        self.me = worker_id()
        self.threads = self.cfg.threads or 1
        self.start_timeout = float(os.environ.get("SQUEEZER_RAY_START_S", 180))
        self.exhausted = getattr(study.sampler, "exhausted", None)
        self.trained = len(trained_trials(study))
        self.slots: list[_Slot] = []
        self.idle: list[_Slot] = []
        self.queue: collections.deque[Sampled] = collections.deque()
        self.starting: dict[Any, tuple[Any, float]] = {}          # setup ref -> (actor, launch time)
        self.inflight: dict[Any, tuple[_Slot, Sampled]] = {}      # train ref -> (worker, trial)
        self.seconds = {"sample": 0.0, "record": 0.0}
        self.samples = self.restarts = 0
        self.sampling_done = self.full = False
        self.limit = sample_limit(study, self.cfg)
        self.t_start, self.t_end = t_start, time.time()
        self.deadline = None if self.cfg.timeout is None else self.t_start + self.cfg.timeout
        self.bar = tqdm(total=self.cfg.trials, initial=self.trained, desc="search (ray)", unit="trial",
                        dynamic_ncols=True, disable=not progress)
        self.board = self._board()
        self.worker_cls = ray.remote(num_cpus=self.threads, max_restarts=0)(TrialWorker)
        self.payload = self._payload()

    # --- workers ---------------------------------------------------------------------------
    def _here(self) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # ray is imported lazily

        return NodeAffinitySchedulingStrategy(node_id=self.ray.get_runtime_context().get_node_id(), soft=False)

    def _board(self) -> Any:
        if not self.cfg.rung_steps:
            return None
        known = {t.number: (user_attr(t, "rung_metric"), priced_latency(t))
                 for t in self.study.get_trials(deepcopy=False) if user_attr(t, "rung_metric")}
        board = self.ray.remote(num_cpus=0)(RungBoard).options(scheduling_strategy=self._here())
        return board.remote(self.cfg.to_dict(), known)

    def _payload(self) -> dict[str, Any]:
        files = {rel: (self.run_dir / rel).read_bytes() for rel in RUN_FILES if (self.run_dir / rel).is_file()}
        workload = self.ctx.workload if self.ctx.workload.needs_objects() else None
        return {"cfg": self.cfg.to_dict(), "run_dir": str(self.run_dir.resolve()), "run_name": self.run_dir.name,
                "files": files, "workload": workload}

    def launch(self) -> None:
        w = self.worker_cls.options(scheduling_strategy="SPREAD").remote(self.payload, self.board, self.threads)
        self.starting[w.setup.remote()] = (w, time.time())

    def started(self, ref: Any) -> None:
        w, _ = self.starting.pop(ref)
        try:
            info = self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            self.ray.kill(w)
            log.warning("ray: a worker failed to start: %s", str(e).splitlines()[0])
            return
        slot = _Slot(w, info, time.time())
        self.slots.append(slot)
        self.idle.append(slot)
        log.info("ray: worker %s ready on %s", info["worker"], info["node"])

    def drop_slow_starts(self) -> None:
        for ref, (w, t) in list(self.starting.items()):
            if time.time() - t > self.start_timeout:   # the cluster has no free CPU for it
                self.ray.kill(w)
                del self.starting[ref]
                log.warning("ray: a worker did not start within %g s (%d CPU each); going on with %d",
                            self.start_timeout, self.threads, len(self.idle) + len(self.inflight))

    # --- trials ----------------------------------------------------------------------------
    def sample_one(self) -> None:
        """Ask for one policy: over budget -> told at once; in budget -> queued for a worker."""
        t0 = time.time()
        trial = self.study.ask()
        trial.set_user_attr("driver", self.me)
        trial.set_user_attr("worker", self.me)
        s = sample_trial(self.ctx, trial)
        self.samples += 1
        if s.over_budget:
            self.study.tell(trial, reject(self.ctx, s, self.me))
        else:
            self.queue.append(s)
        if len(self.study.trials) >= self.limit or (self.deadline is not None and time.time() > self.deadline) or \
                (self.exhausted is not None and self.exhausted(self.study)):
            self.sampling_done = True
        self.seconds["sample"] += time.time() - t0

    def dispatch(self) -> None:
        """Hand queued policies to idle workers while the claim rule allows (exact count)."""
        while self.idle and self.queue and not self.full:
            s = self.queue[0]
            t0 = time.time()
            with file_lock(self.run_dir / ".claim.lock"):
                ok = try_claim(self.ctx, self.study, s.trial.number)
                if ok:
                    slot = self.idle.pop(0)  # the longest idle first: trials spread over the workers
                    s.trial.set_user_attr("worker", slot.info["worker"])
                    s.trial.set_user_attr("training", True)
            self.seconds["record"] += time.time() - t0
            if ok is None:
                return  # trials of other processes hold the last places: retry after the next wait
            if not ok:
                self.full = True
                return
            self.queue.popleft()
            self.inflight[slot.actor.train.remote(s.trial.number, s.trial.params, s.latency_ms)] = (slot, s)

    def finished(self, ref: Any) -> None:
        """Record a worker's result (its trial file, then the study), or re-queue its trial if it died."""
        slot, s = self.inflight.pop(ref)
        try:
            res = self.ray.get(ref)
        except self.ray.exceptions.RayActorError:
            # The worker died (node lost, process killed): its trial goes back to the queue.
            slot.gone_at = time.time()
            fail_and_requeue(self.study, s.trial)
            log.warning("ray: worker %s died; re-queued trial %d", slot.info["worker"], s.trial.number)
            if self.restarts < 3 * self.cfg.workers:
                self.restarts += 1
                self.launch()
            return
        self.idle.append(slot)
        self.dispatch()  # the worker's next trial first, then the bookkeeping of this one
        t0 = time.time()
        values = record(self.ctx, s, slot.info["worker"], res)
        if res["reason"] == "failed":
            self.study.tell(s.trial, state=optuna.trial.TrialState.FAIL)
            check_failing(self.study)
        elif values is None:
            self.study.tell(s.trial, state=optuna.trial.TrialState.PRUNED)
        else:
            self.study.tell(s.trial, values)
        self.trained += res["reason"] != "failed"
        slot.trials += 1
        slot.busy_seconds += res["train_seconds"]
        slot.last_result_at = time.time()
        self.seconds["record"] += time.time() - t0
        self.bar.n = min(self.trained, self.cfg.trials)
        self.bar.refresh()

    # --- the loop --------------------------------------------------------------------------
    def _wants_sample(self) -> bool:
        """Sample ahead (while the workers train or start) one more trial than idle workers."""
        return not self.sampling_done and not self.full and len(self.queue) < len(self.idle) + 1 and \
            self.trained + len(self.inflight) + len(self.queue) < self.cfg.trials

    def step(self) -> bool:
        """One turn of the loop; False when there is nothing left to do."""
        if not self.idle and not self.inflight and not self.starting:
            if not self.slots:
                raise UserError(f"the Ray cluster has no free CPU for a worker ({self.threads} CPU each); "
                                f"add nodes or lower --threads")
            log.warning("ray: no worker left; %d of %d trials trained", self.trained, self.cfg.trials)
            return False
        self.dispatch()
        pending = list(self.inflight) + list(self.starting)
        if self._wants_sample():
            self.sample_one()
            done = self.ray.wait(pending, num_returns=1, timeout=0)[0] if pending else []
        elif pending:
            done = self.ray.wait(pending, num_returns=1, timeout=1.0)[0]
        elif self.idle and self.queue and not self.full:
            # Trials of other processes hold the last places: wait for them (or reap them).
            reap_dead_trials(self.study, self.run_dir)
            time.sleep(1.0)
            done = []
        else:
            return False
        for ref in done:
            if ref in self.starting:
                self.started(ref)
            else:
                self.finished(ref)
                self.t_end = time.time()
        self.drop_slow_starts()
        return True

    def run(self) -> None:
        for _ in range(self.cfg.workers):
            self.launch()
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")  # ask-and-tell
                while self.step():
                    pass
        finally:
            self.close()

    def close(self) -> None:
        """Trials not finished here go back to the queue (a normal end leaves only surplus ones)."""
        self.bar.close()
        for _, s in self.inflight.values():
            fail_and_requeue(self.study, s.trial)
        for s in self.queue:
            s.trial.set_user_attr("surplus", True)
            self.study.tell(s.trial, state=optuna.trial.TrialState.PRUNED)
        for w in [sl.actor for sl in self.slots] + [w for w, _ in self.starting.values()]:
            self.ray.kill(w)
        if self.board is not None:
            self.ray.kill(self.board)

    def timings(self) -> dict[str, Any]:
        """Where the time went (``RUN/ray_workers.json``): see :func:`run_trials`."""
        slots, t_end = self.slots, self.t_end
        busy = sum(sl.busy_seconds for sl in slots)
        slot_seconds = sum(max((sl.gone_at or t_end) - sl.ready_at, 0.0) for sl in slots)
        first_ready = min((sl.ready_at for sl in slots), default=t_end)
        # Of the time outside trial work, how much is the end of the sweep: a worker with no trial
        # left waiting for the others' last results (shrinks as trials per worker grow).
        tail = sum(max(t_end - (sl.last_result_at or sl.ready_at), 0.0) for sl in slots if sl.gone_at is None)
        workers = [{**sl.info, "ready_after_seconds": round(sl.ready_at - self.t_start, 2), "trials": sl.trials,
                    "busy_seconds": round(sl.busy_seconds, 2)} for sl in slots]
        return {"workers": workers, "restarts": self.restarts, "samples": self.samples,
                "wall_seconds": round(time.time() - self.t_start, 2),
                "startup_seconds": round(first_ready - self.t_start, 2),
                "loop_seconds": round(t_end - first_ready, 2),
                "trial_work_seconds": round(busy, 2), "slot_seconds": round(slot_seconds, 2),
                "tail_idle_seconds": round(tail, 2),
                "driver_sample_seconds": round(self.seconds["sample"], 2),
                "driver_record_seconds": round(self.seconds["record"], 2),
                "outside_trial_share": round(1 - busy / slot_seconds, 4) if slot_seconds else None,
                "outside_trial_share_without_tail": round(1 - busy / (slot_seconds - tail), 4)
                if slot_seconds > tail else None}


def run_trials(ctx: Context, study: optuna.Study, *, progress: bool = True) -> dict[str, Any]:
    """Run trials on ``cfg.workers`` Ray actors until ``cfg.trials`` trained trials exist.

    Writes ``RUN/ray_workers.json``: the workers, and where the time went -- ``trial_work_seconds``
    (inside :func:`search.trial.train_trial` on the workers), ``slot_seconds`` (each worker's time
    from ready to the last result) and ``outside_trial_share`` = 1 - trial work / slot seconds
    (sampling while a worker waits, storage, scheduling, transfers, idle tail), plus the
    driver's own seconds.
    """
    ray = import_ray()
    cfg, run_dir = ctx.cfg, Path(ctx.run_dir)
    check_picklable(ctx.workload)
    hold_worker_lock(run_dir)
    reaped = reap_dead_trials(study, run_dir)
    if reaped:
        log.info("re-queued or recovered %d trial(s) whose worker or driver died", reaped)
    exhausted = getattr(study.sampler, "exhausted", None)
    if len(trained_trials(study)) >= cfg.trials or (exhausted is not None and exhausted(study)):
        return {"workers": []}
    t_start = time.time()
    started = _connect(ray, cfg)
    try:
        driver = _Driver(ctx, study, ray, progress=progress, t_start=t_start)
        driver.run()
    finally:
        if started:
            ray.shutdown()
    info = driver.timings()
    write_json(run_dir / "ray_workers.json", info)
    return info
