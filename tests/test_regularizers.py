"""Regularised training: slimming, SGL-ADMM (prune + quantize at once), OWL + affinity propagation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from squeezer.compressors.policy import LayerPolicy, Policy
from squeezer.compressors.regularizers import REGULARIZERS, _prunable, owl_weights, project_sgl_quant, prox_owl
from squeezer.evaluators.datasets import load_dataset
from squeezer.evaluators.finetune import regularized_train
from squeezer.evaluators.train import evaluate, train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(lenet_6k):
    m, tr, te, acc = lenet_6k
    return copy.deepcopy(m), tr, te, acc


def test_registry():
    assert {"slimming", "sgl_admm", "owl_ap"} <= set(REGULARIZERS.names())


def test_sgl_admm_zero_channels_on_grid_and_beats_direct_projection(setup):
    model, tr, te, base = setup
    pol = Policy(layers={"_default": LayerPolicy(prune_ratio=0.5, weight_bits=4)}, regularizer="sgl_admm")
    direct = copy.deepcopy(model)
    with torch.no_grad():
        for _, layer in _prunable(direct):
            layer.weight.copy_(project_sgl_quant(layer.weight, group_ratio=0.5, sparsity=0.0, bits=4))
    m = copy.deepcopy(model)
    stats = regularized_train(m, tr, pol, epochs=1, lr=0.01, progress=False)
    for name, layer in _prunable(m):
        w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        dead = w.abs().sum(1) == 0
        assert int(dead.sum()) == w.shape[0] // 2, name  # whole channels zero
        scale = w.abs().amax(1, keepdim=True).clamp_min(1e-12) / 7
        codes = w / scale
        assert torch.allclose(codes, codes.round(), atol=1e-3), name  # on the 4-bit grid
        assert codes.abs().max() <= 8
        assert len(torch.unique(w[~dead].flatten())) <= 16 * int((~dead).sum())
    assert stats["zero_channels"] == sum(l.weight.shape[0] // 2 for _, l in _prunable(m))
    assert evaluate(m, te) > evaluate(direct, te) + 0.02  # ADMM trained toward the set first


def test_owl_prox_ties_equal_magnitudes():
    v = torch.tensor([1.0, 0.98, 0.97, 0.2, 0.01])
    z = prox_owl(v, owl_weights(5, 0.01, 0.02))
    assert len(set(round(x, 6) for x in z[:3].tolist())) == 1  # the correlated trio is tied
    assert z[-1] == 0 and z[3] < v[3]


def test_owl_ap_ties_channels_with_bounded_drop(setup):
    model, tr, te, base = setup
    m = copy.deepcopy(model)
    stats = regularized_train(m, tr, Policy(regularizer="owl_ap"), epochs=1, lr=0.01, progress=False)
    unique = 0
    for _, layer in _prunable(m):
        w = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        unique += len(torch.unique(w, dim=0))
    assert unique == stats["unique_channels"] < 0.6 * stats["channels"]
    assert evaluate(m, te) > base - 0.04


def test_slimming_shrinks_bn_scales():
    d = load_dataset("digits")
    torch.manual_seed(0)
    net = lambda: nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(),
                                nn.Linear(16 * 64, 10))
    a, b = net(), net()
    b.load_state_dict(a.state_dict())
    train(a, d.train, epochs=3, lr=0.05, progress=False)
    regularized_train(b, d.train, Policy(regularizer="slimming"), epochs=3, lr=0.05, progress=False, retrain_fraction=0.0,
                      options={"strength": 0.2})
    assert b[1].weight.abs().sum() < 0.7 * a[1].weight.abs().sum()
