"""The Python API on a user's own model class, plain Dataset and metric: the README's script, the
same through the Ray backend, resume after a kill, and what a run made from objects asks for."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

import squeezer
from squeezer.search.study import STUDY_NAME, trained_trials

ROOT = Path(__file__).resolve().parents[1]


def readme_script() -> str:
    """The README's Python API example (the code block after its marker)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- python-api-example -->", 1)[1]
    return re.search(r"```python\n(.*?)```", block, re.S).group(1)


def objects_module() -> str:
    """The README script's dataset, model and metric, without its search (to import in a test)."""
    code = readme_script()
    return code[:code.index("torch.manual_seed(0)")]


def run_script(code: str, cwd: Path, *, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", "import torch; torch.set_num_threads(1)\n" + code], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_readme_python_api_script(tmp_path):
    r = run_script(readme_script(), tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    size, val, head = r.stdout.strip().splitlines()[-1].split(" ", 2)
    assert int(size) <= 16_000                                   # the chosen model meets the budget
    run = tmp_path / "runs" / "python-api"
    best = json.loads((run / "best" / "metrics.json").read_text())
    base = json.loads((run / "base" / "metrics.json").read_text())
    assert best["metric"] == base["metric"] == "balanced_accuracy"     # the metric passed is the one used
    assert best["test_metric"] is None                           # no test split was given
    assert 0.5 < float(val) <= 1.0 and abs(best["val_metric"] - base["val_metric"]) < 0.15
    cfg = (run / "config.yaml").read_text()
    assert "model: object:SmallNet" in cfg and "dataset: object:Digits" in cfg
    assert (run / "model.onnx").stat().st_size > 0               # exported and verified in ONNX Runtime
    # The search's own probes and trials scored with the user's metric too.
    sens = json.loads((run / "sensitivity.json").read_text())
    assert 0.5 < sens["base_accuracy"] <= 1.0


@pytest.mark.slow  # ~2-3 min: a Ray cluster plus a search; the Ray backend's default-suite check is test_ray_backend.py
def test_the_same_through_the_ray_backend(tmp_path):
    code = readme_script().replace('run="runs/python-api")', 'run="runs/python-api", backend="ray", workers=1)')
    code = code.replace("trials=4", "trials=2").replace('result.export("onnx", "runs/python-api/model.onnx")', "")
    assert 'backend="ray"' in code
    r = run_script(code, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.strip().splitlines()[-1].split()[0]) <= 16_000
    run = tmp_path / "runs" / "python-api"
    workers = json.loads((run / "ray_workers.json").read_text())["workers"]
    assert len(workers) == 1 and workers[0]["trials"] >= 1      # trials trained on a Ray worker
    assert json.loads((run / "best" / "metrics.json").read_text())["metric"] == "balanced_accuracy"


def _objects(tmp_path: Path) -> dict:
    """The README's classes, imported from a module file (as a user's own module would be)."""
    mod = tmp_path / "userobjects.py"
    mod.write_text(objects_module())
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib

        return vars(importlib.import_module("userobjects"))
    finally:
        sys.path.remove(str(tmp_path))


def test_an_unpicklable_metric_is_refused_before_any_work(tmp_path):
    o = _objects(tmp_path)
    lock = threading.Lock()

    def metric(model, loader):  # holds a lock: cannot be sent to a Ray worker
        with lock:
            return o["balanced_accuracy"](model, loader)

    t0 = time.time()
    with pytest.raises(squeezer.UserError, match="metric.*cannot be pickled"):
        squeezer.search(o["SmallNet"](), data=(o["Digits"](True), o["Digits"](False)), metric=metric,
                        budget="16kB", backend="ray", run=str(tmp_path / "run"), progress=False)
    assert time.time() - t0 < 30
    assert not (tmp_path / "run" / "base" / "model.pt").exists()


KILLED_SEARCH = '''
{objects}
torch.manual_seed(0)
model = SmallNet()
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
for x, y in DataLoader(Digits(train=True), batch_size=64, shuffle=True):
    opt.zero_grad(); nn.functional.cross_entropy(model(x), y).backward(); opt.step()
torch.save(model.state_dict(), "base_weights.pt")
squeezer.search(model, data=(Digits(train=True), Digits(train=False)), metric=balanced_accuracy, budget="16kB",
                trials=5, trial_steps=40, final_epochs=0.5, run="run", progress=False)
'''


def test_resume_from_the_api_after_a_kill(tmp_path):
    code = KILLED_SEARCH.format(objects=objects_module())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    trials = tmp_path / "run" / "trials"
    deadline = time.time() + 400
    while time.time() < deadline and p.poll() is None:
        files = [f for f in trials.glob("*.json")] if trials.is_dir() else []
        if any(json.loads(f.read_text()).get("reason") == "trained" for f in files):
            break
        time.sleep(0.5)
    assert p.poll() is None, p.stderr.read()[-2000:]
    os.kill(p.pid, signal.SIGKILL)                               # no clean-up at all
    p.wait()
    assert not (tmp_path / "run" / "best").exists()

    o = _objects(tmp_path)
    data = (o["Digits"](True), o["Digits"](False))
    with pytest.raises(squeezer.UserError, match=r"pass them again.*model=\.\.\., data=\.\.\."):
        squeezer.resume(tmp_path / "run")
    cli = subprocess.run([sys.executable, "-m", "squeezer", "resume", str(tmp_path / "run")], capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 2 and len(cli.stderr.strip().splitlines()) == 1 and "objects" in cli.stderr

    other = o["SmallNet"]()                                      # not the run's base model
    with pytest.raises(squeezer.UserError, match="differs from this run's base model"):
        squeezer.resume(tmp_path / "run", model=other, data=data, metric=o["balanced_accuracy"], progress=False)

    model = o["SmallNet"]()
    model.load_state_dict(torch.load(tmp_path / "base_weights.pt"))
    result = squeezer.resume(tmp_path / "run", model=model, data=data, metric=o["balanced_accuracy"], progress=False)
    study = __import__("optuna").load_study(study_name=STUDY_NAME, storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    done = trained_trials(study)
    assert len(done) == 5 and len({t.number for t in done}) == 5
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    assert result.best.metrics["size_bytes"] <= 16_000 and result.best.metrics["metric"] == "balanced_accuracy"
    assert isinstance(result.best.model, torch.nn.Module)


def test_the_wheel_holds_only_the_squeezer_package(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    wheel = next(tmp_path.glob("squeezer-*.whl"))
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"squeezer", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}
    names = zipfile.ZipFile(wheel).namelist()
    assert "squeezer/search/api.py" in names and "squeezer/hw_models/targets/arm-a72.yaml" in names
    assert not any(n.startswith(("squeezer/tests/", "squeezer/benchmarks/", "squeezer/runs/")) for n in names)
    # every package of the source tree ships (a subpackage missing from pyproject's list imports
    # from a checkout but not from the wheel)
    sources = {f"squeezer/{p.relative_to(ROOT).as_posix()}"
               for top in ("search", "compressors", "evaluators", "hw_models") for p in (ROOT / top).rglob("__init__.py")}
    assert sources <= set(names), sorted(sources - set(names))


def test_a_run_of_named_model_and_data_started_from_python_resumes_from_the_cli(tmp_path):
    run = tmp_path / "runs" / "named"
    first = squeezer.search("resnet20", "digits", budget="60kB", trials=2, trial_steps=10, base_epochs=1,
                            final_epochs=0.1, sensitivity=False, threads=1, run=str(run), progress=False)
    assert first.best.metrics["size_bytes"] <= 60_000
    cli = subprocess.run([sys.executable, "-m", "squeezer", "resume", str(run), "--trials", "3", "--quiet", "--json"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert cli.returncode == 0, cli.stderr[-2000:]
    study = __import__("optuna").load_study(study_name=STUDY_NAME, storage=f"sqlite:///{run / 'study.db'}")
    assert len(trained_trials(study)) == 3
    again = squeezer.resume(run, progress=False)                     # and from Python again: nothing left to do
    assert again.best.trial == json.loads(cli.stdout)["best"]["trial"]
