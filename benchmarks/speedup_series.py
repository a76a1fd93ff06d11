"""Measured speed-up of one ONNX file over another, repeated: how much a single measurement moves.

On a shared machine one interleaved measurement of a base and a compressed model can land in a
noisy window (another guest filling the L3 the base streams its weights from). This times the
pair ``--runs`` times, each run the calibration kit's protocol
(:func:`hw_models.kit_runner.time_interleaved`: rounds of alternating batch-1 repeats, median
over rounds of per-round medians, one thread), pausing between runs, and prints every run's
latencies and ratio, then the median, min and max ratio.

    python benchmarks/speedup_series.py runs/exp/base_fp32.onnx runs/exp/model.onnx --runs 12
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from squeezer.hw_models.kit_runner import onnx_session, time_interleaved  # noqa: E402


def series(base: Path, model: Path, *, runs: int, rounds: int, repeats: int, pause_s: float) -> list[float]:
    """Each run's base / model latency ratio (printed as it is measured)."""
    sessions = {"base": onnx_session(base), "model": onnx_session(model)}
    x = np.random.default_rng(0).random(_input_shape(base), dtype=np.float32)
    ratios = []
    for i in range(runs):
        ms = time_interleaved(sessions, {k: x for k in sessions}, rounds=rounds, repeats=repeats)
        ratios.append(ms["base"] / ms["model"])
        print(f"run {i + 1:2d}: base {ms['base']:.4f} ms  model {ms['model']:.4f} ms  speed-up {ratios[-1]:.2f}x",
              flush=True)
        time.sleep(pause_s)
    return ratios


def _input_shape(path: Path) -> tuple[int, ...]:
    import onnxruntime as ort

    dims = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].shape
    return tuple(d if isinstance(d, int) else 1 for d in dims)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("model", type=Path)
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--pause", type=float, default=3.0, help="seconds between runs")
    a = ap.parse_args()
    for p in (a.base, a.model):
        if not p.is_file():
            sys.exit(f"speedup_series: no such ONNX file: {p}")
    r = series(a.base, a.model, runs=a.runs, rounds=a.rounds, repeats=a.repeats, pause_s=a.pause)
    print(f"speed-up over {len(r)} runs: median {statistics.median(r):.2f}x, min {min(r):.2f}x, max {max(r):.2f}x")


if __name__ == "__main__":
    main()
