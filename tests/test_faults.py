"""Faults a long sweep meets, injected for real (bad input, a full disk, signals, corrupted files,
diverging trials, concurrent resumes, a checkpoint with code in it): each stops with one line
before the expensive work or is survived, and nothing already computed is lost."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
import torch

import squeezer
from squeezer.search.config import SearchConfig
from squeezer.search.study import STUDY_NAME, trained_trials

FAST = ["--model", "resnet20", "--dataset", "digits", "--budget", "60kB", "--target", "arm", "--base-epochs", "4",
        "--trial-steps", "12", "--final-epochs", "0.2", "--quiet", "--seed", "3", "--threads", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def squeezer_cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "squeezer", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=ENV)


def one_line(r: subprocess.CompletedProcess, pattern: str, *, code: int = 2) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert len(lines) == 1, r.stderr[-2000:]
    import re

    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def study_of(run: Path) -> optuna.Study:
    return optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{run / 'study.db'}")


def assert_exact(run: Path, n: int) -> optuna.Study:
    """``n`` trained trials, each once; nothing left RUNNING; every trial file readable."""
    study = study_of(run)
    done = trained_trials(study)
    assert len(done) == n and len({t.number for t in done}) == n
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    for t in done:
        assert json.loads((run / "trials" / f"{t.number:04d}.json").read_text())["number"] == t.number
    return study


# --- bad input: refused before any expensive work ---------------------------------------------

def test_a_storage_url_optuna_cannot_open_is_refused_at_once(tmp_path):
    t0 = time.time()
    r = squeezer_cli("search", *FAST, "--storage", "notadb://x", "--run", str(tmp_path / "run"), cwd=tmp_path)
    one_line(r, r"cannot open storage notadb://x")
    assert time.time() - t0 < 60
    assert not (tmp_path / ".cache").exists() and not (tmp_path / "run" / "base").exists()   # no base trained


@pytest.mark.parametrize("content", [b"", b"this is not a database\n" * 50, b"SQLite format 3\x00" + b"\x00" * 100])
def test_resume_of_a_run_whose_study_is_not_a_database_is_refused_at_once(tmp_path, content):
    run = tmp_path / "run"
    run.mkdir()
    SearchConfig(model="resnet20", dataset="digits", budget="60kB", run=str(run)).save(run / "config.yaml")
    (run / "study.db").write_bytes(content)
    t0 = time.time()
    line = one_line(squeezer_cli("resume", str(run), cwd=tmp_path), r"study\.db")
    assert "restore" in line or "new run" in line
    assert time.time() - t0 < 60 and not (run / "base").exists()


def test_a_model_factory_that_cannot_be_imported_is_refused_at_once(tmp_path):
    r = squeezer_cli("search", "--model", "nosuchpackage.models:build", "--run", str(tmp_path / "run"), cwd=tmp_path)
    one_line(r, r"cannot load model factory 'nosuchpackage\.models:build'")


def test_a_checkpoint_with_code_in_it_is_refused_without_running_the_code(tmp_path):
    marker = tmp_path / "code-ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    policy = tmp_path / "p.json"
    squeezer.Policy().save(policy)
    r = squeezer_cli("apply", str(policy), "--model", "lenet5", "--checkpoint", str(tmp_path / "evil.pt"),
                     cwd=tmp_path)
    one_line(r, r"cannot read checkpoint .*evil\.pt")
    assert not marker.exists()


# --- a finished run to damage ----------------------------------------------------------------

@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    r = squeezer_cli("search", *FAST, "--trials", "3", "--run", str(root / "runs" / "done"), cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    return root / "runs" / "done"


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_a_truncated_base_checkpoint_is_refused(finished, tmp_path):
    run = copy_run(finished, tmp_path / "runs" / "r")
    data = (run / "base" / "model.pt").read_bytes()
    (run / "base" / "model.pt").write_bytes(data[: len(data) // 2])
    line = one_line(squeezer_cli("resume", str(run), cwd=tmp_path), r"base/model\.pt")
    assert "corrupt" in line or "cannot read" in line


def test_a_base_checkpoint_whose_weights_changed_is_refused(finished, tmp_path):
    run = copy_run(finished, tmp_path / "runs" / "r")
    blob = torch.load(run / "base" / "model.pt", weights_only=True)
    key = next(k for k, v in blob["state_dict"].items() if v.dtype == torch.float32)
    blob["state_dict"][key] = blob["state_dict"][key] + 1.0      # a bit flip the zip's CRCs do not see
    torch.save(blob, run / "base" / "model.pt")
    line = one_line(squeezer_cli("resume", str(run), cwd=tmp_path), r"base/model\.pt")
    assert "checksum" in line


@pytest.mark.parametrize("name", ["sensitivity.json", "narrowed.json"])
def test_a_corrupt_cache_file_is_reported_and_rebuilt(finished, tmp_path, name):
    run = copy_run(finished, tmp_path / "runs" / "r")
    good = json.loads((run / name).read_text())
    (run / name).write_text((run / name).read_text()[:50])      # truncated mid-way
    r = squeezer_cli("sensitivity", str(run), "--json", cwd=tmp_path)   # what resume does first, without trials
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{name} is corrupt" in r.stderr
    rebuilt = json.loads((run / name).read_text())
    key = "probes" if name == "sensitivity.json" else "narrowed"
    assert rebuilt[key] == good[key]                             # measured again: the same run, the same result


def test_a_truncated_trial_file_is_reported_never_used(finished, tmp_path):
    run = copy_run(finished, tmp_path / "runs" / "r")
    n = trained_trials(study_of(run))[0].number
    path = run / "trials" / f"{n:04d}.json"
    path.write_text(path.read_text()[:40])
    rep = squeezer_cli("report", str(run), "--json", "--no-files", cwd=tmp_path)
    assert rep.returncode == 0, rep.stderr[-2000:]
    assert f"trials/{n:04d}.json is corrupt" in rep.stderr      # reported; the study still has the trial
    assert n in [t["number"] for t in json.loads(rep.stdout)["trials"]]
    one_line(squeezer_cli("export", str(run), "--trial", str(n), cwd=tmp_path), rf"trials/{n:04d}\.json is corrupt")


# --- a full disk ---------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A 96 MB tmpfs (a real file system that fills up), unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte; returns the ballast file."""
    ballast = disk / "ballast"
    with open(ballast, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass
    for size in (4096, 512, 1):  # the last blocks
        try:
            with open(ballast, "ab") as f:
                while True:
                    f.write(b"\0" * size)
                    f.flush()
        except OSError:
            pass
    return ballast


def test_a_full_disk_stops_with_one_line_and_resume_continues(small_disk):
    run = small_disk / "runs" / "full"
    p = subprocess.Popen([sys.executable, "-m", "squeezer", "search", *FAST, "--trials", "5", "--run", str(run)],
                         cwd=small_disk, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 400
    while time.time() < deadline and p.poll() is None and len(list((run / "trials").glob("*.json"))
                                                                 if (run / "trials").is_dir() else []) < 2:
        time.sleep(0.2)
    assert p.poll() is None, p.stderr.read()[-2000:]
    ballast = fill(small_disk)
    out, err = p.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("base model", "search", "sens"))]
    assert p.returncode not in (0, None) and "Traceback" not in err, err[-3000:]
    assert "no space left" in lines[-1] and f"squeezer resume {run}" in lines[-1], err[-2000:]
    # Nothing already written is corrupted.
    for f in (run / "trials").glob("*.json"):
        json.loads(f.read_text())
    squeezer.load_checkpoint(run / "base" / "model.pt")
    assert not list(run.rglob("*.tmp"))                          # no half-written leftovers
    before = {t.number for t in trained_trials(study_of(run))}
    ballast.unlink()
    r = squeezer_cli("resume", str(run), "--quiet", cwd=small_disk)
    assert r.returncode == 0, r.stderr[-2000:]
    study = assert_exact(run, 5)
    assert before <= {t.number for t in trained_trials(study)}  # finished trials kept


