"""One vocabulary: every JSON a user reads says the same quantity with the same key (and value),
carries a ``schema``, uses only keys the README documents; run folders of version 1 still load."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from squeezer.search.recovery import _recovered_state
from squeezer.search.schema import RENAMED, SCHEMAS, upgrade

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "run_v1"

#: Keys whose children are data (names, steps, options), not vocabulary: their keys are not checked.
DATA_MAPS = {"params", "policy", "config", "rung_metric", "runtime_ops", "fits", "constraints", "workers",
             "trial_counts", "limits", "reference_point"}
#: Keys of version 1 that no current JSON may use.
RETIRED = set(RENAMED) | {"accuracy", "status", "samples", "seconds", "predicted_ms", "per_image_ms",
                          "batch_latency_ms", "torch_accuracy", "reported_accuracy"}


def squeezer(*args: str, cwd: Path | None = None) -> str:
    r = subprocess.run([sys.executable, "-m", "squeezer", *args], capture_output=True, text=True, timeout=600,
                       cwd=cwd)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def documented_keys() -> set[str]:
    """Every backticked key in the first column of the README's "JSON fields" table, and the keys its
    rows list in words (per-op rows, per-artifact fields, bench fields)."""
    text = (ROOT / "README.md").read_text()
    table = text.split("<!-- json-fields -->", 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r"`([a-z_0-9]+)`", table))


def keys_of(obj, path=""):
    """(path, key) of every key in ``obj``; the keys of :data:`DATA_MAPS` are data, their values' keys not."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield path, k
            if k not in DATA_MAPS:
                yield from keys_of(v, f"{path}.{k}")
            elif isinstance(v, dict) and k not in ("policy", "config"):
                for name, sub in v.items():
                    yield from keys_of(sub, f"{path}.{k}.{name}")
    elif isinstance(obj, list):
        for v in obj:
            yield from keys_of(v, path + "[]")


@pytest.fixture(scope="module")
def outputs(digits_run, tmp_path_factory):
    """Every JSON a user reads, from one run: kind -> object (``trial`` -> a list of trial files)."""
    run = digits_run
    work = tmp_path_factory.mktemp("vocab")
    policy = run / "best" / "policy.json"
    out = {"report": json.loads(squeezer("report", str(run), "--json", "--no-files")),
           "summary": json.loads((run / "summary.json").read_text()),
           "metrics": [json.loads((run / d / "metrics.json").read_text()) for d in ("base", "best")],
           "trial": [json.loads(p.read_text()) for p in sorted((run / "trials").glob("*.json"))],
           "cost": json.loads(squeezer("cost", "--model", "resnet20", "--input-shape", "1,8,8", "--policy",
                                       str(policy), "--json")),
           "export": json.loads(squeezer("export", str(run), "--format", "state_dict", "--json", "--out",
                                         str(work / "m.pt")))}
    if (run / "finalists.json").is_file():
        out["finalists"] = json.loads((run / "finalists.json").read_text())
    out["bench"] = json.loads(squeezer("bench", str(work / "m.pt"), "--repeats", "2", "--batch", "2", "--json"))
    # The run's own base weights and data split (seed 2), so that apply's base is the run's base.
    out["apply"] = json.loads(squeezer("apply", str(policy), "--model", "resnet20", "--dataset", "digits",
                                       "--checkpoint", str(run / "base" / "model.pt"), "--seed", "2", "--finetune-epochs", "0",
                                       "--json", "--cache", str(work / "cache"), cwd=work))
    return out


def test_every_json_has_its_schema_and_only_documented_keys(outputs):
    documented = documented_keys()
    for kind, obj in outputs.items():
        for one in obj if isinstance(obj, list) else [obj]:
            assert one["schema"] == SCHEMAS[kind], kind
            keys = set(keys_of(one))
            assert not {k for _, k in keys} & RETIRED, (kind, {(p, k) for p, k in keys if k in RETIRED})
            undocumented = {(p, k) for p, k in keys if k not in documented}
            assert not undocumented, (kind, undocumented)


def test_the_same_quantity_has_the_same_key_and_value_everywhere(outputs):
    rep, summary, (base, best) = outputs["report"], outputs["summary"], outputs["metrics"]
    assert best["metric"] == base["metric"] == rep["metric"] == outputs["apply"]["metric"] == "accuracy"
    for k in ("metric", "val_metric", "test_metric", "size_bytes", "latency_ms", "energy_mj", "trial", "feasible"):
        assert rep["best"][k] == summary["best"][k] == best[k] == outputs["export"]["reported"][k], k
    for k in ("val_metric", "test_metric", "size_bytes", "latency_ms", "energy_mj"):
        assert rep["base"][k] == summary["base"][k] == base[k], k
    # apply on the run's base weights and data: the base's test metric; the chosen policy's cost.
    app = outputs["apply"]
    assert app["base"]["test_metric"] == pytest.approx(base["test_metric"])
    assert app["size_bytes"] == best["size_bytes"] == outputs["cost"]["size_bytes"]
    assert app["latency_ms"] == pytest.approx(best["latency_ms"]) == pytest.approx(outputs["cost"]["latency_ms"])
    # The artifact's own runtime agrees with the run's test metric (top-1 accuracy here).
    (art,) = outputs["export"]["artifacts"]
    assert art["reported_test_accuracy"] == best["test_metric"]
    assert abs(art["runtime_test_accuracy"] - best["test_metric"]) <= 0.005
    # Trial files, report rows and the study's user attributes agree, key for key.
    rows = {t["number"]: t for t in rep["trials"]}
    study = optuna.load_study(study_name="squeezer", storage=f"sqlite:///{Path(rep['run']) / 'study.db'}")
    attrs = {t.number: t.user_attrs for t in study.trials}
    assert outputs["trial"]
    for rec in outputs["trial"]:
        row, ua = rows[rec["number"]], attrs[rec["number"]]
        assert rec["reason"] == row["reason"] and rec["constraints"] == row["constraints"] == ua["constraints"]
        assert rec["metrics"]["size_bytes"] == row["cost"]["size_bytes"] == ua["cost"]["size_bytes"]
        assert rec["metrics"].get("val_metric") == row["val_metric"] == ua.get("val_metric")
    assert summary["trial_counts"] == rep["trial_counts"]
    assert sum(v for k, v in rep["trial_counts"].items() if k != "sampled") == rep["trial_counts"]["sampled"]


