"""The study as optuna-dashboard (the installed version, through its own WSGI app and serializer)
and Optuna's API show it: named objectives, constraints per trial, the chosen trial marked."""

from __future__ import annotations

import json
from pathlib import Path
from wsgiref.util import setup_testing_defaults

import optuna
import pytest

dashboard = pytest.importorskip("optuna_dashboard")  # the `test` extra installs it


def dashboard_get(storage: str, path: str) -> dict:
    """GET ``path`` from optuna-dashboard's own WSGI app (what its web page reads)."""
    app = dashboard.wsgi(storage)
    environ: dict = {}
    setup_testing_defaults(environ)
    environ["PATH_INFO"] = path
    status: list[str] = []
    body = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    assert status[0].startswith("200"), (status, body[:300])
    return json.loads(body)


def test_the_dashboard_shows_names_constraints_and_the_chosen_trial(digits_run):
    storage = f"sqlite:///{Path(digits_run) / 'study.db'}"
    best = json.loads((digits_run / "best" / "metrics.json").read_text())
    (summary,) = dashboard_get(storage, "/api/studies")["study_summaries"]
    detail = dashboard_get(storage, f"/api/studies/{summary['study_id']}")
    assert detail["objective_names"] == ["val_metric (accuracy)", "latency_ms (arm)"]
    study = optuna.load_study(study_name="squeezer", storage=storage)
    assert study.metric_names == detail["objective_names"]
    assert study.user_attrs["chosen_trial"] == best["trial"] and study.user_attrs["metric"] == "accuracy"
    assert study.user_attrs["constraint_names"] == ["size"]
    frozen = {t.number: t for t in study.trials}
    shown = {t["number"]: t for t in detail["trials"]}
    assert set(shown) == set(frozen) and len(shown) >= 3
    for n, t in frozen.items():
        named = t.user_attrs["constraints"]                       # {"size": cost / budget - 1}
        assert shown[n]["constraints"] == list(named.values()) == list(t.constraints.values())  # dashboard, Optuna
        assert (max(named.values()) <= 0) == (t.user_attrs.get("evaluated", False) or t.state.name == "PRUNED")
    # The study's note and the chosen trial's note say which trial was chosen and which numbers are whose.
    assert f"**squeezer chose trial {best['trial']}**" in detail["note"]["body"]
    assert "Objectives: `val_metric (accuracy)` (max)" in detail["note"]["body"]
    note = shown[best["trial"]]["note"]["body"]
    assert f"test accuracy {best['test_metric']:.4f}" in note and "search-time" in note
    assert all(not shown[n]["note"]["body"] for n in shown if n != best["trial"])


def test_a_second_note_replaces_the_first():
    from optuna_dashboard._note import get_note_from_system_attrs

    from squeezer.search.study import write_note

    s = optuna.create_study()
    s.tell(s.ask(), 1.0)
    write_note(s, "x" * 5000)
    write_note(s, "short")
    write_note(s, "trial", s.trials[0])
    attrs = s._storage.get_study_system_attrs(s._study_id)
    assert get_note_from_system_attrs(attrs, None) == {"version": 2, "body": "short"}
    assert get_note_from_system_attrs(attrs, s.trials[0]._trial_id)["body"] == "trial"
