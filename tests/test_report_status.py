"""``squeezer report`` says what happened to each trial: an early-stopped trial is shown as
stopped at its rung with the accuracy it reported there, never as over budget."""

from __future__ import annotations

import re

import torch

from search import job
from search.config import SearchConfig
from search.report import format_report, report


def test_stopped_trials_show_their_rung_accuracy_not_over_budget(tmp_path):
    torch.set_num_threads(1)
    run = tmp_path / "run"
    cfg = SearchConfig(model="resnet20", dataset="digits", budget="2MB", base_epochs=2, trial_steps=12,
                       rungs="4,8", prune_eta=2, rung_min_trials=3, trials=3, sampler="random",
                       sensitivity=False, seed=1, run=str(run))
    ctx = job.prepare(cfg, run, progress=False)
    cfg.save(run / "config.yaml")
    study = job.open_study(cfg, run, create=True, space=ctx.space)
    sp = ctx.space
    good = sp.params_for(sp.uniform_policy(prune_ratio=0.0, weight_bits=8, act_bits=8))
    bad = sp.params_for(sp.uniform_policy(prune_ratio=0.75, weight_bits=2, act_bits=8))
    bad["kd_alpha"] = 0.0
    for p in (good, good, bad):
        study.enqueue_trial(p)
    job.run_trials(ctx, study, progress=False)
    stopped = study.trials[2]
    assert stopped.state.name == "PRUNED" and stopped.user_attrs["pruned_at"] == 4

    rep = report(run)
    rows = {t["number"]: t for t in rep["trials"]}
    assert [rows[n]["status"] for n in (0, 1, 2)] == ["trained", "trained", "stopped"]
    assert rows[2]["pruned_at"] == 4 and rows[2]["val_accuracy"] is None
    assert rows[2]["rung_accuracy"] == {"4": stopped.user_attrs["rung_acc"]["4"]}

    text = format_report(rep)
    line = next(ln for ln in text.splitlines() if re.match(r"\s+2 ", ln))
    assert "over" not in line and "stopped@4" in line
    assert f"{stopped.user_attrs['rung_acc']['4']:.4f}@4" in line       # the accuracy it stopped with
    assert "3 trained (1 stopped early at a rung), 0 rejected by the cost model" in text
