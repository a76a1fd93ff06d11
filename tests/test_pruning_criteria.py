"""Structured pruning criteria: defining properties on a trained LeNet-5 (Fashion-MNIST subset)
and dependency-aware structure on residual, depthwise and concatenating networks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from squeezer.compressors.policy import LayerPolicy, Policy, PruningConfig
from squeezer.compressors.pruning import (
    PRUNING_CRITERIA,
    PruneContext,
    build_graph,
    channel_groups,
    kept_channels,
    prune_,
)
from squeezer.evaluators.datasets import load_dataset
from squeezer.evaluators.models import build_model
from squeezer.evaluators.train import evaluate, train

torch.set_num_threads(1)
SHAPE = (1, 28, 28)


@pytest.fixture(scope="module")
def fmnist():
    d = load_dataset("fashion-mnist")
    return d.train.subset(6000), d.test.subset(2000)


@pytest.fixture(scope="module")
def lenet(fmnist):
    tr, _ = fmnist
    torch.manual_seed(0)
    m = build_model("lenet5", in_channels=1, num_classes=10)
    train(m, tr, epochs=4, lr=0.05, progress=False)
    return m


def _pruned_acc(model, data, test, crit, *, ratio=None, global_ratio=None):
    m = copy.deepcopy(model)
    layers = {"_default": LayerPolicy(prune_ratio=ratio)} if ratio else {}
    res = prune_(m, Policy(layers=layers, pruning=PruningConfig(criterion=crit, global_ratio=global_ratio)),
                 SHAPE, data=data)
    return evaluate(m, test), res


def _group_scores(model, data, crit, root):
    ctx = PruneContext(model=model, data=data)
    imp = PRUNING_CRITERIA.get(crit)(ctx)
    if hasattr(imp, "prepare"):
        imp.prepare(ctx)
    dg = build_graph(model, SHAPE)
    mod = model.get_submodule(root)
    g = dg.get_pruning_group(mod, dg.get_pruner_of_module(mod).prune_out_channels,
                             idxs=list(range(mod.weight.shape[0])))
    with torch.no_grad():
        return imp(g)


@pytest.mark.parametrize("crit", ["taylor", "saliency"])
def test_data_driven_ranking_differs_from_magnitude(lenet, fmnist, crit):
    tr, _ = fmnist
    from scipy.stats import spearmanr

    for root in ("features.3", "classifier.1"):
        s = _group_scores(lenet, tr, crit, root)
        l1 = _group_scores(lenet, tr, "l1", root)
        assert s.shape == l1.shape
        assert spearmanr(s.numpy(), l1.numpy()).correlation < 0.9
        k = len(s) // 2
        assert set(torch.argsort(s)[:k].tolist()) != set(torch.argsort(l1)[:k].tolist())


@pytest.mark.parametrize("crit", ["taylor", "saliency", "lasso"])
def test_data_driven_beats_magnitude_before_finetune(lenet, fmnist, crit):
    """Loss-aware criteria keep more accuracy than L1 at equal pruning, no fine-tune (mean of 2 ratios)."""
    tr, te = fmnist
    ours = [_pruned_acc(lenet, tr, te, crit, ratio=r)[0] for r in (0.3, 0.5)]
    l1 = [_pruned_acc(lenet, tr, te, "l1", ratio=r)[0] for r in (0.3, 0.5)]
    assert sum(ours) / 2 > sum(l1) / 2, (ours, l1)


def test_saliency_global_ratio_gives_nonuniform_exact_policy(lenet, fmnist):
    tr, te = fmnist
    acc_s, res = _pruned_acc(lenet, tr, te, "saliency", global_ratio=0.5)
    acc_l1, _ = _pruned_acc(lenet, tr, te, "l1", global_ratio=0.5)
    ratios = res.ratios()
    assert len({round(r, 3) for r in ratios.values()}) > 1, ratios  # per-layer rates differ
    total = sum(res.sizes.values())
    assert sum(res.sizes[g] - k for g, k in res.items()) == int(total * 0.5)  # one global rate
    assert acc_s > acc_l1
    # The resolved policy replays the same shapes on a fresh model and predicts them exactly.
    policy = res.resolved_policy(Policy(pruning=PruningConfig(criterion="saliency", global_ratio=0.5)))
    assert policy.pruning.global_ratio is None
    fresh = build_model("lenet5", in_channels=1, num_classes=10)
    cg = channel_groups(fresh, SHAPE)
    assert dict(prune_(fresh, policy, SHAPE)) == dict(res)
    pruned = copy.deepcopy(lenet)
    prune_(pruned, Policy(pruning=PruningConfig(criterion="saliency", global_ratio=0.5)), SHAPE, data=tr)
    fresh.load_state_dict(pruned.state_dict())
    for name, m in fresh.named_modules():
        if isinstance(m, nn.Conv2d):
            assert m.out_channels == cg.kept(cg.out_segments[name], policy)


def test_lasso_reconstruction_refits_next_layer(lenet, fmnist):
    """He et al.: after LASSO selection the next conv is refitted by least squares (weights change)."""
    tr, te = fmnist
    pol = Policy(layers={"features.0": LayerPolicy(prune_ratio=0.5)}, pruning=PruningConfig(criterion="lasso"))
    m = copy.deepcopy(lenet)
    prune_(m, pol, SHAPE, data=tr)
    kept = m.features[0].out_channels
    assert kept == 3
    # Same channels removed without reconstruction: slice the original weights.
    ref = copy.deepcopy(lenet)
    keep = [i for i in range(6) if any(torch.equal(ref.features[0].weight[i], w) for w in m.features[0].weight)]
    assert len(keep) == 3
    assert not torch.allclose(m.features[3].weight, ref.features[3].weight[:, keep])
    with torch.no_grad():
        naive = copy.deepcopy(m)
        naive.features[3].weight.copy_(ref.features[3].weight[:, keep])
    assert evaluate(m, te) > evaluate(naive, te)


def test_bn_scale_drops_small_gammas():
    torch.manual_seed(0)
    m = build_model("vgg_small", in_channels=1, num_classes=10)
    bn = m.features[1]
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.0)
        bn.weight[[3, 7, 11]] = 1e-3
        keep_w = m.features[0].weight[[0, 1, 2]].clone()
    prune_(m, Policy(layers={"features.0": LayerPolicy(prune_ratio=3 / 64)},
                     pruning=PruningConfig(criterion="bn_scale")), SHAPE)
    assert m.features[0].out_channels == 61
    assert bn.weight.min() > 0.4  # the three near-zero gammas went
    assert torch.equal(m.features[0].weight[[0, 1, 2]], keep_w)


def test_hardware_balanced_prunes_conv_by_macs_and_fc_by_params(lenet, fmnist):
    tr, _ = fmnist
    from squeezer.compressors.apply import compressible_layers

    def costs(model):
        macs, params = {}, {}
        hooks = [mod.register_forward_hook(
            lambda mod, i, o, n=n: macs.__setitem__(n, mod.weight.numel() * (o.shape[2] * o.shape[3] if o.dim() == 4 else 1)))
            for n, mod in model.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
        model(torch.zeros(1, *SHAPE))
        for h in hooks:
            h.remove()
        for n in compressible_layers(model):
            params[n] = model.get_submodule(n).weight.numel()
        conv_macs = sum(v for n, v in macs.items() if n.startswith("features"))
        fc_params = sum(v for n, v in params.items() if n.startswith("classifier"))
        return conv_macs, fc_params

    base = costs(lenet)
    out = {}
    for crit in ("hardware_balanced", "l1"):
        m = copy.deepcopy(lenet)
        res = prune_(m, Policy(pruning=PruningConfig(criterion=crit, global_ratio=0.5)), SHAPE, data=tr)
        out[crit] = costs(m)
        if crit == "hardware_balanced":  # conv and FC channels are pruned to the rate separately
            conv = [g for g in res if g.startswith("features")]
            fc = [g for g in res if g.startswith("classifier")]
            for gs in (conv, fc):
                assert sum(res.sizes[g] - res[g] for g in gs) == int(sum(res.sizes[g] for g in gs) * 0.5)
    hb, l1 = out["hardware_balanced"], out["l1"]
    assert hb[0] / base[0] < l1[0] / base[0]  # fewer conv MACs left
    assert hb[1] / base[1] <= l1[1] / base[1]  # no more FC parameters left


STRUCT = [("resnet20", (1, 28, 28), ["l1", "bn_scale", "taylor", "saliency", "hardware_balanced", "lasso"]),
          ("mobilenet_v2", (1, 28, 28), ["l2", "taylor", "saliency"]),
          ("resnet18", (3, 32, 32), ["taylor"]),
          ("densenet121", (3, 32, 32), ["saliency"])]


@pytest.mark.parametrize("name,shape,crits", STRUCT, ids=[s[0] for s in STRUCT])
def test_pruning_structure_matches_prediction(name, shape, crits):
    for crit in crits:
        for global_ratio in (None, 0.3):
            torch.manual_seed(0)
            m = build_model(name, in_channels=shape[0], num_classes=10)
            cg = channel_groups(m, shape)
            data = [(torch.randn(8, *shape), torch.randint(0, 10, (8,)))]
            policy = Policy(layers={"_default": LayerPolicy(prune_ratio=0.4)},
                            pruning=PruningConfig(criterion=crit, global_ratio=global_ratio))
            res = prune_(m, policy, shape, data=data)
            resolved = res.resolved_policy(policy)
            m.eval()
            assert m(torch.randn(2, *shape)).shape == (2, 10)
            for fqn, mod in m.named_modules():
                if isinstance(mod, nn.Conv2d):
                    assert mod.out_channels == cg.kept(cg.out_segments[fqn], resolved), (crit, fqn)
                    assert mod.in_channels == cg.kept(cg.in_segments[fqn], resolved), (crit, fqn)
                elif isinstance(mod, nn.Linear):
                    assert mod.in_features == cg.kept(cg.in_segments[fqn], resolved), (crit, fqn)
            if global_ratio is None:
                assert all(k == kept_channels(cg.sizes[g], 0.4) for g, k in res.items())
