"""Measured speed-up of one exported model over another, repeated: how much a single measurement moves.

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
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from squeezer.hw_models.bench import BenchError, load_artifact  # noqa: E402
from squeezer.hw_models.kit_runner import time_interleaved  # noqa: E402


def series(base: Path, model: Path, *, runs: int, rounds: int, repeats: int, pause_s: float) -> list[float]:
    """Each run's base / model latency ratio (printed as it is measured)."""
    (_, run_base, meta), (_, run_model, _) = load_artifact(base), load_artifact(model)
    if "squeezer.input_shape" not in meta:
        raise BenchError(f"{base.name} does not record its input shape")
    x = np.random.default_rng(0).random((1, *json.loads(meta["squeezer.input_shape"])), dtype=np.float32)
    sessions = {"base": run_base, "model": run_model}
    ratios = []
    for i in range(runs):
        ms = time_interleaved(sessions, {k: x for k in sessions}, rounds=rounds, repeats=repeats)
        ratios.append(ms["base"] / ms["model"])
        print(f"run {i + 1:2d}: base {ms['base']:.4f} ms  model {ms['model']:.4f} ms  speed-up {ratios[-1]:.2f}x",
              flush=True)
        time.sleep(pause_s)
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("base", type=Path)
    ap.add_argument("model", type=Path)
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--pause", type=float, default=3.0, help="seconds between runs")
    a = ap.parse_args()
    try:
        r = series(a.base, a.model, runs=a.runs, rounds=a.rounds, repeats=a.repeats, pause_s=a.pause)
    except BenchError as e:
        sys.exit(f"speedup_series: {e}")
    print(f"speed-up over {len(r)} runs: median {statistics.median(r):.2f}x, min {min(r):.2f}x, max {max(r):.2f}x")


if __name__ == "__main__":
    main()
