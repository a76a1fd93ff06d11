"""Unstructured sparsity: magnitude (fixed mask) vs dynamic network surgery (prune and splice)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from squeezer.compressors.apply import apply_policy_
from squeezer.compressors.policy import LayerPolicy, Policy, SparsityConfig
from squeezer.compressors.sparsity import SPARSITY_METHODS, attach_mask_, n_zero, sparsity_step_hook, weight_mask
from squeezer.evaluators.train import evaluate, train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(lenet_6k):
    m, tr, te, _ = lenet_6k
    return copy.deepcopy(m), tr, te


def test_registry_has_both():
    assert {"magnitude", "dns"} <= set(SPARSITY_METHODS.names())


def test_dns_splices_a_wrongly_pruned_weight_back():
    lin = nn.Linear(10, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(1, 11, dtype=torch.float32)[None])
    wm = attach_mask_(lin, 0.5, "dns")
    assert wm.mask.flatten().tolist() == [0] * 5 + [1] * 5
    x = torch.zeros(1, 10)
    x[0, 0] = 1.0
    lin(x).sum().backward()  # the pruned weight 0 gets a gradient (straight-through)
    orig = lin.parametrizations.weight.original
    assert orig.grad[0, 0] == 1.0
    with torch.no_grad():
        orig[0, 0] = 6.2  # just above the smallest active weight (6): hysteresis keeps it cut
    assert wm.update(orig) == 0
    with torch.no_grad():
        orig[0, 0] = 20.0  # clearly important now: spliced back, the weakest active one goes
    assert wm.update(orig) == 1
    assert wm.mask[0, 0] == 1 and wm.mask[0, 5] == 0 and int((wm.mask == 0).sum()) == 5


def _finetune(model, tr, te, method, sparsity, seed):
    m = copy.deepcopy(model)
    apply_policy_(m, Policy(layers={"_default": LayerPolicy(sparsity=sparsity)},
                            sparsity=SparsityConfig(method=method)), (1, 28, 28))
    before = {n: weight_mask(x).mask.clone() for n, x in m.named_modules() if weight_mask(x) is not None}
    train(m, tr, epochs=1, lr=0.02, seed=seed, progress=False, step_hook=sparsity_step_hook(m))
    after = {n: weight_mask(m.get_submodule(n)).mask for n in before}
    spliced = sum(int(((after[n] > 0) & (before[n] == 0)).sum()) for n in before)
    for n, mask in after.items():  # exact sparsity, as the size model counts it
        assert int((mask == 0).sum()) == n_zero(mask.numel(), sparsity)
        assert int((m.get_submodule(n).weight == 0).sum()) >= n_zero(mask.numel(), sparsity)
    return evaluate(m, te), spliced


def test_dns_recovers_weights_and_beats_magnitude(setup):
    model, tr, te = setup
    mag = [_finetune(model, tr, te, "magnitude", 0.95, s) for s in (0, 1)]
    dns = [_finetune(model, tr, te, "dns", 0.95, s) for s in (0, 1)]
    assert all(sp == 0 for _, sp in mag)  # a fixed mask never brings a weight back
    assert all(sp > 0 for _, sp in dns)   # DNS does: weights magnitude pruning killed
    acc_mag = sum(a for a, _ in mag) / 2
    acc_dns = sum(a for a, _ in dns) / 2
    assert acc_dns >= acc_mag, (acc_dns, acc_mag)
