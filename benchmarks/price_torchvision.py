"""Price every torchvision classification model at its native resolution, in one process (issue 19).

For each name of ``torchvision.models.list_models(module=torchvision.models)``: build the model
untrained (``weights=None``: nothing downloads), read its native input size from its default
weights' transforms (metadata only; 224 when there is none), price it with
``hw_models.estimate`` as a new user would, then free it. Prints one row per model (input size,
parameters, MACs, size, size over 4 bytes per parameter, latency, energy, seconds, RSS after
it, peak RSS of the process so far) and a summary (goal: peak RSS under 4 GB). Size is below 4 bytes per
parameter only by the BatchNorms that fold into their conv (its weights and bias hold them).

    python benchmarks/price_torchvision.py [--target arm-a72] [--models resnet18 swin_t] [--json out.json]
        [--markdown benchmarks/RESULTS_price_torchvision.md]

``tests/test_hw_torchvision.py`` runs :func:`price_all` as a slow test.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import resource
import sys
import time
import traceback
from typing import Callable

import torch
import torchvision

from squeezer import hw_models

HEADER = (f"{'model':22s} {'input':>5s} {'params':>12s} {'MACs':>16s} {'size_bytes':>14s} {'size/4P':>7s} "
          f"{'latency_ms':>11s} {'energy_mj':>10s} {'seconds':>7s} {'rss_mb':>7s} {'peak_mb':>7s}")


def native_size(name: str) -> int:
    """The crop size of the model's default weights' transforms (224 when it has none)."""
    try:
        return int(torchvision.models.get_model_weights(name).DEFAULT.transforms().crop_size[0])
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        return 224


def build(name: str, size: int) -> torch.nn.Module:
    """The untrained model with the architecture its default weights give."""
    kwargs: dict = {}
    if name.startswith("vit_"):  # the position embedding fits one size, taken from the weights (vit_h_14: 518)
        kwargs["image_size"] = size
    if name in ("googlenet", "inception_v3"):  # loading the weights drops the training-only auxiliary heads
        kwargs.update(aux_logits=False, init_weights=False)
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # kB on Linux


def _release_memory() -> None:
    gc.collect()
    try:  # glibc keeps freed arenas mapped; give them back so RSS shows what is still live
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def price_one(name: str, target: str) -> dict:
    """Build, price and free one model; the row (``error`` set if anything raised)."""
    size = native_size(name)
    row: dict = {"model": name, "input": size}
    t0 = time.perf_counter()
    try:
        model = build(name, size)
        row["params"] = sum(p.numel() for p in model.parameters())
        row["bn_params"] = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                               for p in m.parameters(recurse=False))
        cost = hw_models.estimate(model, (3, size, size), target)
        row.update(macs=cost.macs, size_bytes=cost.size_bytes, latency_ms=cost.latency_ms, energy_mj=cost.energy_mj)
        del model, cost
    except Exception as e:  # noqa: BLE001 - reported per model; the run goes on
        row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        row["traceback"] = traceback.format_exc(limit=-3)
    _release_memory()
    row["seconds"] = time.perf_counter() - t0
    row["rss_mb"] = rss_mb()
    row["peak_rss_mb"] = peak_rss_mb()
    return row


def format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['model']:22s} {r['input']:5d} ERROR {r['error']}"
    return (f"{r['model']:22s} {r['input']:5d} {r['params']:12,d} {r['macs']:16,d} {r['size_bytes']:14,d} "
            f"{r['size_bytes'] / (4 * r['params']):7.4f} {r['latency_ms']:11.2f} {r['energy_mj']:10.2f} "
            f"{r['seconds']:7.1f} {r['rss_mb']:7.0f} {r['peak_rss_mb']:7.0f}")


def to_markdown(rows: list[dict], summary: dict) -> str:
    """The rows as a markdown table, then the summary."""
    lines = ["| model | input | params | MACs | size_bytes | size/4P | latency_ms | energy_mj | s | RSS MB | peak MB |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['input']} | ERROR {r['error']} |")
            continue
        lines.append(f"| {r['model']} | {r['input']} | {r['params']:,} | {r['macs']:,} | {r['size_bytes']:,} | "
                     f"{r['size_bytes'] / (4 * r['params']):.4f} | {r['latency_ms']:.2f} | {r['energy_mj']:.2f} | "
                     f"{r['seconds']:.1f} | {r['rss_mb']:.0f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n\n" + json.dumps(summary) + "\n"


def price_all(names: list[str] | None = None, *, target: str = "arm-a72",
              progress: Callable[[str], None] | None = None) -> tuple[list[dict], dict]:
    """Price ``names`` (default: every torchvision classifier) in this process: rows and a summary."""
    torch.set_num_threads(1)
    names = names or torchvision.models.list_models(module=torchvision.models)
    rss0 = rss_mb()
    t0 = time.perf_counter()
    rows = []
    for name in names:
        rows.append(price_one(name, target))
        if progress is not None:
            progress(format_row(rows[-1]))
    summary = {"target": target, "models": len(rows), "failures": [r["model"] for r in rows if "error" in r],
               "seconds": round(time.perf_counter() - t0, 1), "rss_start_mb": round(rss0),
               "rss_end_mb": round(rss_mb()), "peak_rss_mb": round(peak_rss_mb()),
               "torch": torch.__version__, "torchvision": torchvision.__version__}
    return rows, summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="arm-a72")
    ap.add_argument("--models", nargs="*", help="torchvision model names (default: every classifier)")
    ap.add_argument("--json", help="write the rows and the summary here")
    ap.add_argument("--markdown", help="write the table here (benchmarks/RESULTS_price_torchvision.md)")
    args = ap.parse_args(argv)
    print(HEADER, flush=True)
    rows, summary = price_all(args.models, target=args.target, progress=lambda line: print(line, flush=True))
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "rows": rows}, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(to_markdown(rows, summary))
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
