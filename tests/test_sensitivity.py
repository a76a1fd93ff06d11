"""Sensitivity first: per-layer probes, cached; they narrow the space and seed the search."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from search import job
from search.config import SearchConfig
from search.sensitivity import (guided_params, load_or_measure, narrowed_choices, project_params,
                                space_choices)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    run = tmp_path_factory.mktemp("sens") / "r"
    cfg = SearchConfig(model="resnet20", dataset="digits", budget="60kB", base_epochs=4, seed=1, run=str(run))
    run.mkdir(parents=True)
    cfg.save(run / "config.yaml")
    return job.prepare(cfg, run, progress=False)


def test_probes_cover_the_space_and_are_cached(ctx):
    sens = load_or_measure(ctx)
    path = ctx.run_dir / "sensitivity.json"
    mtime = path.stat().st_mtime_ns
    choices = space_choices(ctx.space)
    assert set(sens["probes"]) == set(choices)
    for dim, cs in choices.items():
        assert {("none" if c is None else str(c)) for c in cs} == set(sens["probes"][dim])
    # The damage is real: removing 75% of the stem's channels costs more than 25% of them.
    stem = sens["probes"]["prune:conv1"]
    assert stem["0.75"] > stem["0.25"] and stem["0.75"] > 10
    assert load_or_measure(ctx) == sens and path.stat().st_mtime_ns == mtime       # cached, not re-measured
    r = subprocess.run([sys.executable, "-m", "search.cli", "sensitivity", str(ctx.run_dir), "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["probes"] == sens["probes"]


def test_narrowing_drops_damaging_choices_and_keeps_the_mildest(ctx):
    sens = load_or_measure(ctx)
    full = space_choices(ctx.space)
    narrowed = narrowed_choices(sens, full, threshold_pp=10.0)
    assert narrowed, "some probe of resnet20 loses > 10 pp"
    for dim, keep in narrowed.items():
        row = sens["probes"][dim]
        assert keep and all(row["none" if c is None else str(c)] <= 10.0 or c in (0.0, None) for c in keep)
        dropped = set(full[dim]) - set(keep)
        assert dropped and all(row["none" if c is None else str(c)] > 10.0 for c in dropped)
    projected = project_params({d: v[-1] for d, v in full.items()}, narrowed)
    assert all(projected[d] in narrowed.get(d, full[d]) for d in full)


def test_guided_seed_meets_the_budget_with_the_least_damage(ctx):
    sens = load_or_measure(ctx)
    sram = job.target_sram(ctx.target)

    def fits(pol):
        cost = ctx.estimate(pol)
        return max(job.constraints_of(cost, ctx.cfg, sram)) <= 0, float(cost.size_bytes)

    params = guided_params(ctx.space, sens, fits)
    assert params is not None
    pol = ctx.space.policy_from_params(params)
    assert ctx.estimate(pol).size_bytes <= ctx.cfg.budget_bytes
    # The stem (the most sensitive group to prune) stays less pruned than the typical group.
    ratios = [params[f"prune:{g}"] for g in ctx.space.groups]
    assert params["prune:conv1"] <= sorted(ratios)[len(ratios) // 2]