# --- signals -----------------------------------------------------------------------------------

STAGES = {"base": "base model: training", "sensitivity": "sensitivity: probing", "trial": None,
          "final": "final fine-tune of trial"}


@pytest.mark.parametrize("stage,sig", [
    pytest.param("base", signal.SIGINT, marks=pytest.mark.slow),
    pytest.param("sensitivity", signal.SIGTERM, marks=pytest.mark.slow),
    ("trial", signal.SIGTERM),
    pytest.param("trial", signal.SIGINT, marks=pytest.mark.slow),
    pytest.param("final", signal.SIGINT, marks=pytest.mark.slow)])
def test_a_signal_stops_the_run_within_seconds_and_resume_finishes_it(tmp_path, stage, sig):
    run = tmp_path / "runs" / "sig"
    args = [*FAST, "--trials", "3", "--run", str(run)] + ([] if stage == "sensitivity" else ["--no-sensitivity"])
    if stage == "base":
        args = [a if a != "4" else "40" for a in args]          # a base long enough to be interrupted
    if stage == "trial":  # a trial long enough (~4 s, not ~1 s) to be still training when the signal comes
        args = [a if a != "12" else "60" for a in args]
    p = subprocess.Popen([sys.executable, "-m", "squeezer", "search", *args], cwd=tmp_path, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(p.stderr.readline, "")), daemon=True)
    reader.start()

    def reached() -> bool:
        if stage == "trial":
            if not (run / "study.db").is_file():
                return False
            try:
                return any(t.state.name == "RUNNING" and t.user_attrs.get("training") for t in study_of(run).trials)
            except (KeyError, sqlalchemy.exc.SQLAlchemyError):  # the study is not created yet, or its
                return False                                     # schema is being written this instant
        return any(STAGES[stage] in line for line in err)

    deadline = time.time() + 500
    while time.time() < deadline and p.poll() is None and not reached():
        time.sleep(0.3)
    assert p.poll() is None, "".join(err)[-2000:]
    time.sleep(0.5)
    t0 = time.time()
    p.send_signal(sig)
    p.wait(timeout=60)
    reader.join(timeout=10)
    assert time.time() - t0 < 20                                 # stops within seconds
    assert p.returncode == 128 + sig, "".join(err)[-2000:]
    last = [line for line in err if line.strip()][-1]
    assert "Traceback" not in "".join(err) and f"squeezer resume {run}" in last, "".join(err)[-2000:]
    if stage == "trial":
        study = study_of(run)
        assert not [t for t in study.trials if t.state.name == "RUNNING"]
        stopped = [t for t in study.trials if t.state.name == "FAIL"]
        assert len(stopped) == 1
    r = squeezer_cli("resume", str(run), "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    study = assert_exact(run, 3)
    if stage == "trial":                                         # the stopped trial is queued again, same policy
        again = [t for t in study.trials if t.user_attrs.get("retried_from") == stopped[0].number]
        assert len(again) == 1
        assert (again[0].params or again[0].system_attrs["fixed_params"]) == stopped[0].params


# --- trials that fail by themselves ------------------------------------------------------------

DIVERGE = '''
import torch
from torch import nn
import squeezer
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

d = load_digits()
x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
y = torch.tensor(d.target)
train, val = TensorDataset(x[:1400], y[:1400]), TensorDataset(x[1400:], y[1400:])
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
for _ in range(3):
    for i in range(0, 1400, 64):
        opt.zero_grad(); nn.functional.cross_entropy(model(x[i:i + 64]), y[i:i + 64]).backward(); opt.step()

def loss(student, batch, teacher):
    """Diverges (NaN) on a student whose first conv lost channels; raises where the second did."""
    xb, yb = batch
    out = nn.functional.cross_entropy(student(xb), yb)
    convs = [m for m in student.modules() if isinstance(m, nn.Conv2d)]
    if convs[0].out_channels < 16:
        return out * float("nan")
    if MODE == "raise" and convs[-1].out_channels < 32:
        raise RuntimeError("this fine-tune cannot handle a pruned last conv")
    return out

try:
    r = squeezer.search(model, data=(train, val), loss=loss, budget="12kB", trials=TRIALS, trial_steps=10,
                        final_epochs=0.1, sensitivity=False, latency_seeds="none", run="run", progress=False)
    print("OK", r.best.trial)
except squeezer.UserError as e:
    print("USERERROR", e)
'''


def test_a_trial_whose_loss_becomes_nan_fails_with_its_reason_and_the_sweep_goes_on(tmp_path):
    code = DIVERGE.replace("MODE", '"nan"').replace("TRIALS", "6")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=ENV)
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout + r.stderr[-3000:]
    run = tmp_path / "run"
    study = assert_exact(run, 6)
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert failed, "no trial pruned the first conv: the test does not exercise NaN"
    for t in failed:
        rec = json.loads((run / "trials" / f"{t.number:04d}.json").read_text())
        assert rec["reason"] == "failed" and "NaN" in rec["error"] and "NaN" in t.user_attrs["error"]


