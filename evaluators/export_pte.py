"""ExecuTorch export: XNNPACK delegate with PT2E int8 quantization (optional extra).

The deploy model (pruned, decomposed, BN folded, normalisation folded; see
:func:`evaluators.export.deploy_model`) is captured with ``torch.export``, quantized by
``XNNPACKQuantizer`` (int8 per-channel symmetric weights, int8 activations calibrated on
training images), lowered to XNNPACK and written as a ``.pte`` program. For 8-bit uniform
policies the int8 weight grid equals ours (both use ``absmax / 127`` per channel), so the
weights are exact; narrower weights are re-expressed on the int8 grid. Activation quantizers
below 8 bits keep their range as a clamp; XNNPACK computes in int8.

Needs ``pip install squeezer[executorch]``; without it :class:`MissingExtraError` says so.

Example:
    >>> executorch_available() in (True, False)
    True
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .export import ActQDQ, ExportResult, MissingExtraError, deploy_model, verify_artifact

EXTRA_HINT = "ExecuTorch is not installed; install the extra with `pip install squeezer[executorch]`"


def executorch_available() -> bool:
    try:
        import executorch.exir  # noqa: F401
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: F401
    except Exception:  # noqa: BLE001 - missing or broken install: both mean "not available"
        return False
    return True


class _Clamp(nn.Module):
    def __init__(self, lo: float, hi: float) -> None:
        super().__init__()
        self.lo, self.hi = lo, hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x, self.lo, self.hi)


def _strip_act_qdq_(module: nn.Module) -> None:
    """PT2E inserts its own int8 activation quantization; keep only sub-8-bit ranges."""
    for m in module.modules():
        aq = getattr(m, "act_quant", None)
        if isinstance(aq, ActQDQ):
            m.act_quant = _Clamp(aq.lo, aq.hi) if aq.bits < 8 else nn.Identity()


def pte_runner(path: str) -> Callable[[np.ndarray], np.ndarray]:
    """A function running the ``.pte`` program with ExecuTorch's runtime (batch 1 per call)."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(path)).load_method("forward")

    def run(x: np.ndarray) -> np.ndarray:
        outs = [method.execute([torch.from_numpy(np.ascontiguousarray(x[i:i + 1], dtype=np.float32))])[0]
                for i in range(x.shape[0])]
        return torch.cat([o.detach().clone() for o in outs]).numpy()

    return run


def export_pte(job: Any) -> ExportResult:
    """Write ``job.out_path`` as an ExecuTorch program and verify it with the ExecuTorch runtime."""
    if not executorch_available():
        raise MissingExtraError(EXTRA_HINT)
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from executorch.exir import to_edge_transform_and_lower
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    ld = job.loaded
    dep = deploy_model(ld.model, mean=job.mean, std=job.std)
    _strip_act_qdq_(dep.module)
    example = (torch.rand(1, *ld.input_shape),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        captured = torch.export.export(dep.module, example).module()
        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        prepared = prepare_pt2e(captured, quantizer)
        calib = _calibration_images(job, ld.input_shape)
        with torch.no_grad():
            for i in range(calib.shape[0]):  # the captured graph has batch size 1
                prepared(calib[i:i + 1])
        converted = convert_pt2e(prepared)
        program = to_edge_transform_and_lower(torch.export.export(converted, example),
                                              partitioner=[XnnpackPartitioner()]).to_executorch()
    job.out_path.write_bytes(program.buffer)
    # A .pte has no free-form metadata: the policy, shapes and accuracy go next to it.
    job.out_path.with_name(job.out_path.name + ".json").write_text(json.dumps(job.metadata(), indent=2) + "\n")
    notes = list(dep.notes) + ["XNNPACK int8 (PT2E): weights per-channel int8, activations int8 calibrated on "
                               "training images; batch size fixed to 1"]
    res = verify_artifact(job, "pte", pte_runner(str(job.out_path)), dep, notes, check_size=False)
    return dataclasses.replace(res, extra_paths=(job.out_path.with_name(job.out_path.name + ".json"),))


def _calibration_images(job: Any, input_shape: tuple[int, ...]) -> torch.Tensor:
    """Up to 128 training images in [0, 1] (the deploy model's input); random without data."""
    if job.data is None:
        return torch.rand(64, *input_shape)
    x, _ = next(iter(job.data.train.batches(128)))  # the first 128, in memory or streamed
    c = x.shape[1]
    mean = torch.tensor(job.mean or (0.0,) * c).reshape(1, -1, 1, 1)
    std = torch.tensor(job.std or (1.0,) * c).reshape(1, -1, 1, 1)
    return x * std + mean
