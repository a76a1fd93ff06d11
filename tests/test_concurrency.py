"""Two ``squeezer search --run SAME`` processes cooperate on one study."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import optuna

FAST = ["--model", "resnet20", "--dataset", "digits", "--budget", "60kB", "--target", "arm", "--base-epochs", "4",
        "--trial-steps", "12", "--final-epochs", "0.2", "--quiet", "--seed", "3", "--no-sensitivity", "--json",
        "--threads", "1"]


def test_two_processes_one_run_no_lost_or_duplicate_trials(tmp_path):
    run = tmp_path / "runs" / "shared"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "squeezer", "search", *FAST, "--trials", "6", "--run", str(run)]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)]
    time.sleep(1.0)  # the second joins while the first is still preparing
    procs.append(subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    summaries = [json.loads(out) for out, _ in outs]
    from squeezer.search.study import STUDY_NAME, trained_trials

    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{run / 'study.db'}")
    trained = trained_trials(study)
    assert len(trained) == 6                                             # exactly the asked count, none twice
    workers = {t.user_attrs["worker"] for t in trained}
    assert len(workers) == 2                                             # both processes trained trials
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    for t in trained:                                                    # every trial file matches its trial
        rec = json.loads((run / "trials" / f"{t.number:04d}.json").read_text())
        assert rec["worker"] == t.user_attrs["worker"]
    # The final stage ran once: both report the same chosen model (one best/metrics.json).
    assert summaries[0]["best"] == summaries[1]["best"]
    assert len(list((run / "best").glob("metrics.json"))) == 1
