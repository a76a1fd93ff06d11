"""Real-size image folders: loader vs training throughput, and the peak memory of a search.

    # images/s: the streamed loader alone, a MobileNetV3-small training step alone (one batch held),
    # and training fed by the loader (the loader is not the bottleneck if the last is near the second)
    python benchmarks/real_data.py loader --folder DIR --image-size 224 --workers 2 --batch-size 32

    # peak memory of a command's process tree (sampled every 0.5 s from /proc): the main process's
    # RSS, and the tree's PSS (loader workers share the parent's pages: their RSS would count them twice)
    python benchmarks/real_data.py rss -- squeezer search --model torchvision:mobilenet_v3_small ...

Make the folders with ``benchmarks/make_datasets.py folder``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from squeezer.evaluators.datasets import load_dataset
from squeezer.evaluators.models import build_model


def loader_vs_training(folder: str, image_size: int, workers: int, batch_size: int, batches: int,
                       threads: int) -> dict:
    torch.set_num_threads(threads)
    t0 = time.time()
    d = load_dataset(f"imagefolder:{folder}", image_size=image_size, workers=workers, val_size=500)
    setup = time.time() - t0
    it = d.train.batches(batch_size, shuffle=True, seed=0)
    xb, yb = next(it)                              # the workers' start-up is not throughput
    t0 = time.time()
    n = sum(len(y) for _, y in (next(it) for _ in range(batches)))
    loader = n / (time.time() - t0)
    model = build_model("torchvision:mobilenet_v3_small", in_channels=3, num_classes=d.num_classes).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(x, y) -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    step(xb, yb)
    steps = max(3, batches // 4)
    t0 = time.time()
    for _ in range(steps):
        step(xb, yb)
    alone = steps * len(yb) / (time.time() - t0)
    it = d.train.batches(batch_size, shuffle=True, seed=1)
    step(*next(it))
    t0 = time.time()
    for _ in range(steps):
        step(*next(it))
    fed = steps * batch_size / (time.time() - t0)
    return {"images": len(d.train) + len(d.val) + len(d.test), "image_size": image_size, "workers": workers,
            "batch_size": batch_size, "torch_threads": threads, "setup_seconds": round(setup, 1),
            "loader_images_per_s": round(loader, 1), "train_step_images_per_s": round(alone, 1),
            "train_fed_by_loader_images_per_s": round(fed, 1)}


def _tree(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                parents[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(c for c, pp in parents.items() if pp == pid)
    return out


def _kb(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_memory(cmd: list[str]) -> dict:
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    peak_main = peak_pss = peak_rss = most = 0
    while proc.poll() is None:
        pids = _tree(proc.pid)
        # the flock / shell wrappers hold little; the Python process is the largest
        rss = {p: _kb(Path(f"/proc/{p}/status"), "VmRSS:") for p in pids}
        peak_main = max(peak_main, max(rss.values(), default=0))
        peak_rss = max(peak_rss, sum(rss.values()))
        peak_pss = max(peak_pss, sum(_kb(Path(f"/proc/{p}/smaps_rollup"), "Pss:") for p in pids))
        most = max(most, len(pids))
        time.sleep(0.5)
    return {"command": " ".join(cmd), "returncode": proc.returncode, "wall_seconds": round(time.time() - t0, 1),
            "peak_main_rss_mb": round(peak_main / 1024, 1), "peak_tree_pss_mb": round(peak_pss / 1024, 1),
            "peak_tree_rss_sum_mb": round(peak_rss / 1024, 1), "max_processes": most}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    lo = sub.add_parser("loader")
    lo.add_argument("--folder", required=True)
    lo.add_argument("--image-size", type=int, default=224)
    lo.add_argument("--workers", type=int, default=2)
    lo.add_argument("--batch-size", type=int, default=32)
    lo.add_argument("--batches", type=int, default=40)
    lo.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    rs = sub.add_parser("rss")
    rs.add_argument("cmd", nargs=argparse.REMAINDER)
    a = p.parse_args()
    if a.what == "loader":
        out = loader_vs_training(a.folder, a.image_size, a.workers, a.batch_size, a.batches, a.threads)
    else:
        cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
        out = peak_memory(cmd)
    print(json.dumps(out, indent=2))
    sys.exit(0 if out.get("returncode", 0) == 0 else 1)


if __name__ == "__main__":
    main()
