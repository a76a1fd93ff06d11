"""``squeezer apply POLICY --model M [--checkpoint C] --dataset D --finetune-epochs E [--json]``.

Applies a policy file to a trained model (``--checkpoint``, else a base model trained once and
cached under ``runs/.cache``), fine-tunes it (with the policy's regulariser first and its
distillation from the base model, DNS masks updated every step), evaluates it on the test set
and prints size, accuracy, latency and energy next to the base model's (under ``base``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

from ..errors import UserError

log = logging.getLogger("squeezer")


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


def check_names(policy: Any) -> None:
    """Every method the policy names exists (before any training); UserError with a hint otherwise."""
    from ...compressors.lowrank import DECOMPOSITIONS
    from ...compressors.pruning import PRUNING_CRITERIA
    from ...compressors.quantize import QUANTIZERS
    from ...compressors.registry import UnknownNameError
    from ...compressors.sparsity import SPARSITY_METHODS

    checks = [(PRUNING_CRITERIA, policy.pruning.criterion), (SPARSITY_METHODS, policy.sparsity.method)]
    for lp in policy.layers.values():
        checks += [(QUANTIZERS, lp.quantizer), (DECOMPOSITIONS, lp.decomposition)]
        if lp.sharing is not None:
            from ...compressors.sharing import SHARING
            checks.append((SHARING, lp.sharing))
    if policy.regularizer is not None:
        from ...compressors.regularizers import REGULARIZERS
        checks.append((REGULARIZERS, policy.regularizer))
    if policy.distill is not None:
        from ...compressors.distill import DISTILLATION
        checks.append((DISTILLATION, policy.distill.method))
    for reg, name in checks:
        try:
            reg.get(name)
        except UnknownNameError as e:
            raise UserError(f"policy: {e}") from None


def load_policy(path: str) -> Any:
    from ...compressors.policy import Policy, PolicyError

    try:
        policy = Policy.load(path)
    except PolicyError as e:
        raise UserError(str(e)) from None
    check_names(policy)
    return policy


def base_model(args: argparse.Namespace, data: Any) -> tuple[Any, dict[str, Any]]:
    """``--checkpoint``, else the cache (same key as the search's), else train and cache."""
    import torch

    from ...evaluators.checkpoint import CheckpointError, load_checkpoint, load_state_dict_into, save_checkpoint
    from ...evaluators.models import build_model
    from ...evaluators.train import train

    torch.manual_seed(args.seed)  # the initialisation too: one seed, one base
    try:
        model = build_model(args.model, in_channels=data.input_shape[0], num_classes=data.num_classes)
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.checkpoint:
        try:
            load_state_dict_into(model, args.checkpoint)
        except CheckpointError as e:
            raise UserError(str(e)) from None
        return model.eval(), {"source": str(args.checkpoint)}
    safe = lambda s: s.replace(":", "_").replace("/", "_")  # noqa: E731
    size = f"-n{args.train_size}" if args.train_size else ""
    cache = Path(args.cache) / f"{safe(args.model)}-{safe(args.dataset)}-s{args.seed}-e{args.base_epochs:g}-v5000{size}.pt"
    if cache.is_file():
        try:
            return load_checkpoint(cache).model.eval(), {"source": str(cache)}
        except CheckpointError:
            log.warning("ignoring unreadable cache %s", cache)
    t0 = time.time()
    train(model, data.train, epochs=args.base_epochs, lr=0.1, seed=args.seed,
          augment=data.input_shape[1] >= 16, progress=not args.json, desc="base model")
    save_checkpoint(cache, model, model_name=args.model, input_shape=data.input_shape, num_classes=data.num_classes,
                    normalization={"mean": data.mean, "std": data.std}, meta={"source": "trained"})
    return model.eval(), {"source": "trained", "train_seconds": round(time.time() - t0, 1), "cached": str(cache)}


def measure(model: Any, input_shape: tuple[int, ...], policy: Any, target: str) -> dict[str, Any]:
    """Size / latency / energy from ``hw_models`` (``base`` model + policy); parameter count if unavailable."""
    try:
        from ... import hw_models

        cost = hw_models.estimate(model, input_shape=input_shape, target=target, policy=policy)
        return {"size_bytes": int(cost.size_bytes), "latency_ms": float(cost.latency_ms),
                "energy_mj": float(cost.energy_mj), "macs": int(cost.macs), "params": int(cost.params),
                "target": cost.target or target, "cost_source": "hw_models"}
    except (ImportError, AttributeError) as e:
        log.warning("hw_models unavailable (%s): size from parameter counts", e)
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise UserError(f"target {target!r}: {str(e).strip(chr(39))}") from None
    params = sum(p.numel() for p in model.parameters())
    return {"size_bytes": 4 * params, "latency_ms": None, "energy_mj": None, "params": params,
            "target": target, "cost_source": "param_count (fp32; hw_models unavailable)"}


def handler(args: argparse.Namespace) -> int:
    import torch

    from ...compressors.apply import apply_policy_
    from ...compressors.pruning import PruneResult
    from ...compressors.sparsity import sparsity_step_hook
    from ...evaluators.datasets import load_dataset
    from ...evaluators.train import evaluate, recalibrate_bn_, train

    if args.finetune_epochs < 0:
        raise UserError(f"`--finetune-epochs >= 0` must hold, but got {args.finetune_epochs}")
    policy = load_policy(args.policy)
    try:
        data = load_dataset(args.dataset, args.data_root, seed=args.seed)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    if args.train_size:
        data.train = data.train.subset(args.train_size, seed=args.seed)
    base, base_meta = base_model(args, data)
    shape = data.input_shape
    t0 = time.time()
    base_acc = evaluate(base, data.test)
    model = copy.deepcopy(base)
    torch.manual_seed(args.seed)
    reg_stats: dict[str, Any] = {}
    if policy.regularizer is not None:
        from ...compressors.regularizers import regularized_train

        reg_stats = regularized_train(model, data.train, policy, epochs=max(args.finetune_epochs, 0.5), lr=args.lr,
                                      seed=args.seed, progress=not args.json, desc="regularised training")
    batches = data.train.first_batches(8, 128, seed=args.seed)
    try:
        result = apply_policy_(model, policy, shape, data=batches)
    except ValueError as e:
        raise UserError(f"cannot apply the policy to {args.model}: {e}") from None
    resolved = result.kept.resolved_policy(policy) if isinstance(result.kept, PruneResult) else policy
    if args.finetune_epochs > 0:
        train(model, data.train, epochs=args.finetune_epochs, lr=args.lr, seed=args.seed,
              teacher=base if policy.distill is not None else None, distill=policy.distill,
              step_hook=sparsity_step_hook(model), progress=not args.json, desc="fine-tune")
    else:
        recalibrate_bn_(model, data.train)
    acc = evaluate(model, data.test)
    out = {"model": args.model, "dataset": args.dataset, "policy_file": str(args.policy),
           "accuracy": acc, **measure(base, shape, resolved, args.target),
           "finetune_epochs": args.finetune_epochs, "seconds": round(time.time() - t0, 1),
           "policy": resolved.to_dict(),
           "base": {"accuracy": base_acc, **measure(base, shape, None, args.target), **base_meta}}
    if reg_stats:
        out["regularizer"] = {k: v for k, v in reg_stats.items() if k not in ("steps", "loss")}
    if args.out:
        from ...evaluators.checkpoint import save_checkpoint

        save_checkpoint(args.out, model, model_name=args.model, input_shape=shape, num_classes=data.num_classes,
                        policy=resolved, normalization={"mean": data.mean, "std": data.std},
                        meta={"accuracy": acc})
        out["out"] = str(args.out)
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    b = out["base"]
    ratio = b["size_bytes"] / max(1, out["size_bytes"])

    def fmt(v: Any, unit: str) -> str:
        return "n/a" if v is None else f"{v:.3f} {unit}"

    print(f"{args.model} on {args.dataset}, policy {args.policy} ({out['cost_source']}, target {out['target']})")
    print(f"  accuracy   {acc:.4f}   (base {base_acc:.4f}, {100 * (acc - base_acc):+.2f} pp)")
    print(f"  size       {out['size_bytes']:,} B   (base {b['size_bytes']:,} B, {ratio:.1f}x smaller)")
    print(f"  latency    {fmt(out['latency_ms'], 'ms')}   (base {fmt(b['latency_ms'], 'ms')})")
    print(f"  energy     {fmt(out['energy_mj'], 'mJ')}   (base {fmt(b['energy_mj'], 'mJ')})")
    if args.out:
        print(f"  model      {args.out}")
    return 0
