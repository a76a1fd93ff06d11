"""The search space samples activation bits only where an int8 kernel can run (integer weights)."""

from __future__ import annotations

import optuna
import pytest

from squeezer.evaluators.models import build_model
from squeezer.search.space import SearchSpace

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _space(weight_bits, act_bits) -> SearchSpace:
    return SearchSpace.build(build_model("lenet5", in_channels=1, num_classes=10), (1, 28, 28),
                             weight_bits=weight_bits, act_bits=act_bits)


def _sampled(space, n=40, enqueue=()):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for params in enqueue:
        study.enqueue_trial(params)
    out = []
    for _ in range(n):
        t = study.ask()
        out.append((space.sample(t), dict(t.params)))
        study.tell(t, 0.0)
    return out


def test_float_weights_never_get_quantized_activations():
    sp = _space((4, 8, None), (8, None))
    pairs = [(lp.weight_bits, lp.act_bits) for pol, _ in _sampled(sp) for lp in
             (pol.for_layer(n) for n in sp.layers)]
    assert all(a is None for w, a in pairs if w is None)
    # Integer layers still explore both: int8 kernels and weight-only quantization.
    assert {a for w, a in pairs if w is not None} == {8, None}
    # The dimension is conditional: not asked of a float layer at all.
    for pol, params in _sampled(sp, n=10):
        for n in sp.layers:
            assert (f"abits:{n}" in params) == (pol.for_layer(n).weight_bits is not None)


def test_enqueued_float_weights_with_int8_acts_drop_the_act_bits():
    """A seed (e.g. a uniform or sensitivity-guided one) asking for a float island's act bits."""
    sp = _space((8, None), (8, None))
    seed = sp.params_for(sp.uniform_policy(weight_bits=None, act_bits=8))
    pol, params = _sampled(sp, n=1, enqueue=[seed])[0]
    assert all(pol.for_layer(n).act_bits is None for n in sp.layers)
    # Explicit params are still applied as given (sensitivity probes measure act quantization alone).
    assert sp.policy_from_params(seed).for_layer(sp.layers[0]).act_bits == 8
    # trial_policy is what the trial runs: seeds are priced with it.
    assert sp.trial_policy(seed) == pol
    assert all(f"abits:{n}" not in sp.canonical_params(seed) for n in sp.layers)
    mixed = {**seed, f"wbits:{sp.layers[0]}": 8}
    assert sp.canonical_params(mixed)[f"abits:{sp.layers[0]}"] == 8      # integer weights keep theirs
    assert sp.trial_policy(mixed) == _sampled(sp, n=1, enqueue=[mixed])[0][0]


@pytest.mark.parametrize("wbits", [8, 16])
def test_targets_without_float_activations_always_sample_them(wbits):
    sp = _space((wbits,), (8,))
    pol, _ = _sampled(sp, n=1)[0]
    assert all(pol.for_layer(n).act_bits == 8 for n in sp.layers)
    assert _space((16, None), (8, None)).samples_act_bits(16) is False  # fp16 weights: a float kernel
