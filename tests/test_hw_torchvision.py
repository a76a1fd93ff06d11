"""Pricing torchvision classifiers (issue 19): no channel groups unless a policy prunes, bounded
grouping, a priced model whatever Torch-Pruning does."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torchvision

from squeezer import hw_models
from squeezer.compressors.policy import LayerPolicy as LP
from squeezer.compressors.policy import Policy
from squeezer.compressors.pruning import GroupingError, channel_groups
from squeezer.evaluators.models import build_model

trace_module = sys.modules["squeezer.hw_models.trace"]  # the module (hw_models.trace is the function)
PRUNE = Policy(layers={"_default": LP(prune_ratio=0.5)})


def _group_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "channel groups" in str(w.message)]


def test_a_model_torch_pruning_cannot_group_is_priced_unpruned_with_one_line():
    m = torchvision.models.swin_t(weights=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = hw_models.estimate(m, (3, 64, 64), "arm-a72", PRUNE)
        plain = hw_models.estimate(m, (3, 64, 64), "arm-a72")   # no policy: no grouping, no line
    lines = _group_warnings(caught)
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "GroupingError" in lines[0] and "priced unpruned" in lines[0]
    assert pruned.latency_ms > 0 and pruned.energy_mj > 0 and pruned.size_bytes > 0
    assert (pruned.macs, pruned.size_bytes, pruned.latency_ms) == (plain.macs, plain.size_bytes, plain.latency_ms)


def test_groups_are_found_only_when_the_policy_prunes(monkeypatch):
    calls = []
    monkeypatch.setattr(trace_module, "channel_groups", lambda *a, **k: calls.append(a) or channel_groups(*a, **k))
    m = build_model("resnet20", in_channels=3, num_classes=10)
    q8 = hw_models.estimate(m, (3, 32, 32), "arm-a72", Policy(layers={"_default": LP(weight_bits=8)}))
    assert not calls
    pruned = hw_models.estimate(m, (3, 32, 32), "arm-a72", PRUNE)
    assert len(calls) == 1 and pruned.macs < q8.macs


@pytest.mark.parametrize("error", [MemoryError(), IndexError("list index out of range"), GroupingError("x\ny")])
def test_any_grouping_failure_gives_a_table_and_one_line(monkeypatch, error):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(trace_module, "channel_groups", fail)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = hw_models.trace(build_model("lenet5", in_channels=1, num_classes=10), (1, 28, 28))
    lines = _group_warnings(caught)
    assert len(lines) == 1 and "\n" not in lines[0] and type(error).__name__ in lines[0]
    assert not t.group_sizes and t.macs > 0


def test_grouping_gives_up_past_its_limits():
    m = build_model("lenet5", in_channels=1, num_classes=10)   # conv2 -> flatten -> fc1: its group maps 16 x 5 x 5 indices 4 times
    with pytest.raises(GroupingError, match="maps <= 1,599 indices"):
        channel_groups(m, (1, 28, 28), max_indices=1599)
    with pytest.raises(GroupingError, match="takes <= 0 s"):
        channel_groups(m, (1, 28, 28), seconds=0)
    assert len(channel_groups(m, (1, 28, 28), max_indices=1600).sizes) > 0


def test_shufflenet_macs_count_the_channel_split():
    """Issue 19: 9.04 M by the cost model vs 11.76 M by fvcore's conv + linear count; fvcore is right.
    The trace lost the producer of the split's second half, so the cost model read the branch's
    first 1x1 conv as taking the model's 3 input channels instead of 58."""
    m = build_model("shufflenet_v2_x1_0", in_channels=3, num_classes=10)
    table = hw_models.trace(m, (3, 64, 64), groups=False)
    cost = hw_models.estimate_table(table, None, "arm-a72")
    # one stride-1 block of stage 2 by hand (116 channels at 8 x 8): the split passes 58 channels
    # through untouched and 58 to the branch, 1x1 58->58, depthwise 3x3, 1x1 58->58; the
    # concatenation and the channel shuffle (view, transpose) multiply nothing
    assert sum(l.macs for l in cost.layers if l.name.startswith("stage2.1.")) == 2 * 58 * 58 * 64 + 58 * 9 * 64
    assert table["stage2.1.branch2.0"].in_channels == 58
    assert cost.macs == table.macs == 11_755_872


def _fvcore_macs(m: torch.nn.Module, shape: tuple[int, ...]) -> int:
    from fvcore.nn import FlopCountAnalysis

    fca = FlopCountAnalysis(m.eval(), torch.zeros(1, *shape))
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return sum(v for k, v in fca.by_operator().items() if k in ("conv", "linear", "matmul", "einsum", "bmm", "addmm"))


def _params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_attention_models_price_every_parameter_and_multiply_accumulate():
    # swin's window attention is one function to torch.fx (F.linear on the module's weights, matmuls inside)
    swin = torchvision.models.swin_t(weights=None)
    cost = hw_models.estimate(swin, (3, 64, 64), "arm-a72")
    assert cost.size_bytes == 4 * _params(swin)            # no BatchNorm: every parameter stored in fp32
    assert cost.macs == _fvcore_macs(swin, (3, 64, 64))
    # a ViT: class token, position embedding and nn.MultiheadAttention (a tuple-returning leaf)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                               hidden_dim=32, mlp_dim=64, num_classes=10)
    cost = hw_models.estimate(vit, (3, 32, 32), "arm-a72")
    assert cost.size_bytes == 4 * _params(vit)
    # fvcore does not count the attention products (scores and weighted sum: 2 x 17 tokens^2 x 32 per layer)
    assert cost.macs == _fvcore_macs(vit, (3, 32, 32)) + 2 * (2 * 17 * 17 * 32)
    attention = next(l for l in cost.layers if l.name.endswith("layer_0.self_attention"))
    # q, output projections 2 x 17 x 32^2, k and v 17 x (32 + 32) x 32, products 2 x 17^2 x 32
    assert attention.macs == 2 * 17 * 32 * 32 + 17 * 64 * 32 + 2 * 17 * 17 * 32


def _benchmark():
    spec = importlib.util.spec_from_file_location(
        "price_torchvision", Path(__file__).resolve().parents[1] / "benchmarks" / "price_torchvision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_every_torchvision_classifier_is_priced_in_one_process():
    """Issue 19: ``benchmarks/price_torchvision.py`` (BENCHMARKS.md has its table)."""
    rows, summary = _benchmark().price_all(progress=print)
    print(summary)
    assert len(rows) == len(torchvision.models.list_models(module=torchvision.models)) >= 80
    assert not summary["failures"], [(r["model"], r["error"]) for r in rows if "error" in r]
    for r in rows:
        assert r["latency_ms"] > 0 and r["energy_mj"] > 0 and r["size_bytes"] > 0, r
        # 4 bytes per fp32 parameter, but a BatchNorm that folds into its conv is stored inside it
        # (scale in the weights, shift in the bias: vgg11_bn is exactly 4 x (params - BN params))
        assert r["size_bytes"] >= 4 * (r["params"] - r["bn_params"]), r
    assert summary["peak_rss_mb"] < 4096, summary