def old_run(tmp_path: Path) -> Path:
    """The version-1 run folder of tests/fixtures/run_v1 (two processes, lenet5, budget 40kB, rungs 10,20:
    written by squeezer before this vocabulary), with its study restored from the SQL dump."""
    run = tmp_path / "run_v1"
    shutil.copytree(FIXTURE, run, ignore=shutil.ignore_patterns("study.sql"))
    with sqlite3.connect(run / "study.db") as db:
        db.executescript((FIXTURE / "study.sql").read_text())
    return run


def test_a_version_1_run_folder_still_reports(tmp_path):
    run = old_run(tmp_path)
    rep = json.loads(squeezer("report", str(run), "--json"))
    assert rep["schema"] == "squeezer.report/2" and rep["metric"] == "accuracy"
    old_best = json.loads((FIXTURE / "best" / "metrics.json").read_text())
    best = rep["best"]
    assert best["test_metric"] == old_best["test_accuracy"] and best["val_metric"] == old_best["val_accuracy"]
    assert best["feasible"] is True and best["trial"] == 0 and best["schema"] == "squeezer.metrics/2"
    assert best["trial_val_metric"] == rep["trials"][0]["values"][0]     # from the study: v1 did not record it
    # Every reason occurs in this run; Optuna's states beside them; constraints named from the run's limits.
    reasons = {t["number"]: (t["state"], t["reason"]) for t in rep["trials"]}
    assert reasons == {0: ("COMPLETE", "trained"), 1: ("COMPLETE", "trained"), 2: ("PRUNED", "stopped"),
                       3: ("PRUNED", "stopped"), 4: ("COMPLETE", "trained"), 5: ("COMPLETE", "trained"),
                       6: ("COMPLETE", "over_budget"), 7: ("COMPLETE", "over_budget"), 8: ("PRUNED", "surplus")}
    assert rep["trial_counts"] == {"sampled": 9, "trained": 4, "stopped": 2, "over_budget": 2, "surplus": 1,
                                   "failed": 0, "running": 0, "queued": 0}
    old7 = json.loads((FIXTURE / "trials" / "0007.json").read_text())
    assert rep["trials"][7]["constraints"] == {"size": old7["constraints"][0]} and old7["constraints"][0] > 0
    assert rep["trials"][2]["rung_metric"] == {"10": 0.802} and rep["trials"][2]["pruned_at"] == 10
    assert len(rep["workers"]) == 2 and sum(rep["workers"].values()) == 6   # config.yaml says workers: 1
    assert rep["summary"]["schema"] == "squeezer.summary/2" and rep["summary"]["trial_counts"]["sampled"] == 9
    text = " ".join(squeezer("report", str(run)).split())  # long lines wrap
    assert "trials: 9 sampled: 4 trained to the end, 2 stopped early at a rung" in text
    assert "1 surplus (not needed" in text and "workers that trained trials: 2" in text
    assert 'class="chosen"' in (run / "report.html").read_text()


def test_a_version_1_trial_file_recovers_a_trial():
    rec = upgrade(json.loads((FIXTURE / "trials" / "0002.json").read_text()), "trial")
    assert rec["reason"] == "stopped" and rec["rung_metric"] == {"10": 0.802} and "status" not in rec
    attrs, state, values = _recovered_state(rec)
    assert state.name == "PRUNED" and values is None and attrs["pruned_at"] == 10
    assert attrs["rung_metric"] == {"10": 0.802}
    rec = upgrade(json.loads((FIXTURE / "trials" / "0000.json").read_text()), "trial")
    attrs, state, values = _recovered_state(rec)
    assert state.name == "COMPLETE" and values[0] == attrs["val_metric"] == 0.785 and attrs["evaluated"]


def test_an_unknown_schema_is_a_one_line_error(tmp_path):
    from squeezer.search.errors import UserError

    with pytest.raises(UserError, match="unknown schema 'squeezer.metrics/9'"):
        upgrade({"schema": "squeezer.metrics/9"}, "metrics")


def test_a_version_1_run_folder_resumes_into_the_current_vocabulary(tmp_path):
    """More trials on a run of version 1: old and new trials in one study, one vocabulary out."""
    run = old_run(tmp_path)
    squeezer("resume", str(run), "--trials", "7", "--quiet", cwd=tmp_path)  # the base is retrained (not in git)
    rep = json.loads(squeezer("report", str(run), "--json", "--no-files"))
    counts = rep["trial_counts"]
    assert counts["trained"] + counts["stopped"] == 7 and counts["sampled"] > 9
    new = [t for t in rep["trials"] if t["number"] >= 9 and t["reason"] in ("trained", "stopped")]
    assert new and all(isinstance(t["constraints"], dict) for t in rep["trials"])
    assert json.loads((run / "summary.json").read_text())["schema"] == "squeezer.summary/2"
    study = optuna.load_study(study_name="squeezer", storage=f"sqlite:///{run / 'study.db'}")
    assert study.user_attrs["chosen_trial"] == rep["best"]["trial"] == json.loads(
        (run / "best" / "metrics.json").read_text())["trial"]
