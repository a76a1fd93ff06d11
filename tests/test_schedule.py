"""Pruning schedules: gradual (cubic) sparsity and iterative channel pruning."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from squeezer.compressors.apply import apply_policy_
from squeezer.compressors.policy import Policy, PruningConfig
from squeezer.compressors.schedule import cubic_sparsity, gradual_sparsity_hook, prune_iteratively_
from squeezer.compressors.sparsity import attach_mask_, n_zero, weight_mask
from squeezer.evaluators.models import build_model

torch.set_num_threads(1)


def test_cubic_sparsity_rises_fast_then_slow_to_the_target():
    vals = [cubic_sparsity(t, 100, 0.9, 0.1) for t in range(0, 121)]
    assert vals[0] == pytest.approx(0.1) and vals[100] == pytest.approx(0.9) and vals[120] == pytest.approx(0.9)
    steps = [b - a for a, b in zip(vals, vals[1:101])]
    assert all(s >= 0 for s in steps) and steps[0] > 10 * steps[-1]  # most pruning early, gentle at the end
    with pytest.raises(ValueError, match="initial <= final"):
        cubic_sparsity(0, 10, 0.5, 0.6)
    with pytest.raises(ValueError, match="ramp_steps >= 1"):
        cubic_sparsity(0, 0, 0.5)


@pytest.mark.parametrize("method", ["dns", "magnitude"])
def test_gradual_hook_follows_the_schedule_exactly(method):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    attach_mask_(lin, 0.0, method)
    hook = gradual_sparsity_hook(lin, {lin: 0.8}, ramp_steps=20)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    x, y = torch.randn(128, 64), torch.randn(128, 32)
    cut_before = torch.zeros(32, 64, dtype=torch.bool)
    regrown = 0
    for step in range(1, 31):
        loss = ((lin(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        hook(lin, step)
        cut = weight_mask(lin).mask == 0
        assert int(cut.sum()) == n_zero(lin.weight.numel(), cubic_sparsity(step, 20, 0.8))
        regrown += int((cut_before & ~cut).sum())
        cut_before = cut
    if method == "magnitude":
        assert regrown == 0  # a fixed mask only ever cuts more
    else:
        assert regrown > 0  # DNS splices weights back while the dense weights keep training


def test_gradual_hook_needs_masked_layers():
    with pytest.raises(ValueError, match="carries a weight mask"):
        gradual_sparsity_hook(nn.Linear(4, 4), {nn.Linear(4, 4): 0.5}, ramp_steps=5)


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_iterative_pruning_removes_cumulative_fractions_of_the_original(name):
    torch.manual_seed(0)
    base = build_model(name, in_channels=1, num_classes=10)
    model = copy.deepcopy(base)
    data = [(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))) for _ in range(2)]
    fractions = (0.3, 0.5, 0.7)
    seen: list[int] = []

    def finetune(m: nn.Module, i: int) -> None:
        seen.append(sum(mod.out_channels for mod in m.modules() if isinstance(mod, nn.Conv2d)))

    pol = Policy(pruning=PruningConfig(criterion="saliency"))
    kept = prune_iteratively_(model, pol, (1, 28, 28), fractions, finetune=finetune, data=data)
    total = sum(kept.sizes.values())
    assert len(seen) == 3 and seen[0] > seen[1] > seen[2]
    assert total - sum(kept.values()) == int(0.7 * total)
    # relative to the original model: the resolved policy rebuilds these shapes on a fresh copy
    replay = copy.deepcopy(base)
    apply_policy_(replay, kept.resolved_policy(pol), (1, 28, 28))
    replay.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(replay.eval()(x), model.eval()(x), atol=1e-5)


def test_iterative_pruning_rejects_bad_fractions():
    m = build_model("lenet5", in_channels=1, num_classes=10)
    with pytest.raises(ValueError, match="increasing"):
        prune_iteratively_(m, Policy(), (1, 28, 28), (0.5, 0.3))
    with pytest.raises(ValueError, match="0 < fraction < 1"):
        prune_iteratively_(m, Policy(), (1, 28, 28), (0.5, 1.0))
