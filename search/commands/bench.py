"""``squeezer bench ARTIFACT``: real latency of an exported model on this machine vs the cost model."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import UserError
from ..tools import bench


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("bench", help="measure an exported artifact's latency here (median after warm-up) "
                                            "and compare with the cost model of its runtime here")
    p.add_argument("artifact", help=".onnx (ONNX Runtime), .pte (ExecuTorch) or .pt (TorchScript or squeezer checkpoint)")
    p.add_argument("--batch", type=int, default=32, help="second batch size timed (default 32; batch 1 is always timed)")
    p.add_argument("--repeats", type=int, default=30, help="timed runs per batch size (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for the runtime (default 1)")
    p.add_argument("--input-shape", help="C,H,W when the artifact does not record it")
    p.add_argument("--target", default="auto", help="cost model to compare with (default: the runtime's own here, "
                                                    "host-ort for .onnx, host-xnnpack for .pte, host for .pt; "
                                                    "'none' to skip)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    shape = None
    if args.input_shape:
        try:
            shape = tuple(int(s) for s in args.input_shape.split(","))
        except ValueError:
            raise UserError(f"malformed --input-shape {args.input_shape!r}; expected C,H,W such as 1,28,28") from None
    r = bench(args.artifact, batch=args.batch, repeats=args.repeats, warmup=args.warmup, threads=args.threads,
              input_shape=shape, target=None if args.target == "none" else args.target)
    if args.json:
        print(json.dumps(r.to_dict(), indent=2))
        return 0
    print(f"{r.artifact} ({r.kind}, input {'x'.join(map(str, r.input_shape))}, {r.threads} thread(s), "
          f"median of {r.repeats} after {r.warmup} warm-up)")
    print(f"  batch 1: {r.measured_latency_ms:.3f} ms")
    if r.measured_batch_latency_ms is not None and r.batch > 1:
        print(f"  batch {r.batch}: {r.measured_batch_latency_ms:.3f} ms ({r.measured_per_image_ms:.3f} ms per image)")
    elif r.kind == "pte":
        print("  (ExecuTorch programs have a fixed batch of 1)")
    if r.predicted_latency_ms is not None:
        print(f"  batch 1 predicted by the {r.target} cost model: {r.predicted_latency_ms:.3f} ms (measured / "
              f"predicted = {r.measured_latency_ms / r.predicted_latency_ms:.2f})")
    elif r.prediction_note:
        print(f"  {r.prediction_note}")
    if r.runtime_ops is not None:
        ops = r.runtime_ops
        print(f"  ONNX Runtime runs per inference: {ops.get('QLinearConv', 0) + ops.get('QGemm', 0)} int8 kernels, "
              f"{ops.get('QuantizeLinear', 0)} QuantizeLinear, {ops.get('DequantizeLinear', 0)} DequantizeLinear, "
              f"{sum(ops.values())} ops in all")
    return 0
