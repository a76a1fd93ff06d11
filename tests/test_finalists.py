"""Finalists: the fast end of the front is fine-tuned longer before the final choice."""

from __future__ import annotations

import json

import optuna
import pytest

from squeezer.search.config import SearchConfig
from squeezer.search.context import prepare
from squeezer.search.finalists import FINALISTS, choose_final, finalist_trials
from squeezer.search.finish import finish
from squeezer.search.report import chosen_line
from squeezer.search.selection import fastest_acceptable
from squeezer.search.workload import named_workload


def _study(points):
    """A study whose evaluated, feasible trials have these (short score, latency) values."""
    s = optuna.create_study(directions=["maximize", "minimize"])
    for acc, lat in points:
        t = s.ask()
        t.set_user_attr("evaluated", True)
        t.set_user_attr("constraints", {"size": -0.1})
        s.tell(t, [acc, lat])
    return s


def test_the_faster_finalist_wins_when_its_longer_fine_tune_catches_up(tmp_path):
    # Trial 0 is the most accurate after the short fine-tune; 2 is twice as fast but 2 points
    # behind; 3 is outside the margin; 1 is dominated.
    study = _study([(0.90, 4.0), (0.85, 5.0), (0.88, 2.0), (0.80, 1.0)])
    cfg = SearchConfig(finalists=3, finalist_epochs=0.5, finalist_margin_pp=3.0, tolerance_pp=0.5)
    assert [t.number for t in finalist_trials(study, finalists=3, tolerance_pp=0.5, margin_pp=3.0)] == [0, 2]
    longer = {0: 0.93, 2: 0.928}            # after the longer fine-tune: within 0.5 points
    calls = []

    def measure(t):
        calls.append(t.number)
        return longer[t.number]

    trial, status, record = choose_final(study, cfg, tmp_path, measure)
    assert (trial.number, status, calls) == (2, "feasible", [0, 2])
    on_disk = json.loads((tmp_path / FINALISTS).read_text())
    assert on_disk["chosen"] == 2 and on_disk["rule_choice"] == 0 and on_disk["candidates"] == [0, 2]
    assert [(r["number"], r["val_metric"]) for r in on_disk["trials"]] == [(0, 0.93), (2, 0.928)]
    # Resumed: nothing is measured again.
    assert choose_final(study, cfg, tmp_path, measure)[0].number == 2 and calls == [0, 2]
    # The longer fine-tune can also confirm the short scores: then the rule's choice stays.
    longer[2] = 0.91
    trial, _, _ = choose_final(study, cfg.with_(finalist_epochs=1.0), tmp_path, measure)  # other epochs: re-measured
    assert trial.number == 0 and calls == [0, 2, 0, 2]


def test_one_finalist_or_no_faster_trial_leaves_the_rule_alone(tmp_path):
    study = _study([(0.90, 4.0), (0.85, 2.0)])
    never = lambda t: pytest.fail("nothing to compare: no fine-tune")  # noqa: E731
    for cfg in (SearchConfig(finalists=1), SearchConfig(finalist_margin_pp=3.0)):   # 0.85 is 5 points behind
        trial, status, record = choose_final(study, cfg, tmp_path, never)
        assert (trial.number, status, record) == (0, "feasible", {})
    assert not (tmp_path / FINALISTS).exists()
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="finalists"):
            SearchConfig(finalists=bad)


def test_finish_fine_tunes_the_finalists_for_real_and_reports_them(tmp_path, monkeypatch):
    """The real final stage on digits: two policies enqueued as trials with short scores that
    make both finalists; each gets the final fine-tune and is scored on validation, the choice
    follows, and the chosen finalist's model is the final model (two fine-tunes, not three)."""
    import squeezer.search.finish as finish_module

    fine_tunes = []
    real = finish_module.compress_and_finetune
    monkeypatch.setattr(finish_module, "compress_and_finetune",
                        lambda *a, **k: fine_tunes.append(k["epochs"]) or real(*a, **k))
    run = tmp_path / "r"
    run.mkdir()
    cfg = SearchConfig(model="resnet20", dataset="digits", budget="300kB", base_epochs=2, final_epochs=1.0,
                       seed=3, sensitivity=False, run=str(run))
    cfg.save(run / "config.yaml")
    ctx = prepare(cfg, run, named_workload(cfg), progress=False)
    study = optuna.create_study(directions=["maximize", "minimize"])
    lat = {}
    base = ctx.base_metrics["val_metric"]
    for prune, short in ((0.0, base - 0.01), (0.5, base - 0.03)):   # as a trial with these fixed params would run
        study.enqueue_trial(ctx.space.params_for(ctx.space.uniform_policy(prune_ratio=prune, weight_bits=8,
                                                                          act_bits=8)))
        t = study.ask()
        lat[prune] = float(ctx.estimate(ctx.space.sample(t)).latency_ms)
        t.set_user_attr("evaluated", True)
        t.set_user_attr("constraints", {"size": -0.1})
        study.tell(t, [short, lat[prune]])
    assert lat[0.5] < lat[0.0]
    fine_tunes.clear()
    best = finish(ctx, study, progress=False)
    assert fine_tunes == [1.0, 1.0]
    record = json.loads((run / FINALISTS).read_text())
    scores = {r["number"]: r["val_metric"] for r in record["trials"]}
    assert record["candidates"] == [0, 1] and all(0 <= v <= 1 for v in scores.values())
    assert scores != {0: base - 0.01, 1: base - 0.03}           # measured, not the short scores
    expected = fastest_acceptable([(n, scores[n], lat[p]) for n, p in ((0, 0.0), (1, 0.5))], tolerance_pp=0.5,
                                  base_metric=base)
    assert best["trial"] == record["chosen"] == expected
    assert best["finalists"] == [{"number": n, "val_metric": scores[n]} for n in (0, 1)]
    assert "chosen among finalists fine-tuned for 1.0 epochs" in chosen_line(best, cfg.to_dict())
