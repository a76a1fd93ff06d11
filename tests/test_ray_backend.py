"""The Ray backend on a real two-node Ray cluster (Ray's test cluster on this machine)."""

from __future__ import annotations

import json
import os

import optuna
import pytest

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def _cfg(run, **kw):
    from squeezer.search.config import SearchConfig

    base = dict(model="resnet20", dataset="digits", budget="60kB", base_epochs=4, trial_steps=8, final_epochs=0.2,
                seed=1, trials=4, backend="ray", workers=2, threads=1, sensitivity=False, run=str(run))
    return SearchConfig(**{**base, **kw})


def test_two_nodes_share_one_study_in_the_run_folder(cluster, tmp_path):
    from squeezer.search.pipeline import start
    from squeezer.search.report import report
    from squeezer.search.study import STUDY_NAME, evaluated_trials, trained_trials

    run = tmp_path / "r"
    summary = start(_cfg(run, trial_steps=16), progress=False)[1]  # long enough for both workers to join
    info = json.loads((run / "ray_workers.json").read_text())
    assert len({w["node_id"] for w in info["workers"]}) == 2          # one worker per node
    workers = {w["worker"] for w in info["workers"]}
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{run / 'study.db'}")
    trained = trained_trials(study)
    assert len(trained) == 4 and summary["trial_counts"]["trained"] == len(evaluated_trials(study))   # exactly the asked count
    assert {t.user_attrs["worker"] for t in trained} <= workers and len({t.user_attrs["worker"] for t in trained}) == 2
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    for t in study.trials:
        if t.state.name in ("COMPLETE", "PRUNED"):
            assert (run / "trials" / f"{t.number:04d}.json").is_file()
    rep = report(run)                                               # report reads it like an Optuna-backend run
    assert rep["best"]["size_bytes"] <= 60_000 and len([t for t in rep["trials"] if t["evaluated"]]) >= 1


@pytest.mark.slow
def test_a_dead_worker_is_reaped_and_replaced(cluster, tmp_path):
    """Kill one worker process mid-trial: its trial is re-queued, the count stays exact."""
    import threading
    import time

    from squeezer.search.pipeline import start
    from squeezer.search.study import STUDY_NAME, trained_trials

    run = tmp_path / "d"
    killed: list[str] = []

    def killer():
        deadline = time.time() + 240
        while time.time() < deadline and not killed:
            try:
                study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{run / 'study.db'}")
            except Exception:  # noqa: BLE001 - not created yet
                time.sleep(0.5)
                continue
            for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
                if t.user_attrs.get("training") and len(trained_trials(study)) >= 1:
                    pid = int(t.user_attrs["worker"].rsplit(":", 1)[1])
                    os.kill(pid, 9)
                    killed.append(t.user_attrs["worker"])
                    return
            time.sleep(0.2)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    start(_cfg(run, trials=4, trial_steps=30), progress=False)[1]
    th.join(1)
    assert killed, "no trial was caught running"
    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{run / 'study.db'}")
    states = [t.state.name for t in study.trials]
    assert "FAIL" in states and "RUNNING" not in states
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert failed[0].user_attrs["worker"] == killed[0]
    retried = [t for t in study.trials if t.user_attrs.get("retried_from") == failed[0].number]
    assert retried and retried[0].params == failed[0].params            # the same policy ran again
    assert len(trained_trials(study)) == 4
    info = json.loads((run / "ray_workers.json").read_text())
    assert info["restarts"] >= 1
