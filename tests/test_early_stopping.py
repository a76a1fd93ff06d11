"""Multi-fidelity: trials report validation accuracy at rungs; a bad one stops early, and
``squeezer report`` shows it as stopped at its rung with the accuracy it reported there,
never as over budget."""

from __future__ import annotations

import json
import re

import optuna
import pytest

from squeezer.search.backends.local import run_trials
from squeezer.search.config import SearchConfig
from squeezer.search.context import prepare
from squeezer.search.pipeline import start
from squeezer.search.report import format_report, report
from squeezer.search.rungs import RungPruner, peers_at
from squeezer.search.selection import choose_best
from squeezer.search.study import open_study, trained_trials
from squeezer.search.workload import named_workload


def test_rung_rule_keeps_the_best_fraction():
    cfg = SearchConfig(trial_steps=20, rungs="5,10", prune_eta=2, rung_min_trials=3)
    study = optuna.create_study(directions=["maximize", "minimize"])
    for acc in (0.9, 0.8):
        t = study.ask()
        t.set_user_attr("rung_acc", {"5": acc})
    assert not RungPruner(cfg).decide(peers_at(study, 10, but=99), 0.1, None)     # nobody else reached step 10
    assert RungPruner(cfg).decide(peers_at(study, 5, but=99), 0.5, None)          # below the best 1/2 of 3
    assert not RungPruner(cfg).decide(peers_at(study, 5, but=99), 0.95, None)     # the best goes on
    assert cfg.rung_steps == (5, 10)


def test_rung_rule_judges_a_trial_against_trials_at_least_as_fast():
    cfg = SearchConfig(trial_steps=20, rungs="5,10", prune_eta=2, rung_min_trials=3)
    study = optuna.create_study(directions=["maximize", "minimize"])
    for acc, lat in ((0.9, 10.0), (0.85, 8.0), (0.6, 3.0)):
        t = study.ask()
        t.set_user_attr("rung_acc", {"5": acc})
        t.set_user_attr("cost", {"latency_ms": lat})
    assert RungPruner(cfg).decide(peers_at(study, 5, but=99), 0.7, None)                   # all trials count: below the best 2
    assert RungPruner(cfg).decide(peers_at(study, 5, but=99), 0.7, 12.0)  # slower than all: the same
    assert not RungPruner(cfg).decide(peers_at(study, 5, but=99), 0.7, 4.0)   # only the 3 ms one is as fast
    assert RungPruner(cfg).decide(peers_at(study, 5, but=99), 0.7, 7.7)   # 8 ms is within the 5% slack
    assert not RungPruner(cfg).decide(peers_at(study, 5, but=99), 0.1, 2.0)   # the fastest always goes on
    assert RungPruner(cfg).decide(peers_at(study, 5, but=99), 0.5, 9.0)   # 8 ms and 3 ms peers beat it


def test_the_chosen_trial_is_the_fastest_within_the_tolerance():
    study = optuna.create_study(directions=["maximize", "minimize"])
    for acc, lat, cons in ((0.910, 10.0, -1.0), (0.906, 6.0, -1.0), (0.899, 3.0, -1.0), (0.95, 1.0, 5.0)):
        t = study.ask()
        t.set_user_attr("evaluated", True)
        t.set_user_attr("constraints", [cons])
        study.tell(t, [acc, lat])
    assert choose_best(study, 0.0)[0].values == [0.910, 10.0]       # the most accurate feasible
    assert choose_best(study, 0.5)[0].values == [0.906, 6.0]        # 0.4 pp less, 40% faster
    assert choose_best(study, 2.0)[0].values == [0.899, 3.0]        # never the infeasible 1 ms one
    # The reference is the base model's metric where the trials beat it, else the best trial's.
    assert choose_best(study, 0.5, base_metric=0.903)[0].values == [0.899, 3.0]   # 0.4 pp below the base
    assert choose_best(study, 0.5, base_metric=0.93)[0].values == [0.906, 6.0]    # base above: as without it
    assert choose_best(study, 0.0, base_metric=0.899)[0].values == [0.899, 3.0]   # 0: no loss against the base
    with pytest.raises(ValueError, match="tolerance"):
        SearchConfig(tolerance_pp=-1)


