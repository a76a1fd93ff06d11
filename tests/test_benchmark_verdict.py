"""The goal check of ``benchmarks/search_vs_baselines.py`` (ours vs the best uniform policy)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "search_vs_baselines", Path(__file__).resolve().parents[1] / "benchmarks" / "search_vs_baselines.py")
svb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(svb)


def row(method, acc, lat, size=100, model="m", budget="1MB"):
    return {"model": model, "budget": budget, "method": method, "test_accuracy": acc, "latency_ms": lat,
            "size_bytes": size}


def test_one_point_more_accuracy_meets_the_goal_and_less_does_not():
    v = svb.verdict([row("uniform", 0.870, 4.0), row("ours", 0.880, 5.0)])
    assert v == [{"model": "m", "budget": "1MB", "baseline": "uniform", "accuracy_gain_pp": 1.0, "latency_reduction": -0.25,
                  "size_ratio": 1.0, "met": True}]
    assert not svb.verdict([row("uniform", 0.870, 4.0), row("ours", 0.8799, 5.0)])[0]["met"]


def test_a_quarter_less_latency_meets_it_only_at_equal_accuracy():
    assert svb.verdict([row("uniform", 0.870, 4.0), row("ours", 0.866, 3.0)])[0]["met"]           # -0.4 pp
    assert not svb.verdict([row("uniform", 0.870, 4.0), row("ours", 0.860, 3.0)])[0]["met"]       # -1.0 pp
    assert not svb.verdict([row("uniform", 0.870, 4.0), row("ours", 0.870, 3.1)])[0]["met"]       # 22.5% only
    assert not svb.verdict([row("uniform", 0.870, 4.0), row("ours", 0.866, 3.0)], equal_pp=0.2)[0]["met"]


def test_later_rows_replace_earlier_ones_and_incomplete_pairs_are_skipped():
    rows = [row("uniform", 0.870, 4.0), row("ours", 0.860, 4.0), row("random", 0.9, 1.0),
            row("ours", 0.885, 4.0), row("ours", 0.9, 1.0, budget="2MB")]
    v = svb.verdict(rows)
    assert [(x["budget"], x["accuracy_gain_pp"], x["met"]) for x in v] == [("1MB", 1.5, True)]


def test_the_latency_limited_search_can_meet_the_latency_half():
    base = [row("uniform", 0.870, 4.0), row("ours", 0.872, 4.5)]
    assert not svb.verdict(base)[0]["met"]
    fast = row("ours_fast", 0.867, 2.9)
    v = svb.verdict(base + [{**fast, "status": "feasible"}])[0]
    assert (v["fast_accuracy_gain_pp"], v["fast_latency_reduction"], v["met"]) == (-0.3, 0.275, True)
    assert not svb.verdict(base + [{**fast, "status": "infeasible"}])[0]["met"]   # it found nothing that fast
    assert not svb.verdict(base + [{**fast, "test_accuracy": 0.86, "status": "feasible"}])[0]["met"]


def test_ours_given_randoms_fine_tune_steps_can_meet_the_accuracy_half():
    base = [row("uniform", 0.870, 4.0), row("ours", 0.876, 4.5)]
    assert svb.verdict(base + [row("ours_matched", 0.881, 4.4)])[0]["met"]
    assert not svb.verdict(base + [row("ours_matched", 0.878, 4.4)])[0]["met"]


def test_gains_over_seeds_are_averaged_and_each_seed_checked_on_its_own():
    rows = []
    for seed, (uni, ours) in enumerate([(0.889, 0.8981), (0.8898, 0.8961), (0.8848, 0.8959)]):
        rows += [{**row("uniform", uni, 2.45), "seed": seed}, {**row("ours", ours, 5.3), "seed": seed}]
    rows.append({**row("ours", 0.95, 1.0), "seed": 3})  # no uniform row of seed 3: skipped
    (v,) = svb.verdict_over_seeds(rows)
    assert v["seeds"] == [0, 1, 2] and v["accuracy_gain_pp"] == [0.91, 0.63, 1.11]
    assert v["mean_gain_pp"] == 0.88 and v["sd_gain_pp"] == 0.24
    assert v["met_by_seed"] == [False, False, True] and v["mean_gain_meets_1pp"] is False
    # Rows without a seed are seed 0; a single seed has no spread.
    (one,) = svb.verdict_over_seeds([row("uniform", 0.87, 4.0), row("ours", 0.885, 4.0)])
    assert (one["seeds"], one["mean_gain_pp"], one["sd_gain_pp"], one["mean_gain_meets_1pp"]) == ([0], 1.5, None, True)


def test_the_best_uniform_policy_is_the_more_accurate_on_validation():
    # The grid's best is half the budget (coarse ratios); uniform_fit is at the budget and better.
    grid = {**row("uniform", 0.889, 2.45, size=71_240), "val_accuracy": 0.8944}
    ours = {**row("ours", 0.8991, 5.3, size=148_512), "val_accuracy": 0.9042}
    assert svb.verdict([grid, ours])[0]["met"]
    fit = {**row("uniform_fit", 0.895, 4.9, size=149_000), "val_accuracy": 0.9022}
    (v,) = svb.verdict([grid, ours, fit])
    assert v["baseline"] == "uniform_fit" and v["accuracy_gain_pp"] == 0.41 and v["size_ratio"] == 0.997
    assert v["vs_uniform"]["accuracy_gain_pp"] == 1.01 and v["vs_uniform"]["met"]   # for the record
    assert v["met"] is False
    # Validation decides, not test: a fit that tests better but validates worse is not the baseline.
    (v,) = svb.verdict([grid, ours, {**fit, "val_accuracy": 0.89}])
    assert v["baseline"] == "uniform" and v["met"]
    # A latency-limited search 25% faster than the fitted uniform at equal accuracy meets it.
    fast = {**row("ours_fast", 0.893, 3.6, size=120_000), "status": "feasible"}
    (v,) = svb.verdict([grid, ours, fit, fast])
    assert (v["fast_latency_reduction"], v["met"]) == (0.265, True)


def test_the_fitted_ratio_is_the_least_pruning_within_the_budget():
    size = lambda r: 1000 - 10 * int(100 * r)  # noqa: E731  (whole-channel steps of 1%)
    r = svb.largest_fitting_ratio(size, 700, iters=20)
    assert size(r) <= 700 and size(r - 0.01) > 700
    assert svb.largest_fitting_ratio(size, 1000, iters=20) == 0.0       # the unpruned model fits
    assert svb.largest_fitting_ratio(size, 10, iters=20) == 0.95        # nothing does: the most pruned


def test_over_seeds_the_gain_over_each_uniform_method_is_averaged_too():
    rows = []
    for seed, (uni, fit, ours) in enumerate([(0.889, 0.8953, 0.8981), (0.8898, 0.8961, 0.8961)]):
        rows += [{**row(m, a, 3.0), "seed": seed, "val_accuracy": a}
                 for m, a in (("uniform", uni), ("uniform_fit", fit), ("ours", ours))]
    (v,) = svb.verdict_over_seeds(rows)
    assert v["baseline"] == ["uniform_fit", "uniform_fit"]
    assert v["accuracy_gain_pp"] == v["uniform_fit_accuracy_gain_pp"] == [0.28, 0.0]
    assert v["uniform_accuracy_gain_pp"] == [0.91, 0.63] and v["uniform_mean_gain_pp"] == 0.77
    assert v["mean_gain_pp"] == 0.14 and v["mean_gain_meets_1pp"] is False


def test_over_seeds_the_latency_half_is_judged_on_the_mean_fast_gain():
    rows = []
    for seed, (fit, fast, lat) in enumerate([(0.8953, 0.8890, 3.34), (0.8961, 0.8881, 3.32), (0.8954, 0.8928, 3.40)]):
        rows += [{**row("uniform_fit", fit, 4.55), "seed": seed, "val_accuracy": fit},
                 {**row("ours", fit, 5.0), "seed": seed},
                 {**row("ours_fast", fast, lat), "seed": seed, "status": "feasible"}]
    (v,) = svb.verdict_over_seeds(rows)
    assert v["fast_accuracy_gain_pp"] == [-0.63, -0.8, -0.26] and v["fast_mean_gain_pp"] == -0.56
    assert v["fast_latency_reduction"] == [0.266, 0.27, 0.253]
    assert v["met_by_seed"] == [False, False, True] and v["fast_mean_meets_latency_half"] is False
    (v,) = svb.verdict_over_seeds(rows, equal_pp=0.6)                 # a wider band: the mean is inside
    assert v["fast_mean_meets_latency_half"] is True
    # Without ours_fast in every seed there is no fast summary.
    (v,) = svb.verdict_over_seeds([r for r in rows if not (r["method"] == "ours_fast" and r["seed"] == 2)])
    assert "fast_mean_gain_pp" not in v


def test_a_run_of_ours_fast_alone_is_judged_on_the_latency_half():
    """Re-running only the latency-limited search against each seed's uniform_fit (no ``ours``
    row) still gets its check; the accuracy-half fields are absent, not invented."""
    rows = []
    for seed, (fit, fast, lat) in enumerate([(0.897, 0.8945, 3.41), (0.8945, 0.8898, 2.70), (0.8967, 0.8937, 3.39)]):
        rows += [{**row("uniform_fit", fit, 4.55), "seed": seed, "val_accuracy": fit},
                 {**row("ours_fast", fast, lat), "seed": seed, "status": "feasible"}]
    (one,) = svb.verdict(rows[:2])
    assert "accuracy_gain_pp" not in one and one["fast_accuracy_gain_pp"] == -0.25 and one["met"]
    (v,) = svb.verdict_over_seeds(rows)
    assert v["fast_accuracy_gain_pp"] == [-0.25, -0.47, -0.3] and v["fast_mean_gain_pp"] == -0.34
    assert v["fast_mean_meets_latency_half"] is True and v["met_by_seed"] == [True, True, True]
    assert "mean_gain_pp" not in v and "mean_gain_meets_1pp" not in v
    # Nothing to judge without a uniform row.
    assert svb.verdict([r for r in rows if r["method"] == "ours_fast"]) == []
