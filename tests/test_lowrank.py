"""Low-rank decompositions: error falls with rank on a trained layer; factors replace layers in place."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from squeezer.compressors.apply import apply_policy_
from squeezer.compressors.lowrank import DECOMPOSITIONS, rank_for_energy, ratio_for_energy, svd_rank
from squeezer.compressors.policy import LayerPolicy, Policy
from squeezer.evaluators.datasets import load_dataset
from squeezer.evaluators.models import build_model
from squeezer.evaluators.train import evaluate, train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained():
    d = load_dataset("digits")
    torch.manual_seed(0)
    m = build_model("resnet20", in_channels=1, num_classes=10)
    train(m, d.train, epochs=2, lr=0.05, progress=False)
    return m, d


@pytest.mark.parametrize("name", ["svd", "tucker2", "cp"])
def test_error_falls_with_rank_on_trained_layer(trained, name):
    model, d = trained
    conv = model.layer2[1].conv1  # 32 -> 32, 3x3, trained
    x = torch.randn(8, 32, 6, 6)
    with torch.no_grad():
        y = conv(x)
        errs = [float((DECOMPOSITIONS.get(name)(conv, r)(x) - y).norm() / y.norm()) for r in (0.125, 0.25, 0.5, 1.0)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    if name in ("svd", "tucker2"):
        assert errs[-1] < 1e-4  # full rank is exact


def test_factor_shapes():
    conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
    tk = DECOMPOSITIONS.get("tucker2")(conv, 0.5)
    assert [tuple(m.weight.shape) for m in tk] == [(8, 16, 1, 1), (16, 8, 3, 3), (32, 16, 1, 1)]
    cp = DECOMPOSITIONS.get("cp")(conv, 0.25)
    r = svd_rank(32, 16, 3, 3, 1, 0.25)
    assert [tuple(m.weight.shape) for m in cp] == [(r, 16, 1, 1), (r, 1, 3, 1), (r, 1, 1, 3), (32, r, 1, 1)]
    x = torch.randn(2, 16, 15, 15)
    assert cp(x).shape == tk(x).shape == conv(x).shape


def test_rank_for_energy_on_trained_layer(trained):
    model, _ = trained
    w = model.layer3[0].conv2.weight.detach()
    ranks = [rank_for_energy(w, e) for e in (0.5, 0.9, 0.99, 1.0)]
    assert ranks == sorted(ranks) and ranks[0] < ranks[-1] == min(w.shape[0], w[0].numel())
    r = ratio_for_energy(w, 0.9)
    assert svd_rank(w.shape[0], w.shape[1], 3, 3, 1, r) == ranks[1]


@pytest.mark.parametrize("name", ["tucker2", "cp"])
def test_inside_resnet20_via_apply_policy(trained, name):
    model, d = trained
    import copy

    m = copy.deepcopy(model)
    base = evaluate(model, d.test)
    pol = Policy(layers={"re:layer[23]\\..*conv[12]": LayerPolicy(rank_ratio=0.75, decomposition=name)})
    res = apply_policy_(m, pol, d.input_shape)
    assert len(res.decomposed) == 12
    assert isinstance(m.layer3[2].conv2, nn.Sequential)
    assert m(d.test.x[:4]).shape == (4, 10)
    assert evaluate(m, d.test) > base - 0.15  # a mild rank keeps the function close
