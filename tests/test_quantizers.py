"""Each quantizer's defining property, on a LeNet-5 trained briefly on a Fashion-MNIST subset."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from squeezer.compressors.apply import apply_policy_, compressible_layers
from squeezer.compressors.policy import LayerPolicy, Policy
from squeezer.compressors.quantize import (
    ACT_QUANTIZERS,
    QUANTIZERS,
    ActQuantizer,
    attach_act_quant_,
    raw_weight,
    weight_quantizer,
)
from squeezer.compressors.registry import UnknownNameError
from squeezer.evaluators.train import evaluate, train

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(lenet_4k):
    m, tr, val, acc = lenet_4k
    return copy.deepcopy(m), tr, val, acc


def _rel_err(q: torch.Tensor, w: torch.Tensor) -> float:
    return float(((q - w) ** 2).sum() / (w ** 2).sum())


def _ptq(model: nn.Module, bits: int, name: str) -> nn.Module:
    m = copy.deepcopy(model)
    apply_policy_(m, Policy(layers={"_default": LayerPolicy(weight_bits=bits, quantizer=name)}), (1, 28, 28))
    return m


def test_float_baseline_is_trained(setup) -> None:
    _, _, _, acc = setup
    assert acc > 0.7


def test_least_squares_beats_uniform_at_2_bits(setup) -> None:
    model, _, val, _ = setup
    for name in compressible_layers(model):
        w = model.get_submodule(name).weight.detach()
        e_ls = _rel_err(QUANTIZERS.get("least_squares")(2, w)(w), w)
        e_u = _rel_err(QUANTIZERS.get("uniform")(2, w)(w), w)
        assert e_ls < e_u, f"{name}: least-squares error {e_ls:.4f} >= uniform {e_u:.4f}"
    acc_ls, acc_u = evaluate(_ptq(model, 2, "least_squares"), val), evaluate(_ptq(model, 2, "uniform"), val)
    assert acc_ls > acc_u + 0.05, f"2-bit PTQ: least_squares {acc_ls:.3f} vs uniform {acc_u:.3f}"


def test_least_squares_scale_is_a_fixed_point_of_the_alternation(setup) -> None:
    # At the returned a: Q = clip(round(W / a)) and a = <W, Q> / <Q, Q> (least squares given Q).
    model, *_ = setup
    w = model.classifier[1].weight.detach()
    for bits in (2, 3, 4):
        q = QUANTIZERS.get("least_squares")(bits, w)
        a = q.scale(w)
        codes = q.encode(w).codes.float().reshape(w.shape[0], -1)
        a_ls = (w.reshape(w.shape[0], -1) * codes).sum(1) / (codes ** 2).sum(1)
        rel = (a - a_ls).abs() / a_ls
        # Alternation can cycle between two nearby fixed points in a few channels.
        assert float((rel < 1e-4).float().mean()) >= 0.9 and float(rel.max()) < 2e-2, f"{bits} bits: {rel.max()}"


def test_lsq_step_is_learned_and_qat_recovers_accuracy(setup) -> None:
    model, tr, val, _ = setup
    m = _ptq(model, 2, "lsq")
    before = evaluate(m, val)
    steps0 = {n: weight_quantizer(m.get_submodule(n)).step.detach().clone() for n in compressible_layers(m)}
    train(m, tr, epochs=1, max_steps=60, lr=0.01, batch_size=64, progress=False)
    after = evaluate(m, val)
    moved = [float((weight_quantizer(m.get_submodule(n)).step.detach() - s).abs().max()) for n, s in steps0.items()]
    assert all(v > 0 for v in moved), "LSQ step sizes did not train"
    assert after > before, f"LSQ QAT did not improve accuracy: {before:.3f} -> {after:.3f}"


def test_binary_is_sign_times_optimal_mean_abs(setup) -> None:
    model, *_ = setup
    w = model.features[3].weight.detach()
    q = QUANTIZERS.get("binary")(1, w)
    out = q(w)
    a = w.abs().reshape(w.shape[0], -1).mean(1)
    assert torch.equal(out.abs().reshape(w.shape[0], -1).amax(1), a)
    assert torch.equal(torch.sign(out), torch.where(w >= 0, 1.0, -1.0))
    # mean|w| minimises ||w - a sign(w)||^2 per channel (BWN's closed form).
    for f in (0.9, 1.1):
        assert _rel_err(out * f, w) > _rel_err(out, w)


def test_ternary_uses_twn_threshold_and_scale(setup) -> None:
    model, *_ = setup
    w = model.classifier[3].weight.detach()
    qt = QUANTIZERS.get("ternary")(2, w).encode(w)
    assert set(qt.codes.unique().tolist()) <= {-1, 0, 1}
    w2, c2 = w.reshape(w.shape[0], -1), qt.codes.reshape(w.shape[0], -1)
    delta = 0.7 * w2.abs().mean(1, keepdim=True)
    assert torch.equal(c2 != 0, w2.abs() > delta)
    kept_mean = (w2.abs() * (c2 != 0)).sum(1) / (c2 != 0).sum(1)
    assert torch.allclose(qt.scale, kept_mean)


def test_ttq_learns_asymmetric_scales(setup) -> None:
    model, tr, val, _ = setup
    m = _ptq(model, 2, "ttq")
    q = weight_quantizer(m.classifier[1])
    wp0, wn0 = float(q.wp), float(q.wn)
    train(m, tr, epochs=1, max_steps=80, lr=0.01, batch_size=64, progress=False)
    wp, wn = float(q.wp), float(q.wn)
    assert abs(wp - wp0) > 1e-4 and abs(wn - wn0) > 1e-4, "TTQ scales did not train"
    assert abs(wp - wn) > 1e-4, "positive and negative scales should differ after training"
    values = m.classifier[1].weight.detach().unique()
    assert values.numel() <= 3
    assert evaluate(m, val) > 0.6


def test_pow2_values_are_shifts(setup) -> None:
    model, *_ = setup
    for bits in (2, 3, 4, 5):
        w = model.classifier[1].weight.detach()
        out = QUANTIZERS.get("pow2")(bits, w)(w)
        nz = out[out != 0].abs()
        e = torch.log2(nz)
        assert torch.equal(e, e.round()), "a non-zero pow2 weight is not +-2^k"
        for row in out.reshape(w.shape[0], -1).abs():
            assert row.unique().numel() <= 2 ** (bits - 1)  # magnitudes, 0 included


def test_inq_freezes_largest_first_and_beats_one_shot(setup) -> None:
    model, tr, val, _ = setup
    bits = 3
    one_shot = evaluate(_ptq(model, bits, "pow2"), val)
    m = copy.deepcopy(model)
    qs = {}
    for n in compressible_layers(m):
        layer = m.get_submodule(n)
        qs[n] = QUANTIZERS.get("inq")(bits, layer.weight.detach(), fraction=0.5)
        from torch.nn.utils import parametrize
        parametrize.register_parametrization(layer, "weight", qs[n])
    q = qs["classifier.1"]
    w = raw_weight(m.classifier[1]).detach()
    # Partition by magnitude: every frozen weight is at least as large as every free one.
    assert float(w.abs()[q.frozen].min()) >= float(w.abs()[~q.frozen].max())
    assert abs(float(q.frozen.float().mean()) - 0.5) < 1e-3
    for frac in (0.75, 0.9, 1.0):
        frozen_vals = q.qvalues[q.frozen].clone()
        train(m, tr, epochs=1, max_steps=40, lr=0.01, batch_size=64, progress=False)
        assert torch.equal(m.classifier[1].weight.detach()[q.frozen], frozen_vals), "frozen weights moved"
        for qq in qs.values():
            qq.advance(frac)
    out = m.classifier[1].weight.detach()
    nz = out[out != 0].abs()
    assert torch.equal(torch.log2(nz), torch.log2(nz).round())
    inq = evaluate(m, val)
    assert inq > one_shot, f"INQ {inq:.3f} should beat one-shot power-of-two {one_shot:.3f}"


def test_kmeans_codebook_beats_uniform_and_centroids_finetune(setup) -> None:
    model, tr, val, _ = setup
    for bits in (2, 3):
        for n in compressible_layers(model):
            w = model.get_submodule(n).weight.detach()
            assert _rel_err(QUANTIZERS.get("kmeans")(bits, w)(w), w) < _rel_err(QUANTIZERS.get("uniform")(bits, w)(w), w)
    m = _ptq(model, 2, "kmeans")
    q = weight_quantizer(m.classifier[1])
    c0 = q.centroids.detach().clone()
    before = evaluate(m, val)
    train(m, tr, epochs=1, max_steps=60, lr=0.01, batch_size=64, progress=False)
    assert not torch.equal(q.centroids.detach(), c0), "centroids did not move in fine-tune"
    assert m.classifier[1].weight.detach().unique().numel() <= 4
    assert evaluate(m, val) > before


@torch.no_grad()
def _relu_inputs(model: nn.Module, data) -> torch.Tensor:
    feats = []
    h = model.classifier[3].register_forward_pre_hook(lambda mod, a: feats.append(a[0].detach()))
    model(data.x[:512])
    h.remove()
    return feats[0]


def test_hwgq_clipping_has_lower_error_than_min_max(setup) -> None:
    model, _, val, _ = setup
    x = _relu_inputs(model, val)
    assert float(x.min()) >= 0
    for bits in (2, 3):
        uni, hw = ActQuantizer(bits).eval(), ACT_QUANTIZERS.get("hwgq")(bits).eval()
        e_u, e_h = _rel_err(uni(x), x), _rel_err(hw(x), x)
        assert e_h < e_u, f"{bits} bits: hwgq {e_h:.4f} vs min/max {e_u:.4f}"
        assert float(hw(x).max()) < float(x.max())  # it clips


def test_act_quantizers_attach_by_name_and_lsq_step_learns(setup) -> None:
    model, tr, _, _ = setup
    m = copy.deepcopy(model)
    aq = attach_act_quant_(m.classifier[3], 2, method="lsq")
    attach_act_quant_(m.classifier[1], 2, method="hwgq")
    xb, yb = tr.x[:64], tr.y[:64]
    m.train()
    nn.functional.cross_entropy(m(xb), yb).backward()
    assert aq.step.grad is not None and float(aq.step.grad.abs()) > 0
    s, zp = aq.qparams()
    assert s > 0 and zp == 0  # ReLU input: unsigned
    with pytest.raises(UnknownNameError, match="did you mean 'hwgq'"):
        attach_act_quant_(m.classifier[5], 2, method="hwgqq")
    assert all(ACT_QUANTIZERS.summary(n) for n in ACT_QUANTIZERS.names())
