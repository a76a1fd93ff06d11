"""Targets: every shipped file loads and validates; malformed files are rejected by field name."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from squeezer import hw_models
from squeezer.hw_models.targets import (
    TARGETS_DIR,
    Target,
    TargetError,
    get_target,
    list_targets,
    load_target,
    save_target,
)

REQUIRED = ["arm-a53", "arm-a72", "arm-a76", "arm-m7", "arm-m4", "host", "eyeriss", "edge-gpu"]


def test_required_targets_are_shipped():
    assert set(REQUIRED) <= set(list_targets())


@pytest.mark.parametrize("name", sorted(p.stem for p in TARGETS_DIR.glob("*.yaml")))
def test_every_target_file_loads_and_validates(name):
    t = get_target(name)
    assert isinstance(t, Target) and t.name == name
    for b in t.compute_bits:
        assert set(t.throughput_gmacs[b]) >= {"conv", "pointwise", "dwconv", "linear"}
    assert [m.size_bytes for m in t.memory] == sorted(m.size_bytes for m in t.memory)
    assert t.sources, "every target cites its figures"
    # a width the target cannot compute runs at the next width it can
    assert t.compute_width(1) == min(t.compute_bits)
    assert t.compute_width(32) in t.compute_bits


def test_alias_and_capacities():
    assert get_target("arm").name == "arm-a72"
    m7 = get_target("arm-m7")
    assert m7.capacity["flash_bytes"] == 2 * 1024 * 1024
    assert m7.capacity["sram_bytes"] == 1024 * 1024
    assert m7.capacity["sram_contiguous_bytes"] == 512 * 1024
    assert 8 in m7.compute_bits and m7.compute_width(4) == 8
    assert get_target("arm-a72").compute_bits == (8, 16, 32)


def test_unknown_target_says_did_you_mean():
    with pytest.raises(ValueError, match=r"unknown target 'arm-a27'; did you mean 'arm-a72'\?"):
        get_target("arm-a27")


def _raw(name="arm-a72"):
    return yaml.safe_load((TARGETS_DIR / f"{name}.yaml").read_text())


@pytest.mark.parametrize("field", ["name", "compute_bits", "throughput_gmacs", "memory", "mac_energy_pj",
                                   "overhead_us", "capacity", "sources", "storage_bits", "device_class"])
def test_incomplete_file_rejected_naming_the_field(tmp_path, field):
    d = _raw()
    del d[field]
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(TargetError, match=f"missing required field '{field}'"):
        load_target(p)


@pytest.mark.parametrize("path,expected", [
    (("memory", 1, "bandwidth_gbps"), "memory[1].bandwidth_gbps"),
    (("throughput_gmacs", 8, "dwconv"), "throughput_gmacs.8.dwconv"),
    (("capacity", "flash_bytes"), "capacity.flash_bytes"),
    (("overhead_us", "default"), "overhead_us.default"),
])
def test_nested_missing_field_named(tmp_path, path, expected):
    d = _raw()
    node = d
    for k in path[:-1]:
        node = node[k]
    del node[path[-1]]
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(TargetError, match=re.escape(f"'{expected}'")):
        load_target(p)


def test_missing_provenance_rejected(tmp_path):
    d = _raw()
    d["sources"] = {k: v for k, v in d["sources"].items() if not k.startswith("memory")}
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(TargetError, match="sources.memory"):
        load_target(p)


def test_bad_values_state_rule_and_value(tmp_path):
    d = _raw()
    d["device_class"] = "toaster"
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(TargetError, match=r"`device_class in .*` must hold, but got device_class='toaster'"):
        load_target(p)
    p.write_text("name: [unclosed")
    with pytest.raises(TargetError, match="cannot parse YAML"):
        load_target(p)


def test_round_trip_and_path_loading(tmp_path):
    for name in REQUIRED:
        t = get_target(name)
        p = save_target(t, tmp_path / f"{name}-copy.yaml")
        again = get_target(str(p))
        assert again == t
        assert Target.from_dict(copy.deepcopy(t.to_dict())) == t


def test_describe_target_is_json_ready():
    import json

    d = hw_models.describe_target("arm")
    assert d["name"] == "arm-a72" and "arm" in d["aliases"]
    json.dumps(d)