def test_a_sweep_whose_every_trial_fails_stops_after_a_few(tmp_path):
    code = DIVERGE.replace("MODE", '"nan"').replace("TRIALS", "20").replace("if convs[0].out_channels < 16:",
                                                                             "if True:")
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=ENV)
    assert r.stdout.startswith("USERERROR") and "failed" in r.stdout and "NaN" in r.stdout, r.stdout + r.stderr[-2000:]
    study = study_of(tmp_path / "run")
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    assert 3 <= len(failed) <= 5 and not trained_trials(study)     # a few, not all 20
    assert time.time() - t0 < 300


def test_a_fine_tune_that_raises_fails_its_trial_only(tmp_path):
    code = DIVERGE.replace("MODE", '"raise"').replace("TRIALS", "5")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=ENV)
    assert r.returncode == 0 and r.stdout.startswith("OK"), r.stdout + r.stderr[-3000:]
    study = assert_exact(tmp_path / "run", 5)
    reasons = [t.user_attrs.get("error", "") for t in study.trials if t.state.name == "FAIL"]
    assert any("cannot handle a pruned last conv" in r for r in reasons)


# --- concurrent resumes --------------------------------------------------------------------------

@pytest.mark.slow  # ~65 s; test_concurrency.py runs two processes on one run folder by default
def test_two_resumes_at_once_and_a_resume_beside_a_running_search(tmp_path):
    run = tmp_path / "runs" / "two"
    cmd = [sys.executable, "-m", "squeezer"]
    first = subprocess.Popen([*cmd, "search", *FAST, "--no-sensitivity", "--trials", "3", "--run", str(run)],
                             cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 400
    while time.time() < deadline and not (run / "trials").is_dir():
        time.sleep(0.3)
    # A resume while the search still runs joins it.
    joined = subprocess.Popen([*cmd, "resume", str(run), "--quiet"], cwd=tmp_path, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    assert joined.wait(timeout=600) == 0, joined.stderr.read()[-2000:]
    assert_exact(run, 3)
    # Two resumes at once extend it.
    procs = [subprocess.Popen([*cmd, "resume", str(run), "--trials", "6", "--quiet"], cwd=tmp_path, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=600) == 0, p.stderr.read()[-2000:]
    study = assert_exact(run, 6)
    assert len({t.user_attrs["worker"] for t in trained_trials(study)}) >= 2
