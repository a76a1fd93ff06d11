"""``squeezer export RUN [--trial N] [--format F] [--out PATH]``: deployable artifacts, verified.

Without ``--format`` it writes the chosen policy (``policy.json``) and the compressed model
(``model.pt``, a ``squeezer.model/1`` checkpoint loadable with ``torch.load(..., weights_only=True)``)
into ``--out`` (a folder, default ``RUN/export/``). Every artifact is run by its own runtime on
the test set and its accuracy and size are printed next to what the search reported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import UserError

SUFFIX = {"policy": "policy.json", "onnx": "model.onnx", "pte": "model.pte", "torchscript": "model.torchscript.pt",
          "state_dict": "model.pt"}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("export", help="write the chosen policy/model as policy, onnx, pte, torchscript or "
                                             "state_dict, and verify it with its own runtime",
                              description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("run", help="run folder written by `squeezer search`")
    p.add_argument("--trial", type=int, help="export trial N instead of the chosen (best) policy")
    p.add_argument("--finetune", type=float, metavar="EPOCHS", nargs="?", const=1.0,
                   help="with --trial: fine-tune the trial's policy from the base model first (default 1 epoch) "
                        "when trials/NNNN/model.pt does not exist")
    p.add_argument("--format", dest="fmt", help="policy, onnx, pte, torchscript or state_dict "
                                               "(default: policy.json + model.pt)")
    p.add_argument("--out", help="file to write (a folder without --format; default RUN/export/)")
    p.add_argument("--data-root", help="where the run's dataset is looked for (default: the run's config)")
    p.add_argument("--test-size", type=int, help="verify on this many test images (default: the whole test set)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=handler)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {str(e).splitlines()[0]}") from None


def _run_config(run: Path) -> dict[str, Any]:
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        return {}
    import yaml

    try:
        return yaml.safe_load(cfg_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"cannot parse {cfg_path}: {str(e).splitlines()[0]}") from None


def resolve_model(run: Path, trial: int | None, finetune: float | None, data_fn: Any) -> tuple[Path, dict, str]:
    """(checkpoint path, reported metrics, label) of the best model or of trial ``trial``."""
    if trial is None:
        ckpt = run / "best" / "model.pt"
        if not ckpt.is_file():
            raise UserError(f"{run} has no chosen model yet ({ckpt} is missing); finish the search with "
                            f"`squeezer resume {run}`")
        metrics_path = run / "best" / "metrics.json"
        return ckpt, _read_json(metrics_path) if metrics_path.is_file() else {}, "best"
    rec_path = run / "trials" / f"{trial:04d}.json"
    if not rec_path.is_file():
        known = sorted(p.stem for p in (run / "trials").glob("[0-9]*.json")) if (run / "trials").is_dir() else []
        raise UserError(f"trial {trial} not found ({rec_path} is missing); trials in {run}: "
                        f"{', '.join(str(int(k)) for k in known) or 'none'}")
    rec = _read_json(rec_path)
    metrics = dict(rec.get("metrics") or {})
    ckpt = run / "trials" / f"{trial:04d}" / "model.pt"
    if ckpt.is_file():
        return ckpt, metrics, f"trial {trial}"
    if finetune is None:
        raise UserError(f"trial {trial} has no fine-tuned model ({ckpt} is missing); fine-tune it first: "
                        f"squeezer export {run} --trial {trial} --finetune 1")
    from ...compressors.export import finetune_policy
    from ...compressors.policy import Policy, PolicyError
    from ...evaluators.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
    from ...evaluators.train import evaluate

    try:
        policy = Policy.from_dict(rec.get("policy") or {})
        base = load_checkpoint(run / "base" / "model.pt")
    except (PolicyError, CheckpointError) as e:
        raise UserError(str(e)) from None
    data = data_fn()
    print(f"fine-tuning trial {trial} for {finetune:g} epoch(s) from {run / 'base' / 'model.pt'} ...", file=sys.stderr)
    model = finetune_policy(base, policy, data, epochs=finetune, progress=True)
    test_acc = evaluate(model, data.test)
    # A re-fine-tuned trial has its own accuracy: the search's numbers were from a short fine-tune.
    metrics = {**metrics, "test_accuracy": test_acc, "finetune_epochs": finetune}
    save_checkpoint(ckpt, model, model_name=base.model_name, input_shape=base.input_shape,
                    num_classes=base.num_classes, policy=policy, normalization=base.normalization, meta=metrics)
    return ckpt, metrics, f"trial {trial}"


def format_table(results: list[Any], reported: dict[str, Any], label: str) -> str:
    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * float(v):.2f}%"

    def num(v: Any) -> str:
        return "-" if v is None else f"{int(v):,}"

    rows = [("artifact", "format", "file bytes", "size model B", "search size B", "runtime acc",
             "PyTorch acc", "search acc", "max |dlogit|")]
    for r in results:
        rows.append((str(r.path), r.format, num(r.file_bytes), num(r.expected_bytes), num(reported.get("size_bytes")),
                     pct(r.accuracy), pct(r.torch_accuracy), pct(r.reported_accuracy),
                     "-" if r.max_logit_diff is None else f"{r.max_logit_diff:.2e}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"export of {label}: verified by each artifact's own runtime"]
    for k, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    for r in results:
        for n in r.notes:
            lines.append(f"note ({r.format}): {n}")
        if r.size_ratio is not None and r.format == "onnx":
            lines.append(f"{r.format}: file / size model = {r.size_ratio:.3f} ({r.expected_source})")
    return "\n".join(lines)


def handler(args: argparse.Namespace) -> int:
    from ...compressors.export import EXPORT_FORMATS, ExportError, VerificationError, export_model
    from ...compressors.registry import UnknownNameError
    from ...evaluators.checkpoint import CheckpointError, load_checkpoint

    run = Path(args.run)
    if not run.is_dir():
        raise UserError(f"run folder not found: {run}")
    if args.fmt is not None:
        try:
            EXPORT_FORMATS.get(args.fmt)
        except UnknownNameError as e:
            raise UserError(str(e)) from None
    if args.trial is not None and args.trial < 0:
        raise UserError(f"`--trial >= 0` must hold, but got --trial {args.trial}")
    if args.test_size is not None and args.test_size < 1:
        raise UserError(f"`--test-size >= 1` must hold, but got --test-size {args.test_size}")
    cfg = _run_config(run)
    cache: dict[str, Any] = {}

    def data_fn() -> Any:
        if "data" not in cache:
            from ...evaluators.datasets import DatasetNotFound, load_dataset

            try:
                d = load_dataset(cfg.get("dataset") or "fashion-mnist", args.data_root or cfg.get("data_root"),
                                 seed=int(cfg.get("seed") or 0))
            except (DatasetNotFound, ValueError) as e:
                raise UserError(str(e)) from None
            if args.test_size is not None:
                d.test = d.test.subset(args.test_size)
            cache["data"] = d
        return cache["data"]

    ckpt, reported, label = resolve_model(run, args.trial, args.finetune, data_fn)
    if args.test_size is not None:
        reported = {k: v for k, v in reported.items() if k != "test_accuracy"}  # measured on another set
    try:
        loaded = load_checkpoint(ckpt)
    except CheckpointError as e:
        raise UserError(str(e)) from None
    target = reported.get("target") or cfg.get("target")
    sub = "" if args.trial is None else f"trial-{args.trial:04d}/"
    if args.fmt is None:
        out_dir = Path(args.out) if args.out else run / "export" / sub
        jobs = [("policy", out_dir / SUFFIX["policy"]), ("state_dict", out_dir / SUFFIX["state_dict"])]
    else:
        out = Path(args.out) if args.out else run / "export" / sub / SUFFIX[args.fmt]
        if out.is_dir():
            out = out / SUFFIX[args.fmt]
        jobs = [(args.fmt, out)]
    data = data_fn()
    results = []
    try:
        for fmt, path in jobs:
            results.append(export_model(loaded, fmt, path, data=data, target=target, reported=reported))
    except VerificationError as e:
        print(f"squeezer: error: verification failed: {e}", file=sys.stderr)
        return 1
    except ExportError as e:
        raise UserError(str(e)) from None
    if args.json:
        print(json.dumps({"source": str(ckpt), "label": label, "reported": reported,
                          "artifacts": [r.to_dict() for r in results]}, indent=2))
    else:
        print(format_table(results, reported, label))
    return 0
