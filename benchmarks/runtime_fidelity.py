"""Fidelity of the runtime cost models on exported artifacts: predicted vs measured latency.

For resnet20, mobilenet_v2 and vgg_small (Fashion-MNIST shape, 1x28x28, 10 classes) this draws
policies of five kinds (random per-layer pruning; contiguous int8 regions of random extent and
place; low-rank factors; mixed per-layer widths including int4 and weight-only int8; and the
fp32 / uniform int8 ends), exports each as ``squeezer export`` writes ONNX
(:func:`hw_models.micro.export_policy`), times every file in ONNX Runtime on this machine
(batch 1, one thread, interleaved rounds, median of per-round medians:
:func:`hw_models.kit_runner.time_interleaved`) and compares with the ``host-ort`` cost model's
prediction (``trace`` -> ``estimate_table``). With ``--format pte`` the same policies are
written as ExecuTorch XNNPACK programs and compared with ``host-xnnpack``.

    python benchmarks/runtime_fidelity.py --per-model 22 --json runs/runtime_fidelity.json
    python benchmarks/runtime_fidelity.py --format pte --folder runs/runtime_fidelity_pte --json runs/rf_pte.json

Prepare (export) under ``flock -s``, time under ``flock -x``: ``--export-only`` writes the files
and a manifest; ``--time-only`` times an existing folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

torch.set_num_threads(1)

from squeezer.compressors.policy import LayerPolicy as LP  # noqa: E402
from squeezer.compressors.policy import Policy  # noqa: E402
from squeezer.evaluators.models import build_model  # noqa: E402
from squeezer.hw_models import get_target  # noqa: E402
from squeezer.hw_models.bench import host_target, load_artifact  # noqa: E402
from squeezer.hw_models.calibrate import metrics  # noqa: E402
from squeezer.hw_models.cost import estimate_table  # noqa: E402
from squeezer.hw_models.kit_runner import onnx_session, time_interleaved  # noqa: E402
from squeezer.hw_models.micro import export_policy  # noqa: E402
from squeezer.hw_models.trace import trace  # noqa: E402

MODELS = ("resnet20", "mobilenet_v2", "vgg_small")
SHAPE = (1, 28, 28)
INT8 = LP(weight_bits=8, act_bits=8)
KINDS = ("prune", "region", "lowrank", "mixed")


def _prune(layers: list[str], rng) -> dict:
    return {n: LP(prune_ratio=float(rng.choice([0.0, 0.25, 0.5, 0.75]))) for n in layers[:-1]}


def _region(layers: list[str], rng) -> dict:
    """int8 weights and activations on one contiguous run of layers (random extent and place)."""
    n = len(layers)
    length = int(rng.integers(1, n + 1))
    start = int(rng.integers(0, n - length + 1))
    prune = float(rng.choice([0.0, 0.0, 0.25, 0.5]))
    return {name: LP(prune_ratio=prune if k < n - 1 else 0.0, **({"weight_bits": 8, "act_bits": 8}
                                                                 if start <= k < start + length else {}))
            for k, name in enumerate(layers)}


def _lowrank(layers: list[str], rng) -> dict:
    q = bool(rng.random() < 0.5)
    return {n: LP(rank_ratio=float(rng.choice([0.25, 0.5, 0.75])), **({"weight_bits": 8, "act_bits": 8} if q else {}))
            for n in layers if rng.random() < 0.5}


def _mixed(layers: list[str], rng) -> dict:
    choices = [LP(), LP(weight_bits=8), INT8, LP(weight_bits=4, act_bits=8), LP(weight_bits=4)]
    out = {}
    for k, n in enumerate(layers):
        lp = choices[int(rng.integers(0, len(choices)))]
        pr = float(rng.choice([0.0, 0.25, 0.5])) if k < len(layers) - 1 else 0.0
        out[n] = LP(prune_ratio=pr, weight_bits=lp.weight_bits, act_bits=lp.act_bits)
    return out


def draw_policies(model: str, per_model: int, seed: int) -> list[tuple[str, Policy | None]]:
    """fp32, uniform int8, then ``per_model - 2`` random policies cycling over :data:`KINDS`."""
    rng = np.random.default_rng(seed)
    layers = trace(build_model(model, in_channels=SHAPE[0], num_classes=10), SHAPE, groups=False).compressible()
    out: list[tuple[str, Policy | None]] = [("fp32", None), ("w8a8", Policy(layers={"_default": INT8}))]
    make = {"prune": _prune, "region": _region, "lowrank": _lowrank, "mixed": _mixed}
    for i in range(per_model - 2):
        kind = KINDS[i % len(KINDS)]
        out.append((f"{kind}{i // len(KINDS)}", Policy(layers=make[kind](layers, rng))))
    return out


def export_all(folder: Path, per_model: int, seed: int, fmt: str = "onnx") -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for model in MODELS:
        for name, pol in draw_policies(model, per_model, seed):
            path = folder / f"{model}_{name}.{fmt}"
            t0 = time.time()
            if not path.is_file():
                export_policy(build_model(model, in_channels=SHAPE[0], num_classes=10), pol, SHAPE, path, fmt=fmt)
            if pol is not None:
                pol.save(folder / f"{model}_{name}.policy.json")
            entries.append({"model": model, "policy_name": name, "file": path.name,
                            "policy": None if pol is None else pol.to_dict()})
            print(f"  exported {path.name} ({time.time() - t0:.1f} s)", flush=True)
    (folder / "manifest.json").write_text(json.dumps(entries, indent=1))
    return entries


def predict(entries: list[dict], target: str) -> list[float]:
    tables = {m: trace(build_model(m, in_channels=SHAPE[0], num_classes=10), SHAPE) for m in MODELS}
    tgt = get_target(target)
    return [estimate_table(tables[e["model"]], Policy.from_dict(e["policy"]) if e["policy"] else None, tgt,
                           layers=False).latency_ms for e in entries]


def time_all(folder: Path, entries: list[dict], rounds: int, repeats: int) -> list[float]:
    runs = {e["file"]: onnx_session(folder / e["file"]) if e["file"].endswith(".onnx") else
            load_artifact(folder / e["file"])[1] for e in entries}
    x = np.random.default_rng(0).random((1, *SHAPE), dtype=np.float32)
    ms = time_interleaved(runs, {k: x for k in runs}, rounds=rounds, repeats=repeats)
    return [ms[e["file"]] for e in entries]


def summarize(entries: list[dict], pred: list[float], meas: list[float]) -> dict:
    out = {"all": metrics(pred, meas)}
    for m in MODELS:
        idx = [i for i, e in enumerate(entries) if e["model"] == m]
        out[m] = metrics([pred[i] for i in idx], [meas[i] for i in idx])
    for k in KINDS:
        idx = [i for i, e in enumerate(entries) if e["policy_name"].startswith(k)]
        if idx:
            out[f"kind:{k}"] = metrics([pred[i] for i in idx], [meas[i] for i in idx])
    # speed-up over each model's fp32 file, predicted vs measured (what a search's choice rests on)
    ratios = []
    for m in MODELS:
        base = next(i for i, e in enumerate(entries) if e["model"] == m and e["policy_name"] == "fp32")
        ratios += [(pred[base] / pred[i], meas[base] / meas[i]) for i, e in enumerate(entries)
                   if e["model"] == m and i != base]
    out["speedup"] = metrics([p for p, _ in ratios], [q for _, q in ratios])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", type=Path, default=ROOT / "runs" / "runtime_fidelity")
    ap.add_argument("--per-model", type=int, default=22)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--format", default="onnx", choices=["onnx", "pte"])
    ap.add_argument("--target", default=None, help="default: the runtime's host target (host-ort, host-xnnpack)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--export-only", action="store_true")
    ap.add_argument("--time-only", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.time_only:
        entries = json.loads((args.folder / "manifest.json").read_text())
    else:
        entries = export_all(args.folder, args.per_model, args.seed, args.format)
    if args.export_only:
        return 0
    args.target = args.target or host_target(args.format)
    t0 = time.time()
    meas = time_all(args.folder, entries, args.rounds, args.repeats)
    pred = predict(entries, args.target)
    res = summarize(entries, pred, meas)
    print(f"{len(entries)} artifacts timed in {time.time() - t0:.0f} s; target {args.target}")
    for k, m in res.items():
        print(f"  {k:16s} n={m['n']:3d}  Spearman {m['spearman']:.3f}  MdAPE {100 * m['mdape']:5.1f}%  "
              f"within 20% {100 * m['within20']:5.1f}%")
    rows = [{**{k: e[k] for k in ("model", "policy_name", "file")}, "predicted_ms": round(p, 4),
             "measured_ms": round(q, 4)} for e, p, q in zip(entries, pred, meas)]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"target": args.target, "summary": res, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
