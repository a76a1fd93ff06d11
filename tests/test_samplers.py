"""Samplers: multi-objective TPE (default), NSGA-II, random, and the grid of uniform policies."""

from __future__ import annotations

import optuna
import pytest

from squeezer.search.config import SearchConfig
from squeezer.search.errors import UserError
from squeezer.search.samplers import UniformGridSampler, make_sampler
from squeezer.search.space import SearchSpace


@pytest.fixture(scope="module")
def space():
    from squeezer.evaluators.models import build_model

    return SearchSpace.build(build_model("lenet5", in_channels=1, num_classes=10), (1, 28, 28),
                             weight_bits=(4, 8), act_bits=(8, None))


def test_names_map_to_optuna_samplers(space):
    assert isinstance(make_sampler(SearchConfig(sampler="tpe")), optuna.samplers.TPESampler)
    assert isinstance(make_sampler(SearchConfig(sampler="nsga2")), optuna.samplers.NSGAIISampler)
    assert isinstance(make_sampler(SearchConfig(sampler="random")), optuna.samplers.RandomSampler)
    assert isinstance(make_sampler(SearchConfig(sampler="grid"), space=space), UniformGridSampler)
    with pytest.raises(UserError, match="unknown sampler 'nsga'; did you mean 'nsga2'"):
        make_sampler(SearchConfig(sampler="nsga"))


def test_default_tpe_is_multi_objective_with_constraints(space):
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler(SearchConfig(seed=0)))

    def obj(trial):
        pol = space.sample(trial)
        size = sum(lp.weight_bits or 32 for lp in pol.layers.values())
        trial.set_constraint("size", size / 60 - 1.0)
        return -size + (trial.params["kd_alpha"]), float(size)

    study.optimize(obj, n_trials=12)
    assert len(study.best_trials) >= 1 and all(len(t.values) == 2 for t in study.trials)


def test_grid_gives_every_uniform_policy_once_then_stops(space):
    sampler = make_sampler(SearchConfig(sampler="grid"), space=space)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)
    seen = []

    def obj(trial):
        pol = space.sample(trial)
        lps = [pol.for_layer(n) for n in space.layers]
        # Uniform: same bits everywhere; same ratio in every prunable group.
        assert len({lp.weight_bits for lp in lps}) == 1 and len({lp.act_bits for lp in lps}) == 1
        ratios = {trial.params[f"prune:{g}"] for g in space.groups}
        assert len(ratios) == 1
        seen.append((ratios.pop(), lps[0].weight_bits, lps[0].act_bits))
        return 0.5, 1.0

    def stop(study, trial):
        if sampler.exhausted(study):
            study.stop()

    study.optimize(obj, n_trials=100, callbacks=[stop])
    n = len(space.prune_choices) * len(space.weight_bits) * len(space.act_bits)
    assert len(seen) == n == len(set(seen))                 # every grid point exactly once
    assert seen[0] == (0.0, 8, None)                        # mildest first
