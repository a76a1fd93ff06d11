"""Time squeezer's calibration graphs in ONNX Runtime on this device: needs only Python, numpy and onnxruntime.

``squeezer calibrate --kit DIR --runtime onnxruntime`` copies this file into ``DIR`` as
``run_kit.py``, next to ``manifest.csv`` and the graphs (``graphs/*.onnx``). Copy ``DIR`` to the
device (a Raspberry Pi, a phone with Python), then::

    pip install numpy onnxruntime
    python run_kit.py                      # writes measurements.csv next to it
    # back on the machine with squeezer:
    squeezer calibrate --target arm-a72 --measurements DIR/measurements.csv --out my-device.yaml

Every graph is timed at batch 1 with one thread, interleaved: each of ``--rounds`` rounds
runs every graph ``--repeats`` times; a graph's latency is the median over rounds of its
per-round medians, so a change of load during the run hits all graphs alike.
``squeezer calibrate --target host-ort`` times its graphs with the same functions.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import onnxruntime as ort

#: Columns of ``manifest.csv`` (written by squeezer) and of ``measurements.csv`` (written here).
MANIFEST_COLUMNS = ("file", "model", "input_shape", "num_classes", "policy")
MEASUREMENT_COLUMNS = ("model", "latency_ms", "input_shape", "num_classes", "policy", "runtime", "file")


def onnx_session(path: str | os.PathLike, threads: int = 1) -> Callable[[np.ndarray], object]:
    """A batch-1 runner of an ONNX file: ONNX Runtime, CPU, ``threads`` intra-op threads."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {name: x})


def time_interleaved(runs: Mapping[str, Callable[[np.ndarray], object]], inputs: Mapping[str, np.ndarray], *,
                     rounds: int = 7, repeats: int = 30, warmup: int = 5) -> dict[str, float]:
    """Median latency (ms) of each runner: the median over ``rounds`` of per-round medians,
    every runner timed ``repeats`` times in each round (after ``warmup`` untimed runs)."""
    if rounds < 1 or repeats < 1:
        raise ValueError(f"`rounds >= 1 and repeats >= 1` must hold, but got rounds={rounds}, repeats={repeats}")
    for k, run in runs.items():
        for _ in range(warmup):
            run(inputs[k])
    per: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, run in runs.items():
            x = inputs[k]
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                run(x)
                ts.append((time.perf_counter() - t0) * 1e3)
            per[k].append(statistics.median(ts))
    return {k: statistics.median(v) for k, v in per.items()}


def read_manifest(path: str | os.PathLike) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = set(MANIFEST_COLUMNS) - set(rows[0] if rows else MANIFEST_COLUMNS)
    if missing:
        raise ValueError(f"manifest {path}: missing column(s) {sorted(missing)}")
    return rows


def run_kit(kit_dir: str | os.PathLike, *, threads: int = 1, rounds: int = 7, repeats: int = 30,
            out: str | os.PathLike | None = None) -> Path:
    """Time every graph of the kit in ``kit_dir``; write ``measurements.csv`` there (or ``out``)."""
    kit = Path(kit_dir)
    rows = read_manifest(kit / "manifest.csv")
    runs, inputs = {}, {}
    rng = np.random.default_rng(0)
    for r in rows:
        shape = tuple(int(s) for s in r["input_shape"].lower().split("x"))
        runs[r["file"]] = onnx_session(kit / r["file"], threads)
        inputs[r["file"]] = rng.random((1, *shape), dtype=np.float32)
    ms = time_interleaved(runs, inputs, rounds=rounds, repeats=repeats)
    out_path = Path(out) if out is not None else kit / "measurements.csv"
    runtime = f"onnxruntime {ort.__version__} ({platform.machine()}, {threads} thread{'s' * (threads > 1)})"
    with open(out_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=MEASUREMENT_COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow({"model": r["model"], "latency_ms": f"{ms[r['file']]:.5f}", "input_shape": r["input_shape"],
                        "num_classes": r["num_classes"], "policy": r["policy"], "runtime": runtime,
                        "file": r["file"]})
    return out_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kit", default=str(Path(__file__).resolve().parent), help="kit folder (default: this file's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default=None, help="CSV to write (default KIT/measurements.csv)")
    args = ap.parse_args(argv)
    path = run_kit(args.kit, threads=args.threads, rounds=args.rounds, repeats=args.repeats, out=args.out)
    print(f"wrote {path} ({sum(1 for _ in open(path)) - 1} graphs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
