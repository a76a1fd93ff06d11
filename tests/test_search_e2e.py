"""The main job end to end on real (small) data, resume after kill -9, and the report JSON."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

FAST = ["--model", "resnet20", "--dataset", "digits", "--budget", "60kB", "--target", "arm",
        "--base-epochs", "4", "--trial-steps", "8", "--final-epochs", "1", "--quiet", "--seed", "1"]


def squeezer(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "SQUEEZER_TEST_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "squeezer", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    r = squeezer("search", *FAST, "--trials", "3", "--run", str(root / "runs" / "a"), "--json", cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    return root / "runs" / "a", json.loads(r.stdout)


def test_main_job_meets_budget_and_size_matches_packed_bytes(finished_run):
    run, summary = finished_run
    best, base = summary["best"], summary["base"]
    assert best["feasible"] is True
    assert best["size_bytes"] <= 60_000 < base["size_bytes"]
    if best.get("packed_bytes") is not None:
        assert best["packed_bytes"] == best["size_bytes"]
    assert 0.5 < base["test_metric"] <= 1.0 and 0.0 <= best["test_metric"] <= 1.0
    assert summary["trial_counts"]["trained"] == 3
    for f in ("config.yaml", "study.db", "best/policy.json", "best/model.pt", "base/model.pt", "summary.json"):
        assert (run / f).is_file(), f
    # The exported model loads with weights_only and replays to the same size.
    import torch

    from squeezer.evaluators.checkpoint import load_checkpoint

    blob = torch.load(run / "best" / "model.pt", weights_only=True)
    assert blob["policy"]["schema"] == "squeezer.policy/1"
    assert load_checkpoint(run / "best" / "model.pt").model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


def test_report_json_is_a_stable_interface(finished_run):
    run, summary = finished_run
    r = squeezer("report", str(run), "--json", cwd=run.parent)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["schema"] == "squeezer.report/2"
    for k in ("size_bytes", "latency_ms", "energy_mj", "test_metric"):
        assert isinstance(rep["base"][k], (int, float)) and isinstance(rep["best"][k], (int, float))
    assert isinstance(rep["best"]["val_metric"], float)
    states = {t["state"] for t in rep["trials"]}
    assert states <= {"COMPLETE", "FAIL", "PRUNED", "RUNNING", "WAITING"} and "COMPLETE" in states
    for t in rep["trials"]:
        assert {"number", "state", "reason", "values", "params", "worker", "origin"} <= set(t)
        assert t["state"] == "WAITING" or ":" in t["worker"]   # an enqueued seed not yet run has none
        assert t["origin"] in ("sampler", "seed:uniform", "seed:sensitivity", "seed:sensitivity-latency")
    assert rep["trials"][0]["origin"].startswith("seed:")          # the search starts from its seeds
    evaluated = [t for t in rep["trials"] if t["evaluated"]]
    assert len(evaluated) == 3
    # Trial files mirror the study (a seed still waiting to run has none yet).
    for t in (t for t in rep["trials"] if t["state"] != "WAITING"):
        rec = json.loads((run / "trials" / f"{t['number']:04d}.json").read_text())
        assert rec["number"] == t["number"] and rec["policy"]["schema"] == "squeezer.policy/1"
    text = squeezer("report", str(run), cwd=run.parent).stdout
    assert "Pareto front" in text and "chosen policy" in text
    row0 = next(ln for ln in text.splitlines() if ln.startswith("     0 "))
    assert rep["trials"][0]["origin"] in row0


@pytest.mark.slow  # ~90 s; the default suite kills and resumes in test_resume_kill.py, test_faults.py, test_api.py
def test_resume_after_kill_keeps_finished_trials(tmp_path):
    run = tmp_path / "runs" / "k"
    env = {**os.environ, "SQUEEZER_TEST_THREADS": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "squeezer", "search", *FAST, "--trials", "5", "--run", str(run)],
                         cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)

    import optuna

    from squeezer.search.study import STUDY_NAME

    storage = f"sqlite:///{run / 'study.db'}"

    def committed() -> int:
        """Trials the study has recorded as finished (what a kill must never lose)."""
        if not (run / "study.db").is_file():
            return 0
        try:
            study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
        except Exception:  # noqa: BLE001 - not created yet, or locked for a moment
            return 0
        return sum(1 for t in study.trials if t.state.name == "COMPLETE" and t.user_attrs.get("evaluated"))

    deadline = time.time() + 300
    while committed() < 2 and time.time() < deadline and p.poll() is None:
        time.sleep(0.3)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    before = {t.number: t.values for t in optuna.load_study(study_name=STUDY_NAME, storage=storage).trials
              if t.state.name == "COMPLETE" and t.user_attrs.get("evaluated")}
    assert len(before) >= 2
    r = squeezer("resume", str(run), "--quiet", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    after = {t.number: t.values for t in study.trials if t.state.name == "COMPLETE" and t.user_attrs.get("evaluated")}
    assert len(after) == 5                                   # exactly the asked-for count, none twice
    assert all(after[n] == v for n, v in before.items())     # earlier trials unchanged
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    assert json.loads(r.stdout)["best"]["size_bytes"] <= 60_000


def test_checkpoint_and_config_file_are_used(finished_run, tmp_path):
    run, summary = finished_run
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: resnet20\ndataset: digits\nbudget: 60kB\ntrials: 1\ntrial_steps: 4\nfinal_epochs: 0.2\n"
                   "seed: 1\n")
    r = squeezer("search", "--config", str(cfg), "--checkpoint", str(run / "base" / "model.pt"),
                 "--run", str(tmp_path / "runs" / "c"), "--quiet", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    # The given weights are used as the base (same test accuracy, nothing trained).
    assert out["base"]["source"] == str(run / "base" / "model.pt")
    assert out["base"]["test_metric"] == summary["base"]["test_metric"]
    assert out["trial_counts"]["trained"] == 1
    import yaml

    saved = yaml.safe_load((tmp_path / "runs" / "c" / "config.yaml").read_text())
    assert saved["trial_steps"] == 4 and saved["budget"] == "60kB"


def test_user_factory_and_torchvision_models_are_adapted(tmp_path):
    r = squeezer("cost", "--model", "torchvision.models:mobilenet_v3_small", "--input-shape", "3,64,64",
                 "--num-classes", "7", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    a = json.loads(r.stdout)
    r = squeezer("cost", "--model", "mobilenet_v3_small", "--input-shape", "1,64,64", "--json", cwd=tmp_path)
    b = json.loads(r.stdout)
    assert a["macs"] > 0 and b["macs"] > 0 and a["size_bytes"] != b["size_bytes"]  # classes/channels adapted
    from squeezer.evaluators.models import build_model

    m = build_model("resnet18", in_channels=1, num_classes=7)
    import torch

    assert m.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 7)


def test_one_seed_trains_one_base(tmp_path):
    """The base is trained from an initialisation the seed fixes: two runs with the same seed and
    no shared cache get the same weights (before, only the batches were seeded and every run
    trained a different base); another seed, another base."""
    import torch

    from squeezer.search.config import SearchConfig
    from squeezer.search.workload import build_base, named_workload

    def base(where, seed):
        run = tmp_path / where / "r"
        run.mkdir(parents=True)
        cfg = SearchConfig(model="resnet20", dataset="digits", budget="60kB", base_epochs=1, seed=seed, run=str(run))
        torch.manual_seed(1234 + len(where))  # whatever the process did before must not matter
        model, meta = build_base(cfg, named_workload(cfg), run / "base" / "model.pt", run.parent / ".cache", progress=False)
        assert meta["source"] == "trained"
        return model.state_dict()

    a, b, c = base("a", 3), base("bb", 3), base("ccc", 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
