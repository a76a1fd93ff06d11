"""Contract every weight quantizer (``QUANTIZERS``) and sharing method (``SHARING``) must pass,
on real trained conv and linear weights (LeNet-5, Fashion-MNIST subset)."""

from __future__ import annotations

import pytest
import torch

from squeezer.compressors.apply import apply_policy_, compressible_layers
from squeezer.compressors.policy import VALID_BITS, LayerPolicy, Policy
from squeezer.compressors.quantize import QUANTIZERS, QuantizedTensor, WeightQuantizer, weight_quantizer
from squeezer.compressors.sharing import SHARING, ProductQuantizedTensor
from squeezer.evaluators.datasets import load_dataset
from squeezer.evaluators.models import build_model
from squeezer.evaluators.train import train

torch.set_num_threads(1)

# Bits exercised per method: what it supports, limited to a few widths to keep the suite fast.
TRY_BITS = {1, 2, 3, 4, 8}
# Extra constructor arguments so a gradient can reach the float weight (INQ freezes what it quantizes).
TRAIN_KW = {"inq": {"fraction": 0.5}}
METHODS = [("quantizer", n) for n in QUANTIZERS.names()] + [("sharing", n) for n in SHARING.names()]


def _cls(kind: str, name: str) -> type[WeightQuantizer]:
    return (QUANTIZERS if kind == "quantizer" else SHARING).get(name)


def _bits(kind: str, name: str) -> list[int]:
    bits = sorted(set(_cls(kind, name).supported_bits) & TRY_BITS & set(VALID_BITS))
    if kind == "sharing" and name == "spectral":
        bits = [b for b in bits if b in (2, 3)]  # spectral clustering is the slow one
    return bits


@pytest.fixture(scope="module")
def trained_weights() -> dict[str, torch.Tensor]:
    d = load_dataset("fashion-mnist")
    torch.manual_seed(0)
    m = build_model("lenet5", in_channels=1, num_classes=10)
    train(m, d.train.subset(2000), epochs=1, lr=0.05, batch_size=64, progress=False)
    return {"conv": m.features[3].weight.detach().clone(), "linear": m.classifier[1].weight.detach().clone()}


@pytest.mark.parametrize("kind,name", METHODS, ids=[f"{k}:{n}" for k, n in METHODS])
def test_registry_entries_have_summary_and_bits(kind: str, name: str) -> None:
    reg = QUANTIZERS if kind == "quantizer" else SHARING
    assert reg.summary(name).strip(), f"{name} has no one-line summary"
    assert _cls(kind, name).supported_bits, f"{name} declares no supported_bits"


@pytest.mark.parametrize("kind,name", METHODS, ids=[f"{k}:{n}" for k, n in METHODS])
@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_contract_on_trained_weight(kind: str, name: str, layer: str, trained_weights) -> None:
    w = trained_weights[layer]
    cls = _cls(kind, name)
    for bits in _bits(kind, name):
        q = cls(bits, w)
        q.eval()
        with torch.no_grad():
            out = q(w)
            # Shape, dtype, and a quantized weight is a fixed point (idempotent).
            assert out.shape == w.shape and out.dtype == w.dtype
            assert torch.isfinite(out).all()
            again = q(out)
        tol = 1e-5 * float(w.abs().max())
        assert torch.allclose(again, out, atol=tol), f"{name}@{bits}: forward(forward(w)) != forward(w)"

        # encode: integer codes within the declared width; dequantize == forward in eval.
        qt = q.encode(w)
        assert isinstance(qt, QuantizedTensor)
        assert not qt.codes.is_floating_point()
        lo, hi = qt.code_range
        assert int(qt.codes.min()) >= lo and int(qt.codes.max()) <= hi, f"{name}@{bits}: codes out of [{lo}, {hi}]"
        assert qt.bits <= bits
        assert torch.allclose(qt.dequantize(), out, atol=tol), f"{name}@{bits}: dequantize() != forward(w)"
        assert qt.storage_bytes() > 0

        # Few distinct values: per output channel (scalar) or per sub-space (product quantization).
        if isinstance(qt, ProductQuantizedTensor):
            for j in range(qt.codes.shape[0]):
                assert qt.codes[j].unique().numel() <= 2 ** qt.bits
        else:
            flat = out.reshape(out.shape[0], -1)
            limit = 2 ** qt.bits if qt.codebook is None else min(2 ** qt.bits, qt.codebook.numel())
            for c in range(flat.shape[0]):
                assert flat[c].unique().numel() <= limit, f"{name}@{bits}: channel {c} has too many values"

        # Gradients reach the float weight (straight-through estimator).
        qtr = cls(bits, w, **TRAIN_KW.get(name, {}))
        qtr.train()
        wg = w.clone().requires_grad_(True)
        r = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
        (qtr(wg) * r).sum().backward()
        assert wg.grad is not None and torch.isfinite(wg.grad).all()
        assert int((wg.grad != 0).sum()) > 0, f"{name}@{bits}: no gradient reaches the weight"


@pytest.mark.parametrize("kind,name", METHODS, ids=[f"{k}:{n}" for k, n in METHODS])
def test_contract_via_apply_policy_on_resnet20(kind: str, name: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    bits_list = _bits(kind, name)
    if kind == "sharing" or name == "kmeans":  # clustering every resnet20 layer is slow: lowest and 4 bits
        bits_list = sorted({bits_list[0], 4} & set(bits_list)) if name != "spectral" else bits_list[:1]
    for bits in bits_list:
        m = build_model("resnet20", in_channels=3, num_classes=10)
        lp = LayerPolicy(weight_bits=bits, quantizer=name) if kind == "quantizer" else \
            LayerPolicy(weight_bits=bits, sharing=name)
        apply_policy_(m, Policy(layers={"_default": lp}), (3, 32, 32))
        m.eval()
        with torch.no_grad():
            y = m(x)
        assert y.shape == (2, 10) and torch.isfinite(y).all()
        for fqn in compressible_layers(m):
            q = weight_quantizer(m.get_submodule(fqn))
            assert isinstance(q, _cls(kind, name)), f"{fqn} has no {name} quantizer"


def test_unsupported_bits_are_refused_with_the_rule() -> None:
    with pytest.raises(ValueError, match="must hold"):
        QUANTIZERS.get("binary")(4, torch.randn(4, 4))
    with pytest.raises(ValueError, match="must hold"):
        QUANTIZERS.get("uniform")(1, torch.randn(4, 4))
