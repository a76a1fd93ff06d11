"""Every bad input gives one clear line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "squeezer", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def one_line_error(r: subprocess.CompletedProcess, pattern: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    assert lines[0].startswith("squeezer: error:")
    import re

    assert re.search(pattern, lines[0]), lines[0]


@pytest.mark.parametrize("budget,pattern", [
    ("2XB", "unknown (size|budget) unit"), ("-1MB", "malformed|> 0"), ("0MB", "> 0"), ("abc", "malformed"), ("", "malformed"),
])
def test_bad_budgets(tmp_path, budget, pattern):
    one_line_error(run("search", f"--budget={budget}", "--run", str(tmp_path / "r"), cwd=tmp_path), pattern)


def test_unknown_target_model_dataset(tmp_path):
    one_line_error(run("search", "--target", "arm-a27", "--run", str(tmp_path / "r"), cwd=tmp_path),
                   "unknown target 'arm-a27'; did you mean 'arm-a72'")
    one_line_error(run("search", "--model", "resnet21", "--run", str(tmp_path / "r"), cwd=tmp_path),
                   "unknown model 'resnet21'; did you mean")
    one_line_error(run("search", "--dataset", "fashion_mnist", "--run", str(tmp_path / "r"), cwd=tmp_path),
                   "did you mean 'fashion-mnist'")


def test_zero_trials(tmp_path):
    one_line_error(run("search", "--trials", "0", "--run", str(tmp_path / "r"), cwd=tmp_path), "trials >= 1")
    one_line_error(run("search", "--trials", "many", "--run", str(tmp_path / "r"), cwd=tmp_path), "malformed --trials")


def test_bad_tolerance_and_a_model_too_big_for_the_inputs(tmp_path):
    one_line_error(run("search", "--tolerance", "-3", "--run", str(tmp_path / "r"), cwd=tmp_path),
                   r"0 <= tolerance <= 100")
    one_line_error(run("search", "--latency-seeds", "0.8,2", "--run", str(tmp_path / "r"), cwd=tmp_path),
                   r"0 < latency seed fraction < 1")
    one_line_error(run("search", "--prune-choices", "0.25,1", "--run", str(tmp_path / "r"), cwd=tmp_path),
                   r"0 <= prune choice < 1")
    one_line_error(run("search", "--sensitivity-bn-images", "-1", "--run", str(tmp_path / "r"), cwd=tmp_path),
                   r"sensitivity_bn_images >= 0")
    one_line_error(run("search", "--prune-choices", "half", "--run", str(tmp_path / "r"), cwd=tmp_path),
                   r"malformed prune choices 'half'")
    one_line_error(run("search", "--model", "lenet5", "--dataset", "digits", "--run", str(tmp_path / "r"), cwd=tmp_path),
                   r"model lenet5 cannot run on digits's 1x8x8 inputs")
    assert not (tmp_path / "r" / "study.db").exists()                    # stopped before any work


def test_budget_below_smallest_reachable_size_names_that_size(tmp_path):
    r = run("search", "--model", "resnet20", "--dataset", "digits", "--budget", "1kB", "--base-epochs", "1",
            "--run", str(tmp_path / "r"), cwd=tmp_path)
    one_line_error(r, r"below the smallest size resnet20 can reach on arm: [0-9,]+ bytes")


def test_missing_run_folders_and_bad_policy_files(tmp_path):
    one_line_error(run("resume", str(tmp_path / "nope")), "run folder not found")
    one_line_error(run("report", str(tmp_path / "nope")), "run folder not found")
    (tmp_path / "notarun").mkdir()
    one_line_error(run("report", str(tmp_path / "notarun")), "not a squeezer run")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "squeezer.policy/1", "layers": {"_default": {"prune_ratio": 1.5}}}))
    one_line_error(run("cost", "--model", "lenet5", "--policy", str(bad)), r"prune_ratio < 1")
    bad.write_text("{oops")
    one_line_error(run("cost", "--model", "lenet5", "--policy", str(bad)), "cannot parse policy file")


def test_bad_config_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("budget: 2MB\ntrails: 3\n")
    one_line_error(run("search", "--config", str(cfg), "--run", str(tmp_path / "r"), cwd=tmp_path),
                   "unknown config key")
    one_line_error(run("search", "--config", str(tmp_path / "none.yaml"), cwd=tmp_path), "config file not found")


def test_unknown_option_is_one_line(tmp_path):
    one_line_error(run("search", "--budgett", "2MB", cwd=tmp_path), "unrecognized arguments")
