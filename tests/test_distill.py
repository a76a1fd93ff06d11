"""Distillation: soft targets, FitNets hints and attention transfer help a pruned student."""

from __future__ import annotations

import copy

import pytest
import torch

from squeezer.compressors.apply import apply_policy_
from squeezer.compressors.distill import DISTILLATION, FitNetsDistiller, attention_map, make_distiller
from squeezer.compressors.policy import DistillConfig, LayerPolicy, Policy
from squeezer.evaluators.datasets import load_dataset
from squeezer.evaluators.models import build_model
from squeezer.evaluators.train import evaluate, train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup():
    d = load_dataset("fashion-mnist")
    torch.manual_seed(0)
    teacher = build_model("lenet5", in_channels=1, num_classes=10)
    train(teacher, d.train.subset(8000), epochs=6, lr=0.05, progress=False)
    student = copy.deepcopy(teacher)
    apply_policy_(student, Policy(layers={"_default": LayerPolicy(prune_ratio=0.7)}), d.input_shape)
    return teacher, student, d.train.subset(500, seed=5), d.test.subset(2000)


def _finetune(setup, method):
    teacher, student, small, test = setup
    accs = []
    for seed in (0, 1):
        s = copy.deepcopy(student)
        cfg = None if method is None else DistillConfig(method=method, alpha=0.9, temperature=4)
        train(s, small, epochs=4, lr=0.01, seed=seed, teacher=teacher if cfg else None, distill=cfg, progress=False)
        accs.append(evaluate(s, test))
    return sum(accs) / 2


@pytest.fixture(scope="module")
def no_kd(setup):
    return _finetune(setup, None)


@pytest.mark.parametrize("method,margin", [("hinton", 0.03), ("attention", 0.03), ("fitnets", 0.01)])
def test_kd_beats_no_kd_at_equal_budget(setup, no_kd, method, margin):
    assert _finetune(setup, method) > no_kd + margin


def test_fitnets_regressor_is_trained_and_hooks_removed(setup):
    teacher, student, small, _ = setup
    s = copy.deepcopy(student)
    cfg = DistillConfig(method="fitnets", alpha=0.5, hint_layers=("features",))
    d = make_distiller(cfg, s, teacher)
    assert isinstance(d, FitNetsDistiller)
    opt = torch.optim.SGD(s.parameters(), lr=0.01)
    xb, yb = small.x[:64], small.y[:64]
    snapshots = []
    for _ in range(4):
        out = s(xb)
        with torch.no_grad():
            t_out = teacher(xb)
        loss = d.loss(out, t_out, yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        snapshots.append(torch.cat([p.detach().flatten().clone() for p in d.parameters()]))
    reg = d.regressors["features"]
    assert reg.weight.shape[:2] == (teacher.features[3].out_channels, s.features[3].out_channels)
    assert not torch.allclose(snapshots[0], snapshots[-1])  # the regressor learns
    d.close()
    assert not any(m._forward_hooks for m in s.modules()) and not any(m._forward_hooks for m in teacher.modules())


def test_attention_map_properties():
    f = torch.randn(4, 16, 7, 7)
    a = attention_map(f)
    assert torch.allclose(a.norm(dim=1), torch.ones(4))
    # Channel count does not matter, only where the energy is.
    assert torch.allclose(attention_map(torch.cat([f, f], 1)), a, atol=1e-6)
    with pytest.raises(ValueError, match="hint layer"):
        DISTILLATION.get("attention")(DistillConfig(method="attention", hint_layers=("nope",)),
                                      build_model("lenet5", in_channels=1, num_classes=10),
                                      build_model("lenet5", in_channels=1, num_classes=10))