@pytest.mark.parametrize("rungs", ["0,5", "5,5", "30", "a,b"])
def test_bad_rungs_are_rejected(rungs):
    with pytest.raises(ValueError, match="rungs"):
        SearchConfig(trial_steps=20, rungs=rungs)


def test_a_destructive_policy_is_stopped_at_the_first_rung(tmp_path):
    cfg = SearchConfig(model="resnet20", dataset="digits", budget="2MB", base_epochs=4, trial_steps=16,
                       rungs="4,8", prune_eta=2, rung_min_trials=2, trials=3, sampler="random",
                       sensitivity=False, seed=1, run=str(tmp_path / "run"),
                       rung_latency_class=False)  # the bad policy is faster: compare with all trials
    run = tmp_path / "run"
    ctx = prepare(cfg, run, named_workload(cfg), progress=False)
    cfg.save(run / "config.yaml")
    study = open_study(cfg, run, space=ctx.space)
    sp = ctx.space
    good = sp.params_for(sp.uniform_policy(prune_ratio=0.0, weight_bits=8, act_bits=8))
    bad = sp.params_for(sp.uniform_policy(prune_ratio=0.75, weight_bits=8, act_bits=8))
    bad["kd_alpha"] = 0.0
    for p in (good, good, bad):
        study.enqueue_trial(p)
    run_trials(ctx, study, progress=False)
    trials = study.get_trials()
    first, last = trials[0], trials[2]
    assert first.state.name == "COMPLETE" and first.user_attrs["steps"] == 16    # nothing to compare with yet
    assert last.state.name == "PRUNED" and last.user_attrs["pruned_at"] == 4      # stopped at the first rung
    rec = json.loads((run / "trials" / "0002.json").read_text())
    assert rec["reason"] == "stopped" and rec["steps"] == 4 < cfg.trial_steps
    assert rec["rung_metric"]["4"] < first.user_attrs["rung_metric"]["4"]
    # Stopped trials count as trained: exactly the asked-for number ran, no more.
    assert len(trained_trials(study)) == 3 and len(trials) == 3

    rep = report(run)
    rows = {t["number"]: t for t in rep["trials"]}
    # Trial 1 repeats trial 0's policy; float noise between their runs may stop it too.
    states = ["stopped" if t.state.name == "PRUNED" else "trained" for t in trials]
    assert [rows[n]["reason"] for n in (0, 1, 2)] == states and states[0] == "trained" and states[2] == "stopped"
    assert rows[2]["state"] == "PRUNED" and rows[2]["pruned_at"] == 4 and rows[2]["val_metric"] is None
    assert rows[2]["rung_metric"] == {"4": last.user_attrs["rung_metric"]["4"]}
    text = format_report(rep)
    line = next(ln for ln in text.splitlines() if re.match(r"\s+2 ", ln))
    assert "over" not in line and "PRUNED" in line and "stopped@4" in line
    assert f"{100 * last.user_attrs['rung_metric']['4']:.2f}%@4" in line   # the accuracy it stopped with
    n = states.count("stopped")
    assert (f"trials: 3 sampled: {3 - n} trained to the end, {n} stopped early at a rung (3 count toward --trials), "
            f"0 over budget") in " ".join(text.split())     # (the line wraps)


def test_extend_runs_more_trials_before_the_final_stage(tmp_path):
    """``search(extend=)``: e.g. spend the fine-tune steps that rung-stopped trials left unspent."""
    cfg = SearchConfig(model="resnet20", dataset="digits", budget="2MB", base_epochs=4, trial_steps=8,
                       trials=2, sampler="random", sensitivity=False, seed=1, final_epochs=0.05,
                       run=str(tmp_path / "run"))
    asked = []

    def extend(study):
        asked.append(len(trained_trials(study)))
        return 2 if len(asked) == 1 else 0

    summary = start(cfg, progress=False, extend=extend)[1]
    assert asked == [2, 4]                            # asked after the first 2 trials, then after 2 more
    assert summary["trial_counts"]["trained"] + summary["trial_counts"]["stopped"] == 4
    assert SearchConfig.load(tmp_path / "run" / "config.yaml").trials == 4      # resume sees the real count
    assert summary["best"]["test_metric"] is not None                          # the final stage ran once, after
