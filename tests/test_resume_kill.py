"""Resume after the worst interruptions: ``kill -9`` of the Ray driver mid-sweep, and a kill
between writing a trial's file and the study committing it (the crash window)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from squeezer.search.study import STUDY_NAME, trained_trials

FAST = ["--model", "resnet20", "--dataset", "digits", "--budget", "2MB", "--target", "arm", "--base-epochs", "1",
        "--trial-steps", "6", "--final-epochs", "0.1", "--seed", "5", "--no-sensitivity", "--sampler", "random",
        "--threads", "1", "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "SQUEEZER_TEST_THREADS": "1"}


def _study(run: Path):
    return optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{run / 'study.db'}")


def _committed(run: Path) -> list:
    """Trained trials the study has committed (what a kill must never lose)."""
    if not (run / "study.db").is_file():
        return []
    try:
        return trained_trials(_study(run))
    except Exception:  # noqa: BLE001 - not created yet
        return []


def _resume(run: Path, cwd: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "squeezer", "resume", str(run), "--quiet", "--json"], cwd=cwd,
                       capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def _assert_exact_and_unique(study, asked: int) -> None:
    trained = trained_trials(study)
    assert len(trained) == asked                                       # exactly the asked-for count
    assert not [t for t in study.trials if t.state.name in ("RUNNING", "WAITING")]
    # No policy trained twice: a trial failed by the kill ran again at most once, and never
    # next to a recovered copy of itself. The retry keeps every param the failed trial had
    # drawn (a kill mid-sampling leaves only some; the retry draws the rest).
    for f in (t for t in study.trials if t.state.name == "FAIL"):
        again = [t for t in trained if t.user_attrs.get("retried_from") == f.number]
        assert len(again) <= 1 and all(t.params.items() >= f.params.items() for t in again)


def _started(pid: int) -> str | None:
    """The start time of process ``pid`` (tells a reused pid apart), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _tree(pid: int) -> dict[int, tuple[str | None, str]]:
    """``pid``'s descendants (the Ray services and workers a driver started): pid -> (start, command)."""
    rows = [ln.split(None, 2) for ln in subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True,
                                                      text=True).stdout.splitlines()]
    children: dict[int, list[tuple[int, str]]] = {}
    for r in rows:
        if len(r) == 3:
            children.setdefault(int(r[1]), []).append((int(r[0]), r[2]))
    out, todo = {}, [pid]
    while todo:
        for c, args in children.get(todo.pop(), []):
            out[c] = (_started(c), args)
            todo.append(c)
    return out


def _alive(procs: dict[int, tuple[str | None, str]]) -> dict[int, str]:
    """Those of ``procs`` still running (the same process, not a reused pid): pid -> command."""
    return {p: args for p, (start, args) in procs.items() if start is not None and _started(p) == start}


def _end(procs: dict[int, tuple[str | None, str]]) -> None:
    """Kill, by pid, what is left of the processes this test's driver started."""
    for p in _alive(procs):
        os.kill(p, signal.SIGKILL)


@pytest.mark.slow  # ~2-3 min; the kill/resume path is also checked with the Optuna backend in the default suite
def test_ray_driver_killed_mid_sweep_then_resume(tmp_path):
    pytest.importorskip("ray")
    run = tmp_path / "runs" / "ray"
    cmd = [sys.executable, "-m", "squeezer", "search", *FAST, "--backend", "ray", "--workers", "1",
           "--trials", "4", "--run", str(run)]
    p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    procs: dict[int, tuple[str | None, str]] = {}
    deadline = time.time() + 240
    try:
        while len(_committed(run)) < 2 and time.time() < deadline and p.poll() is None:
            procs.update(_tree(p.pid))
            time.sleep(0.2)
        assert p.poll() is None, p.stderr.read()[-3000:]
        procs.update(_tree(p.pid))
        os.kill(p.pid, signal.SIGKILL)                                 # kill -9 of the driver mid-sweep
        p.wait()
        study = _study(run)
        before = {t.number: (t.values, t.params) for t in trained_trials(study)}
        assert 2 <= len(before) < 4
        # The driver's Ray services and trial workers share its fate (Ray's agents linger a
        # minute before they notice): nothing keeps training for the dead sweep.
        workers = {q: v for q, v in procs.items() if "Agent" not in v[1]}
        assert any("TrialWorker" in a for _, a in workers.values()), procs
        t0 = time.time()
        while _alive(workers) and time.time() - t0 < 40:
            time.sleep(0.5)
        assert not _alive(workers), _alive(workers)
    finally:
        _end(procs)
    summary = _resume(run, tmp_path)
    study = _study(run)
    after = {t.number: (t.values, t.params) for t in trained_trials(study)}
    assert all(after[n] == v for n, v in before.items())              # early trials unchanged
    _assert_exact_and_unique(study, 4)
    assert summary["best"]["size_bytes"] <= 2_000_000


