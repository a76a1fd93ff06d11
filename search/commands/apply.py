"""``squeezer apply POLICY --model M [--checkpoint C] --dataset D --finetune-epochs E [--json]``.

Applies a policy file to a trained model (``--checkpoint``, else a base model trained once and
cached under ``runs/.cache``), fine-tunes it (with the policy's regulariser first and its
distillation from the base model, DNS masks updated every step), evaluates it on the test set
and prints size, accuracy, latency and energy next to the base model's (under ``base``).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..apply import apply
from ..report import metric_delta, metric_text


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("apply", help="apply a policy file to a model, fine-tune, evaluate on the test set",
                              description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("policy", help="policy file (squeezer.policy/1, JSON or YAML)")
    p.add_argument("--model", required=True, help="zoo name, torchvision name or package.module:factory")
    p.add_argument("--checkpoint", help="trained weights for --model (default: train briefly, cached in runs/.cache)")
    p.add_argument("--dataset", default="fashion-mnist", help="fashion-mnist (default), mnist, cifar10, digits, "
                                                               "imagefolder:PATH")
    p.add_argument("--data-root", help="where the dataset is looked for")
    p.add_argument("--finetune-epochs", type=float, default=1.0, help="fine-tune epochs after applying (default 1)")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tune learning rate (default 0.01)")
    p.add_argument("--base-epochs", type=float, default=2.0, help="epochs to train the base without --checkpoint (2)")
    p.add_argument("--train-size", type=int, help="use this many training images (default all)")
    p.add_argument("--target", default="arm", help="hardware target for latency/energy (default arm)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the compressed model here (squeezer.model/1 checkpoint)")
    p.add_argument("--cache", default="runs/.cache", help="base-model cache folder (default runs/.cache)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    r = apply(args.model, args.policy, data=args.dataset, finetune_epochs=args.finetune_epochs, lr=args.lr,
              target=args.target, seed=args.seed, base_epochs=args.base_epochs, train_size=args.train_size,
              checkpoint=args.checkpoint, data_root=args.data_root, cache=args.cache, out=args.out,
              progress=not args.json)
    out = r.metrics
    key = "test_metric" if "test_metric" in out else "val_metric"
    score, base_score = out[key], out["base"][key]
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    b = out["base"]
    ratio = b["size_bytes"] / max(1, out["size_bytes"])

    def fmt(v: Any, unit: str) -> str:
        return "n/a" if v is None else f"{v:.3f} {unit}"

    print(f"{args.model} on {args.dataset}, policy {args.policy} ({out['cost_source']}, target {out['target']})")
    print(f"  {key[:-7]} {out['metric']:<10} {metric_text(score, out['metric'])}   (base "
          f"{metric_text(base_score, out['metric'])}, {metric_delta(score, base_score, out['metric'])})")
    print(f"  size       {out['size_bytes']:,} B   (base {b['size_bytes']:,} B, {ratio:.1f}x smaller)")
    print(f"  latency    {fmt(out['latency_ms'], 'ms')}   (base {fmt(b['latency_ms'], 'ms')})")
    print(f"  energy     {fmt(out['energy_mj'], 'mJ')}   (base {fmt(b['energy_mj'], 'mJ')})")
    if args.out:
        print(f"  model      {args.out}")
    return 0
