"""Exported chosen model vs exported fp32 base on this machine (ONNX Runtime, one thread).

Trains each base model briefly on a Fashion-MNIST subset, applies a chosen-style policy
(structured pruning + int8 weights, with and without int8 activations), exports base and
chosen to ONNX (each verified against PyTorch on 2,000 test images), then times both in the
same run: median of repeats after warm-up at batch 1 and batch 32. Writes
``benchmarks/RESULTS_export.md``.

    python benchmarks/export_speed.py [--models resnet20 mobilenet_v2] [--repeats 200]
"""

from __future__ import annotations

import argparse
import itertools
import dataclasses
import copy
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressors.apply import apply_policy_  # noqa: E402
from compressors.export import VerificationError, export_model  # noqa: E402
from compressors.export_bench import bench_artifact  # noqa: E402
from compressors.policy import LayerPolicy, Policy  # noqa: E402
from evaluators.checkpoint import Loaded  # noqa: E402
from evaluators.datasets import DataSplits, load_dataset  # noqa: E402
from evaluators.models import build_model  # noqa: E402
from evaluators.train import train  # noqa: E402

POLICIES = {
    "pruned 50% + int8 weights": Policy(layers={"_default": LayerPolicy(prune_ratio=0.5, weight_bits=8)}),
    "pruned 50% + int8 weights + int8 acts": Policy(layers={"_default": LayerPolicy(prune_ratio=0.5, weight_bits=8,
                                                                                   act_bits=8)}),
    "int8 weights + int8 acts (no pruning)": Policy(layers={"_default": LayerPolicy(weight_bits=8, act_bits=8)}),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["resnet20", "mobilenet_v2"])
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--steps", type=int, default=150, help="base training steps")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS_export.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    full = load_dataset("fashion-mnist")
    d = DataSplits(full.name, full.train.subset(6000), full.val.subset(500), full.test.subset(2000),
                   full.num_classes, full.mean, full.std)
    norm = {"mean": list(d.mean), "std": list(d.std)}
    tmp = Path(tempfile.mkdtemp(prefix="export_speed_"))
    rows = []
    failures: list[str] = []
    for name in args.models:
        torch.manual_seed(0)
        base = build_model(name, in_channels=1, num_classes=10)
        train(base, d.train, max_steps=args.steps, epochs=10, lr=0.05, batch_size=64, progress=False)
        base.eval()
        res = export_model(Loaded(base, name, d.input_shape, 10, None, norm), "onnx", tmp / f"{name}-base.onnx", data=d)
        b = bench_artifact(res.path, batch=32, repeats=args.repeats, warmup=20)
        rows.append((name, "fp32 base", res.file_bytes, res.accuracy, b.latency_ms, b.batch_latency_ms, 1.0, 1.0))
        for label, pol in POLICIES.items():
            m = copy.deepcopy(base)
            apply_policy_(m, pol, d.input_shape, data=list(itertools.islice(d.train.batches(64), 4)))
            train(m, d.train, max_steps=args.steps // 3, lr=0.01, batch_size=64, teacher=base, progress=False)
            m.eval()
            try:
                r = export_model(Loaded(m, name, d.input_shape, 10, pol, norm), "onnx",
                                 tmp / f"{name}-{len(rows)}.onnx", data=d)
            except VerificationError as e:  # reported, not hidden: ORT's int8 kernels round differently
                failures.append(f"{name}, {label}: {e}")
                r = export_model(Loaded(m, name, d.input_shape, 10, pol, norm), "onnx",
                                 tmp / f"{name}-{len(rows)}.onnx")
                r = dataclasses.replace(r, accuracy=float("nan"))
            c = bench_artifact(r.path, batch=32, repeats=args.repeats, warmup=20)
            rows.append((name, label, r.file_bytes, r.accuracy, c.latency_ms, c.batch_latency_ms,
                         b.latency_ms / c.latency_ms, b.batch_latency_ms / c.batch_latency_ms))
            print(rows[-1], flush=True)
    import onnxruntime

    lines = ["# Export speed: exported chosen model vs exported fp32 base (host)", "",
             f"Command: `python benchmarks/export_speed.py --models {' '.join(args.models)} --repeats {args.repeats}"
             f" --steps {args.steps}`", "",
             f"Machine: {platform.processor() or platform.machine()}, ONNX Runtime {onnxruntime.__version__} "
             f"(CPUExecutionProvider, 1 intra-op thread), torch {torch.__version__}; {time.strftime('%Y-%m-%d')}.",
             "Latency: median of the repeats after 20 warm-up runs; base and chosen timed in the same run, "
             "on a machine shared with other jobs. Accuracy: the exported ONNX file run by ONNX Runtime on "
             "2,000 Fashion-MNIST test images (models trained only briefly: the point is speed and agreement).", "",
             "| model | variant | ONNX bytes | ONNX acc | batch-1 ms | batch-32 ms | speed-up b1 | speed-up b32 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for n, label, size, acc, l1, l32, s1, s32 in rows:
        lines.append(f"| {n} | {label} | {size:,} | {100 * acc:.1f}% | {l1:.3f} | {l32:.2f} | {s1:.2f}x | {s32:.2f}x |")
    if failures:
        lines += ["", "Verification failures (accuracy column shows nan; the file was written unverified for timing):"]
        lines += [f"- {f}" for f in failures]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
