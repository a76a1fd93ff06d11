"""Segmentation (LRASPP MobileNetV3-Large) and detection (SSDlite MobileNetV3-Large) compressed to a
size budget >= 3x below fp32 through ``squeezer.search`` with their own loss and metric, on sets
derived from Fashion-MNIST (benchmarks/make_datasets.py; written here if missing).

    python benchmarks/tasks_compress.py seg --out runs/tasks   # LRASPP, 64 px, mIoU, budget 4MB
    python benchmarks/tasks_compress.py det --out runs/tasks   # SSDlite at 128 px, mAP@0.5, budget 3MB

Prints and writes ``OUT/<task>.json``: fp32 size, budget, chosen size, the metric of the base,
of the base fine-tuned as long as the chosen model was (equal fine-tune budget) and of the
chosen model, predicted latency on ``arm``, and the layers pruning leaves whole (and why).
Models start untrained (no downloads); the base is trained here once and cached in OUT.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from torchvision import models

import squeezer
from squeezer import hw_models
from squeezer.compressors.pruning import channel_groups
from squeezer.evaluators.derived import write_detection_set, write_segmentation_set
from squeezer.evaluators.splits import as_split
from squeezer.evaluators.tasks import (
    CocoBoxes,
    ImageMasks,
    detection_loss,
    fixed_input_size_,
    map50,
    miou,
    segmentation_loss,
)
from squeezer.evaluators.train import score, train

TASKS = {
    "seg": dict(model="lraspp_mobilenet_v3_large", px=64, budget="4MB", metric=miou, loss=segmentation_loss,
                base_lr=0.05, batch=16),
    "det": dict(model="ssdlite320_mobilenet_v3_large", px=128, budget="3MB", metric=map50, loss=detection_loss,
                base_lr=0.02, batch=16),
}


def data(task: str, root: Path, n_train: int, n_val: int) -> tuple:
    px = TASKS[task]["px"]
    tr, va = root / f"{task}{px}_train{n_train}", root / f"{task}{px}_val{n_val}"
    write = write_segmentation_set if task == "seg" else write_detection_set
    for d, n, split, seed in ((tr, n_train, "train", 0), (va, n_val, "test", 1)):
        if not d.is_dir():
            write(d, n, px, split=split, seed=seed)
    if task == "seg":
        return ImageMasks(tr, flip=True), ImageMasks(va)
    return CocoBoxes(tr / "images", tr / "annotations.json"), CocoBoxes(va / "images", va / "annotations.json")


def build(task: str) -> torch.nn.Module:
    torch.manual_seed(0)
    m = models.get_model(TASKS[task]["model"], weights=None, weights_backbone=None, num_classes=11)
    return fixed_input_size_(m, TASKS[task]["px"]) if task == "det" else m


def base_model(task: str, train_set, out: Path, epochs: float) -> tuple[torch.nn.Module, float]:
    t = TASKS[task]
    cache = out / f"{task}_base_e{epochs:g}.pt"
    m = build(task)
    if cache.is_file():
        m.load_state_dict(torch.load(cache, weights_only=True))
        return m.eval(), json.loads(cache.with_suffix(".json").read_text())["seconds"]
    t0 = time.time()
    train(m, as_split(train_set), epochs=epochs, lr=t["base_lr"], batch_size=t["batch"], loss_fn=t["loss"],
          progress=True, desc=f"{task} base")
    torch.save(m.state_dict(), cache)
    secs = round(time.time() - t0, 1)
    cache.with_suffix(".json").write_text(json.dumps({"seconds": secs}))
    return m.eval(), secs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=sorted(TASKS))
    p.add_argument("--out", default="runs/tasks")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--val", type=int, default=300)
    p.add_argument("--base-epochs", type=float, default=8)
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--trial-steps", type=int, default=60)
    p.add_argument("--final-epochs", type=float, default=1.5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t = TASKS[a.task]
    train_set, val_set = data(a.task, out, a.train, a.val)
    base, base_secs = base_model(a.task, train_set, out, a.base_epochs)
    shape = (3, t["px"], t["px"])
    val = as_split(val_set)
    metric_base = score(base, val, t["metric"])
    run = out / f"{a.task}_run"
    t0 = time.time()
    result = squeezer.search(base, data=(train_set, val_set), metric=t["metric"], loss=t["loss"], budget=t["budget"],
                             target="arm", trials=a.trials, trial_steps=a.trial_steps, final_epochs=a.final_epochs,
                             batch_size=t["batch"], sensitivity=False, latency_seeds="none", run=str(run),
                             threads=a.threads)
    search_secs = time.time() - t0
    # Equal fine-tune budget: the uncompressed base fine-tuned as long as the chosen model was.
    ft = copy.deepcopy(base)
    torch.manual_seed(0)
    train(ft, as_split(train_set), epochs=a.final_epochs, lr=0.01, batch_size=t["batch"], loss_fn=t["loss"],
          progress=False)
    metric_ft = score(ft, val, t["metric"])
    target = hw_models.get_target("arm")
    base_cost = hw_models.estimate_table(hw_models.trace(base, shape), None, target)
    best = result.best.metrics
    report = {
        "task": a.task, "model": t["model"], "input_px": t["px"], "metric": best["metric"],
        "train_images": len(train_set), "val_images": len(val_set), "base_epochs": a.base_epochs,
        "base_train_seconds": base_secs, "fp32_bytes": int(base_cost.size_bytes), "budget": t["budget"],
        "chosen_bytes": int(best["size_bytes"]), "compression_x": round(base_cost.size_bytes / best["size_bytes"], 2),
        "metric_base": round(metric_base, 4), "metric_base_finetuned_equal_budget": round(metric_ft, 4),
        "metric_chosen": round(best["val_metric"], 4),
        "gap_points_vs_equal_budget": round(100 * (metric_ft - best["val_metric"]), 2),
        "latency_ms_arm_base": round(base_cost.latency_ms, 3), "latency_ms_arm_chosen": round(best["latency_ms"], 3),
        "trials": a.trials, "trial_steps": a.trial_steps, "final_epochs": a.final_epochs,
        "final_steps": math.ceil(a.final_epochs * math.ceil(len(train_set) / t["batch"])),
        "search_seconds": round(search_secs, 1), "run": str(run),
        "unpruned": channel_groups(base, shape).unpruned(),
        "policy_summary": _summary(result.best.policy, base),
    }
    (out / f"{a.task}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "unpruned"}, indent=2))


def _summary(policy, model: torch.nn.Module) -> dict[str, int]:
    """How many conv/linear layers got each weight width, and how many were pruned."""
    counts: dict[str, int] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
            lp = policy.for_layer(name)
            key = f"w{lp.weight_bits or 32}" + ("+pruned" if lp.prune_ratio > 0 else "")
            counts[key] = counts.get(key, 0) + 1
    return counts


if __name__ == "__main__":
    main()
