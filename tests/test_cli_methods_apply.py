"""`squeezer methods` and `squeezer apply` through the real CLI entry point."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from squeezer.search.cli import main

torch.set_num_threads(1)


def tiny_net(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """A small BN CNN for 8x8 digits (fast enough for a CLI test)."""
    return nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, num_classes))


MODEL = f"{__name__}:tiny_net"


def test_methods_lists_every_kind(capsys):
    assert main(["methods", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"pruning_criteria", "sparsity_methods", "quantizers", "sharing", "decompositions",
                         "regularizers", "distillation"}
    assert {"l1", "bn_scale", "taylor", "saliency", "hardware_balanced"} <= set(data["pruning_criteria"])
    assert {"magnitude", "dns"} <= set(data["sparsity_methods"])
    assert {"svd", "tucker2", "cp"} <= set(data["decompositions"])
    assert {"hinton", "fitnets", "attention"} <= set(data["distillation"])
    assert {"sgl_admm", "owl_ap"} <= set(data["regularizers"])
    assert all(isinstance(s, str) and s for kind in data.values() for s in kind.values())
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert "pruning_criteria" in text and "taylor" in text


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("apply")

    def go(policy: dict | str, *extra: str) -> tuple[int, str, str]:
        path = root / "policy.json"
        path.write_text(policy if isinstance(policy, str) else json.dumps(policy))
        import io
        from contextlib import redirect_stderr, redirect_stdout

        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            rc = main(["apply", str(path), "--model", MODEL, "--dataset", "digits", "--base-epochs", "4",
                       "--cache", str(root / "cache"), *extra])
        return rc, out.getvalue(), err.getvalue()
    return go


def test_apply_reports_compressed_and_base_figures(run):
    policy = {"schema": "squeezer.policy/1",
              "layers": {"_default": {"weight_bits": 8, "prune_ratio": 0.25}},
              "pruning": {"criterion": "taylor"}, "distill": {"method": "hinton"}}
    rc, out, err = run(policy, "--finetune-epochs", "2", "--lr", "0.02", "--json")
    assert rc == 0, err
    r = json.loads(out)
    base = r["base"]
    assert r["schema"] == "squeezer.apply/2" and r["metric"] == "accuracy"
    assert base["test_metric"] > 0.8
    assert r["test_metric"] > base["test_metric"] - 0.1
    assert r["size_bytes"] < base["size_bytes"] / 3  # 8-bit and a quarter of the channels gone
    for key in ("latency_ms", "energy_mj"):
        assert key in r and key in base
    # The printed policy is resolved: explicit per-group ratios that predict the kept channels.
    assert r["policy"]["layers"]["0"]["prune_ratio"] == pytest.approx(0.25)
    # Second run reuses the cached base model (same base accuracy) and prints a table.
    rc, out, _ = run(policy, "--finetune-epochs", "0")
    assert rc == 0 and "test accuracy" in out and "base" in out and "size" in out


@pytest.mark.parametrize("text,needle", [
    ("{oops", "cannot parse"),
    ('{"layers": {}}', "schema"),
    ('{"schema": "squeezer.policy/1", "pruning": {"criterion": "taylr"}}', "did you mean 'taylor'"),
    ('{"schema": "squeezer.policy/1", "layers": {"_default": {"prune_ratio": 1.5}}}', "prune_ratio"),
    ('{"schema": "squeezer.policy/1", "sparsity": {"method": "dnss"}}', "dns"),
])
def test_bad_policy_is_a_user_error(run, text, needle):
    rc, out, err = run(text, "--finetune-epochs", "0")
    assert rc == 2
    assert err.startswith("squeezer: error:") and needle in err and "Traceback" not in err
