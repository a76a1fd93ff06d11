"""Reproduce the headline results of the papers squeezer builds on, on Fashion-MNIST.

Experiments (goals from issue 4):

* ``lenet_prune_qat``   — LeNet-5 structured pruning + 4-bit QAT with distillation
  (seed paper: 78% smaller at -1.6 pp; goal >= 10x smaller at <= 0.5 pp drop).
* ``deep_compression``  — LeNet-5 magnitude pruning + k-means sharing + Huffman coding
  (Han et al. 2016; goal >= 40x smaller at <= 1 pp drop).
* ``channels_vgg`` / ``channels_resnet20`` — global saliency channel pruning + distillation
  (goal >= 70% of channels removed at <= 0.5 pp drop).
* ``ls_vs_uniform_2bit`` — LeNet-5 2-bit QAT with least-squares vs uniform quantizers.

Sizes come from ``hw_models.estimate`` (exact packed bytes; Huffman sizes are entropy
estimates); accuracy is on the Fashion-MNIST test set. The CPU budget is modest by default
(training subsets, few epochs); raise ``--train-size`` / ``--epochs`` for closer numbers.

Usage::

    python benchmarks/reproduce_papers.py                      # all, writes benchmarks/RESULTS_papers.md
    python benchmarks/reproduce_papers.py --only deep_compression --train-size 60000 --epochs 8
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressors.apply import apply_policy_  # noqa: E402
from compressors.policy import DistillConfig, LayerPolicy, Policy, PruningConfig, SparsityConfig  # noqa: E402
from compressors.pruning import PruneResult  # noqa: E402
from compressors.sparsity import sparsity_step_hook  # noqa: E402
from evaluators.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from evaluators.datasets import load_dataset  # noqa: E402
from evaluators.models import build_model  # noqa: E402
from evaluators.train import evaluate, train  # noqa: E402


def base_model(name: str, data: Any, args: argparse.Namespace, epochs: float) -> torch.nn.Module:
    cache = ROOT / "runs" / ".cache" / f"papers-{name}-n{len(data.train)}-e{epochs:g}-s{args.seed}.pt"
    if cache.is_file():
        return load_checkpoint(cache).model.eval()
    torch.manual_seed(args.seed)
    m = build_model(name, in_channels=1, num_classes=10)
    train(m, data.train, epochs=epochs, lr=0.05 if name == "lenet5" else 0.1, seed=args.seed, augment=False,
          progress=args.progress, desc=f"base {name}")
    save_checkpoint(cache, m, model_name=name, input_shape=data.input_shape, num_classes=10)
    return m.eval()


def cost(model: torch.nn.Module, policy: Policy | None) -> dict[str, Any]:
    import hw_models

    c = hw_models.estimate(model, input_shape=(1, 28, 28), target="arm", policy=policy)
    return {"size_bytes": int(c.size_bytes), "latency_ms": float(c.latency_ms), "exact": bool(c.size_exact)}


def compress(base: torch.nn.Module, policy: Policy, data: Any, args: argparse.Namespace, *,
             epochs: float, lr: float = 0.01) -> dict[str, Any]:
    """Apply ``policy`` to a copy of ``base``, fine-tune (KD from base if the policy says), measure."""
    m = copy.deepcopy(base)
    torch.manual_seed(args.seed)
    batches = data.train.first_batches(8, 128, seed=args.seed)
    res = apply_policy_(m, policy, data.input_shape, data=batches)
    acc_before = evaluate(m, data.test)
    resolved = res.kept.resolved_policy(policy) if isinstance(res.kept, PruneResult) else policy
    train(m, data.train, epochs=epochs, lr=lr, seed=args.seed, teacher=base if policy.distill else None,
          distill=policy.distill, step_hook=sparsity_step_hook(m), progress=args.progress, desc="fine-tune")
    acc = evaluate(m, data.test)
    kept = res.kept
    removed = (sum(kept.sizes[g] - k for g, k in kept.items()) / max(1, sum(kept.sizes.values()))
               if isinstance(kept, PruneResult) else 0.0)
    return {"accuracy": acc, "accuracy_before_ft": acc_before, "channels_removed": removed, **cost(base, resolved)}


def row(name: str, paper: str, goal: str, base_acc: float, base_cost: dict, r: dict, ok: bool) -> dict[str, Any]:
    return {"experiment": name, "paper": paper, "goal": goal, "base_accuracy": base_acc, "accuracy": r["accuracy"],
            "drop_pp": 100 * (base_acc - r["accuracy"]), "size_bytes": r["size_bytes"],
            "base_size_bytes": base_cost["size_bytes"], "smaller_x": base_cost["size_bytes"] / max(1, r["size_bytes"]),
            "accuracy_before_ft": r.get("accuracy_before_ft"),
            "channels_removed": r.get("channels_removed", 0.0), "met": ok, "size_exact": r.get("exact", True)}


def exp_lenet_prune_qat(data, args) -> list[dict]:
    base = base_model("lenet5", data, args, args.epochs)
    b_acc, b_cost = evaluate(base, data.test), cost(base, None)
    pol = Policy(layers={"_default": LayerPolicy(prune_ratio=0.25, weight_bits=4, quantizer="lsq")},
                 pruning=PruningConfig(criterion="taylor"), distill=DistillConfig(alpha=0.7, temperature=4))
    r = compress(base, pol, data, args, epochs=args.ft_epochs)
    x = b_cost["size_bytes"] / r["size_bytes"]
    return [row("LeNet-5 pruning + 4-bit QAT (taylor 25%, LSQ, KD)", "78% smaller at -1.6 pp",
                ">= 10x at <= 0.5 pp", b_acc, b_cost, r, x >= 10 and 100 * (b_acc - r["accuracy"]) <= 0.5)]


def exp_deep_compression(data, args) -> list[dict]:
    base = base_model("lenet5", data, args, args.epochs)
    b_acc, b_cost = evaluate(base, data.test), cost(base, None)
    pol = Policy(layers={"_default": LayerPolicy(prune_ratio=0.4, sparsity=0.85, weight_bits=4, sharing="kmeans"),
                         "features.0": LayerPolicy(prune_ratio=0.4, weight_bits=8)},
                 pruning=PruningConfig(criterion="taylor"), sparsity=SparsityConfig(method="dns"), coding="huffman",
                 distill=DistillConfig(alpha=0.7, temperature=4))
    r = compress(base, pol, data, args, epochs=args.dc_ft_epochs)
    x = b_cost["size_bytes"] / r["size_bytes"]
    return [row("LeNet-5 Deep Compression (taylor 40% + DNS 85% + k-means 4-bit + Huffman, KD)", "Han et al.: 39x (MNIST)",
                ">= 40x at <= 1 pp", b_acc, b_cost, r, x >= 40 and 100 * (b_acc - r["accuracy"]) <= 1.0)]


def _channels(name: str, label: str) -> Callable:
    def run(data, args) -> list[dict]:
        base = base_model(name, data, args, args.big_epochs)
        b_acc, b_cost = evaluate(base, data.test), cost(base, None)
        pol = Policy(pruning=PruningConfig(criterion="saliency", global_ratio=0.71),
                     distill=DistillConfig(alpha=0.7, temperature=4))
        r = compress(base, pol, data, args, epochs=args.big_ft_epochs, lr=0.02)
        ok = r["channels_removed"] >= 0.7 and 100 * (b_acc - r["accuracy"]) <= 0.5
        return [row(f"{label} channel pruning (saliency, global 71%, KD)", "thesis: >= 70% channels (CIFAR)",
                    ">= 70% channels at <= 0.5 pp", b_acc, b_cost, r, ok)]
    return run


def exp_ls_vs_uniform(data, args) -> list[dict]:
    base = base_model("lenet5", data, args, args.epochs)
    b_acc, b_cost = evaluate(base, data.test), cost(base, None)
    out = []
    accs = {}
    for q in ("uniform", "least_squares"):
        pol = Policy(layers={"_default": LayerPolicy(weight_bits=2, quantizer=q)})
        r = compress(base, pol, data, args, epochs=args.ft_epochs)
        accs[q] = r["accuracy"]
        out.append(row(f"LeNet-5 2-bit QAT, {q}", "least squares < uniform error (LQ/LS papers)",
                       "least_squares >= uniform (PTQ)", b_acc, b_cost, r, True))
    ptq = {o["experiment"].rsplit(" ", 1)[-1]: o["accuracy_before_ft"] for o in out}
    for o in out:  # the defining property is the quantization error: compare before fine-tune (PTQ)
        o["met"] = ptq["least_squares"] >= ptq["uniform"]
    return out


EXPERIMENTS: dict[str, Callable] = {
    "lenet_prune_qat": exp_lenet_prune_qat,
    "deep_compression": exp_deep_compression,
    "channels_vgg": _channels("vgg_small", "VGG-small"),
    "channels_resnet20": _channels("resnet20", "ResNet-20"),
    "ls_vs_uniform_2bit": exp_ls_vs_uniform,
}


def table(rows: list[dict]) -> str:
    lines = ["| experiment | paper | goal | base acc | acc before FT | acc | drop (pp) | size (B) | smaller "
             "| channels removed | met |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        size = f"{r['size_bytes']:,}" + ("" if r["size_exact"] else " (est.)")
        lines.append(f"| {r['experiment']} | {r['paper']} | {r['goal']} | {r['base_accuracy']:.4f} | "
                     f"{r['accuracy_before_ft']:.4f} | {r['accuracy']:.4f} | {r['drop_pp']:+.2f} | {size} | {r['smaller_x']:.1f}x | "
                     f"{100 * r['channels_removed']:.0f}% | {'yes' if r['met'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", choices=list(EXPERIMENTS), help="run only these experiments")
    p.add_argument("--train-size", type=int, default=20000, help="training images (default 20000 of 55000)")
    p.add_argument("--epochs", type=float, default=6, help="LeNet-5 base epochs")
    p.add_argument("--ft-epochs", type=float, default=3, help="LeNet-5 fine-tune epochs")
    p.add_argument("--dc-ft-epochs", type=float, default=8, help="Deep-Compression fine-tune epochs (DNS)")
    p.add_argument("--big-train-size", type=int, default=4000, help="training images for VGG-small / ResNet-20")
    p.add_argument("--big-epochs", type=float, default=3, help="VGG-small / ResNet-20 base epochs")
    p.add_argument("--big-ft-epochs", type=float, default=1.5, help="VGG-small / ResNet-20 fine-tune epochs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS_papers.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    full = load_dataset("fashion-mnist")
    rows: list[dict] = []
    t0 = time.time()
    for name in args.only or list(EXPERIMENTS):
        big = name.startswith("channels_")
        data = copy.copy(full)
        data.train = full.train.subset(args.big_train_size if big else args.train_size, seed=args.seed)
        t = time.time()
        got = EXPERIMENTS[name](data, args)
        for r in got:
            r["seconds"] = round(time.time() - t, 1)
            print(json.dumps(r), flush=True)
        rows += got
    md = table(rows)
    print(md)
    cmd = "python benchmarks/reproduce_papers.py " + " ".join(sys.argv[1:] if argv is None else argv)
    Path(args.out).write_text(
        "# Paper reproductions on Fashion-MNIST\n\n"
        f"Command: `{cmd.strip()}` ({time.time() - t0:.0f} s on a shared 2-core CPU, {args.threads} thread(s); "
        f"LeNet-5 on {args.train_size} training images, VGG-small/ResNet-20 on {args.big_train_size}; "
        "test accuracy on the full 10k test set; sizes from `hw_models.estimate` on target `arm`).\n\n"
        + md + "\n\n```json\n" + json.dumps(rows, indent=1) + "\n```\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
