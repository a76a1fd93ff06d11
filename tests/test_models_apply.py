"""Zoo models build; policies apply on residual/depthwise nets with exact shape predictions; checkpoints replay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from squeezer.compressors.apply import apply_policy_
from squeezer.compressors.policy import LayerPolicy, Policy
from squeezer.compressors.pruning import channel_groups
from squeezer.evaluators.checkpoint import load_checkpoint, save_checkpoint
from squeezer.evaluators.models import build_model


def _dims(m: nn.Module) -> tuple[int, int]:
    return (m.out_channels, m.in_channels) if isinstance(m, nn.Conv2d) else (m.out_features, m.in_features)


@pytest.mark.parametrize("name", ["lenet5", "resnet20", "vgg_small", "mobilenet_v2", "resnet18", "mobilenet_v3_small"])
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_pruning_keeps_forward_and_matches_predicted_shapes(name, ratio):
    torch.manual_seed(0)
    shape = (1, 28, 28) if name not in ("resnet18", "mobilenet_v3_small") else (3, 64, 64)
    m = build_model(name, in_channels=shape[0], num_classes=10)
    policy = Policy(layers={"_default": LayerPolicy(prune_ratio=ratio)})
    cg = channel_groups(m, shape)
    predicted = {n: (cg.kept(cg.out_segments[n], policy), cg.kept(cg.in_segments[n], policy)) for n in cg.out_segments}
    before = sum(p.numel() for p in m.parameters())
    apply_policy_(m, policy, shape)
    mods = dict(m.named_modules())
    assert {n: _dims(mods[n]) for n in predicted} == predicted
    out = m.eval()(torch.randn(2, *shape))
    assert out.shape == (2, 10)  # the classifier is never pruned
    assert sum(p.numel() for p in m.parameters()) < before * (1 - ratio / 2)


def test_residual_and_depthwise_layers_stay_coupled():
    m = build_model("mobilenet_v2", in_channels=1, num_classes=10)
    cg = channel_groups(m, (1, 28, 28))
    # A depthwise conv's channels are its producer's channels.
    dw = "features.2.conv.1.0"
    assert cg.out_segments[dw] == cg.out_segments["features.2.conv.0.0"]
    r = build_model("resnet20", in_channels=1, num_classes=10)
    cgr = channel_groups(r, (1, 28, 28))
    # Blocks joined by identity shortcuts share one group.
    assert cgr.out_segments["layer1.0.conv2"] == cgr.out_segments["layer1.2.conv2"] == cgr.out_segments["conv1"]


def test_low_rank_and_quantization_replay_from_checkpoint(tmp_path):
    torch.manual_seed(0)
    p = Policy(layers={"_default": LayerPolicy(prune_ratio=0.25, weight_bits=4, act_bits=8, rank_ratio=0.5,
                                               sparsity=0.3)})
    m = build_model("resnet20", in_channels=1, num_classes=10)
    r = apply_policy_(m, p, (1, 28, 28))
    assert "layer1.0.conv1" in r.decomposed and isinstance(m.layer1[0].conv1, nn.Sequential)
    x = torch.randn(4, 1, 28, 28)
    m.eval()
    y = m(x)
    path = save_checkpoint(tmp_path / "m.pt", m, model_name="resnet20", input_shape=(1, 28, 28), num_classes=10,
                           policy=p)
    raw = torch.load(path, weights_only=True)  # plain tensors and values only
    assert raw["format"] == "squeezer.model/1"
    m2 = load_checkpoint(path).model
    assert torch.allclose(m2(x), y, atol=1e-5)
    # 4-bit weights: at most 16 distinct values per output channel.
    w = m2.layer2[0].conv2[1].weight
    assert max(len(torch.unique(w[c])) for c in range(w.shape[0])) <= 16
    # 30% of the weights of each factor are exactly zero.
    assert abs(float((w == 0).float().mean()) - 0.3) < 0.05


def test_unknown_model_suggests_close_name():
    with pytest.raises(ValueError, match="did you mean 'resnet20'"):
        build_model("resnet20x")
