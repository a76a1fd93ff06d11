"""Budgets parse exactly; policies validate, resolve and round-trip."""

from __future__ import annotations

import json

import pytest

from squeezer.compressors.policy import DistillConfig, LayerPolicy, Policy, PolicyError, PruningConfig
from squeezer.search.budget import parse_size


@pytest.mark.parametrize("text,expected", [
    ("2MB", 2_000_000), ("2MiB", 2_097_152), ("2 MB", 2_000_000), ("500kB", 500_000), ("500KiB", 512_000),
    ("1GB", 10**9), ("1GiB", 2**30), ("1.5MB", 1_500_000), ("123", 123), ("123B", 123), ("2mb", 2_000_000),
])
def test_budgets_parse_exactly(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MB", "2XB", "-2MB", "0MB", "0", "two MB", "2MB3", "nanMB", "infMB"])
def test_bad_budgets_are_rejected(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_layer_policy_validation_states_rule_and_value():
    with pytest.raises(ValueError, match=r"`0 <= prune_ratio < 1` must hold, but got prune_ratio=1.2"):
        LayerPolicy(prune_ratio=1.2)
    with pytest.raises(ValueError, match="weight_bits"):
        LayerPolicy(weight_bits=9)
    with pytest.raises(ValueError, match="rank_ratio"):
        LayerPolicy(rank_ratio=0.0)


def test_lookup_order_exact_then_regex_then_default():
    p = Policy(layers={"re:layer1\\..*": LayerPolicy(weight_bits=4), "layer1.0.conv1": LayerPolicy(weight_bits=8),
                       "_default": LayerPolicy(weight_bits=2)})
    assert p.for_layer("layer1.0.conv1").weight_bits == 8
    assert p.for_layer("layer1.1.conv2").weight_bits == 4
    assert p.for_layer("fc").weight_bits == 2
    assert Policy().for_layer("fc") == LayerPolicy()


def test_round_trip_json_and_yaml(tmp_path):
    p = Policy(layers={"a": LayerPolicy(prune_ratio=0.25, weight_bits=4, act_bits=8, rank_ratio=0.5),
                       "_default": LayerPolicy(sparsity=0.5, quantizer="lsq")},
               pruning=PruningConfig(criterion="taylor", global_ratio=0.3),
               distill=DistillConfig(temperature=3.0, alpha=0.7, hint_layers=("layer1",)), coding="huffman")
    for suffix in (".json", ".yaml"):
        path = p.save(tmp_path / f"p{suffix}")
        assert Policy.load(path) == p
    d = json.loads((tmp_path / "p.json").read_text())
    assert d["schema"] == "squeezer.policy/1"
    assert d["layers"]["a"] == {"prune_ratio": 0.25, "weight_bits": 4, "act_bits": 8, "rank_ratio": 0.5}


def test_old_schema_is_migrated_and_unknown_rejected(tmp_path):
    old = {"schema": "squeezer.policy/0", "layers": {"_default": {"bits": 4, "prune": 0.5}}}
    p = Policy.from_dict(old)
    assert p.for_layer("x").weight_bits == 4 and p.for_layer("x").prune_ratio == 0.5
    with pytest.raises(PolicyError, match="unsupported policy schema"):
        Policy.from_dict({"schema": "squeezer.policy/9", "layers": {}})
    with pytest.raises(PolicyError, match="unknown field"):
        Policy.from_dict({"schema": "squeezer.policy/1", "layers": {"_default": {"bitz": 4}}})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PolicyError, match="cannot parse"):
        Policy.load(bad)