# Runs the CLI with the trial-file writer patched to kill -9 its own process right after
# writing the file of trained trial number KILL_AT, before Optuna commits that trial.
KILLER = """
import os, signal, sys
import squeezer.search.trial as trial_module
_write, kill_at = trial_module.write_trial_file, int(os.environ["KILL_AT"])
def write_then_die(run_dir, rec):
    _write(run_dir, rec)
    if rec["reason"] in ("trained", "stopped") and rec["number"] >= kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
trial_module.write_trial_file = write_then_die
from squeezer.search.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("backend", ["optuna", pytest.param("ray", marks=pytest.mark.slow)])
def test_kill_between_trial_file_and_commit_recovers_the_result(tmp_path, backend):
    if backend == "ray":
        pytest.importorskip("ray")
    run = tmp_path / "runs" / backend
    extra = ["--backend", "ray", "--workers", "1"] if backend == "ray" else []
    p = subprocess.Popen([sys.executable, "-c", KILLER, "search", *FAST, *extra, "--trials", "4", "--run", str(run)],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**ENV, "KILL_AT": "2"})
    procs: dict[int, tuple[str | None, str]] = {}
    while p.poll() is None:
        procs.update(_tree(p.pid))
        time.sleep(0.2)
    _, err = p.communicate()
    _end(procs)
    r = subprocess.CompletedProcess(p.args, p.returncode, "", err)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    study = _study(run)
    running = {t.number for t in study.trials if t.state.name == "RUNNING"}
    assert 2 in running and running <= {2, 3}                           # the study never saw trial 2's result
    rec = json.loads((run / "trials" / "0002.json").read_text())
    assert rec["reason"] == "trained"
    _resume(run, tmp_path)
    study = _study(run)
    t2 = study.trials[2]
    assert t2.state.name == "COMPLETE" and t2.user_attrs["recovered_from_file"]
    assert t2.values == [rec["metrics"]["val_metric"], rec["metrics"]["latency_ms"]]   # told from the file
    assert not [t for t in study.trials if t.user_attrs.get("retried_from") == 2]        # not trained again
    _assert_exact_and_unique(study, 4)


def test_a_trial_file_of_another_study_is_not_recovered(tmp_path):
    """A run folder reused with a new storage has files of other trials under the same numbers."""
    from squeezer.search.recovery import recover_from_trial_file

    study = optuna.create_study(directions=["maximize", "minimize"])
    t = study.ask()
    t.set_user_attr("worker", "elsewhere:1")
    t.set_user_attr("cost", {"size_bytes": 1000, "latency_ms": 1.0})
    # A trial file of version 1 (before the JSON vocabulary): read into the current keys.
    rec = {"number": 0, "worker": "elsewhere:1", "status": "evaluated", "steps": 6, "train_seconds": 1.0,
           "rung_accuracy": {}, "metrics": {"size_bytes": 999, "latency_ms": 1.0, "val_accuracy": 0.9}}
    (tmp_path / "trials").mkdir()
    (tmp_path / "trials" / "0000.json").write_text(json.dumps(rec))
    frozen = study.trials[0]
    assert not recover_from_trial_file(study, frozen, tmp_path)        # another policy's size
    rec["metrics"]["size_bytes"] = 1000
    (tmp_path / "trials" / "0000.json").write_text(json.dumps(rec))
    assert recover_from_trial_file(study, frozen, tmp_path)
    done = study.trials[0]
    assert done.state.name == "COMPLETE" and done.values == [0.9, 1.0] and done.user_attrs["evaluated"]


def test_a_trial_killed_mid_sampling_is_requeued_with_what_it_had():
    """The Ray driver asks a trial and then samples it; a kill in between leaves some params.
    The retry keeps those and the params it was enqueued with, and draws only the rest."""
    from optuna.distributions import FloatDistribution, IntDistribution

    from squeezer.search.recovery import fail_and_requeue

    study = optuna.create_study(directions=["maximize", "minimize"], sampler=optuna.samplers.RandomSampler(seed=0))
    study.enqueue_trial({"a": 3, "c": 0.25})
    t = study.ask()
    t.suggest_int("a", 0, 7)
    t.suggest_float("b", 0.0, 1.0)                                      # drawn; "c" never reached
    b = t.params["b"]
    fail_and_requeue(study, study.trials[0])
    assert study.trials[0].state.name == "FAIL"
    retry = study.ask({"a": IntDistribution(0, 7), "b": FloatDistribution(0.0, 1.0),
                       "c": FloatDistribution(0.0, 1.0), "d": FloatDistribution(0.0, 1.0)})
    assert retry.number == 1 and retry.user_attrs["retried_from"] == 0
    assert retry.params["a"] == 3 and retry.params["b"] == b and retry.params["c"] == 0.25
    assert "d" in retry.params                                          # the rest is drawn afresh
