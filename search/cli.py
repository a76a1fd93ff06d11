"""The ``squeezer`` command line (the only place that parses arguments or prints for people).

Every command parses its arguments, calls the Python API (:mod:`search.api`, :mod:`search.tools`,
...) and prints. Subcommands here: ``search``, ``resume``, ``report``, ``cost``, ``targets``,
``calibrate``. More are discovered in ``search/commands/*.py``: each module's
``register(subparsers)`` adds one and sets ``func=handler`` (``handler(args) -> int``).

Bad input raises :class:`~search.errors.UserError`; ``main`` prints it as one line on
stderr and exits 2 (set ``SQUEEZER_DEBUG=1`` for tracebacks of unexpected errors).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import pkgutil
import signal
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Sequence

from . import api, commands, tools
from .budget import format_bytes
from .config import SearchConfig
from .errors import RunStopped, UserError, raise_terminated
from .report import count_line, format_report, summary_table


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        raise UserError(f"{self.prog}: {message}")


def _add_search_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to compress")
    g.add_argument("--model", help="zoo name (lenet5, resnet20, vgg_small, mobilenet_v2), a torchvision "
                                   "model name, or package.module:factory (default mobilenet_v2)")
    g.add_argument("--checkpoint", help="trained weights for --model (squeezer checkpoint or a state dict)")
    g.add_argument("--weights", help="pretrained weights for a torchvision --model: a local state-dict file, or "
                                     "DEFAULT (torchvision's download); the head is fitted to the data's classes")
    g.add_argument("--dataset", help="fashion-mnist (default), mnist, cifar10, digits, imagefolder:PATH")
    g.add_argument("--data-root", help="where datasets are looked for (also $SQUEEZER_DATA)")
    g.add_argument("--image-size", type=int, dest="image_size",
                   help="imagefolder: side in pixels (224); train: random resized crop + flip, eval: resize + centre crop")
    g.add_argument("--normalize", help="input normalisation: imagenet, dataset or none (default auto: imagenet with "
                                       "--weights, else the dataset's own mean and std)")
    g.add_argument("--loader-workers", type=int, dest="loader_workers",
                   help="DataLoader worker processes reading the data (default 2 for a streamed image folder)")
    g.add_argument("--batch-size", type=int, dest="batch_size", help="training batch size (128)")
    g = p.add_argument_group("goal")
    g.add_argument("--budget", help="model size budget, e.g. 2MB (2,000,000 B), 2MiB, 500kB (default 2MB)")
    g.add_argument("--target", help="hardware target name or a calibrated target .yaml (default arm)")
    g.add_argument("--max-latency-ms", type=str, help="latency limit on the target")
    g.add_argument("--max-energy-mj", type=str, help="energy limit per inference on the target")
    g = p.add_argument_group("search")
    g.add_argument("--trials", type=str, help="number of trained trials (default 10)")
    g.add_argument("--timeout", type=str, help="stop searching after this many seconds")
    g.add_argument("--run", help="run folder (default runs/<model>-<target>-<time>)")
    g.add_argument("--seed", type=int)
    g.add_argument("--storage", help="Optuna storage URL (default sqlite:///RUN/study.db)")
    g.add_argument("--sampler", help="tpe (default, multi-objective), nsga2, random, grid (uniform policies)")
    g.add_argument("--rungs", help="fine-tune steps where trials report validation accuracy and the worst "
                                   "stop early, e.g. 20,40 (default: no early stopping)")
    g.add_argument("--tolerance", type=float, dest="tolerance_pp",
                   help="choose the fastest feasible trial within this many validation accuracy points of the "
                        "base model (of the most accurate trial, if lower) (0.5)")
    g.add_argument("--finalists", type=int,
                   help="give the chosen trial and up to N-1 faster ones of the front the final fine-tune, then "
                        "choose by their validation scores (3; 1 = the trials' short scores decide)")
    g.add_argument("--finalist-epochs", type=float, dest="finalist_epochs",
                   help="epochs of each finalist's fine-tune (default: the final fine-tune's; its model is kept)")
    g.add_argument("--finalist-margin", type=float, dest="finalist_margin_pp",
                   help="faster trials of the front become finalists if their short score is within this many "
                        "points of the best (5)")
    g.add_argument("--no-sensitivity", action="store_true",
                   help="skip the per-layer sensitivity probes that narrow the space and seed the search")
    g.add_argument("--sensitivity-threshold", type=float, dest="sensitivity_threshold_pp",
                   help="drop a layer's choice that alone loses more than this many accuracy points (10)")
    g.add_argument("--sensitivity-bn-images", type=int, dest="sensitivity_bn_images",
                   help="training images on which each probe re-estimates BatchNorm statistics before it is "
                        "measured (512; 0 = the base model's statistics)")
    g.add_argument("--latency-seeds", dest="latency_seeds",
                   help="also seed policies cut to these fractions of the guided seed's latency, least accuracy "
                        "loss per ms first (0.75,0.6,0.45; none = off)")
    g.add_argument("--backend", help="optuna (default: trials in this process) or ray (a Ray cluster)")
    g.add_argument("--workers", type=int, help="parallel trial workers for --backend ray (1)")
    g.add_argument("--address", help="Ray cluster to join: auto or HOST:PORT (default: start a local one)")
    g.add_argument("--config", help="YAML file with the same keys as these options")
    g = p.add_argument_group("work per stage")
    g.add_argument("--base-epochs", type=float, help="epochs to train the base model if no --checkpoint (1.5)")
    g.add_argument("--trial-steps", type=int, help="fine-tune steps per trial (60)")
    g.add_argument("--final-epochs", type=float, help="epochs of the final QAT + distillation fine-tune (1)")
    g.add_argument("--criterion", help="structured pruning criterion (l1)")
    g.add_argument("--prune-choices", dest="prune_choices",
                   help="pruning ratios a channel group may take, e.g. 0,0.125,0.25,0.375,0.5 (0,0.25,0.5,0.75)")
    g.add_argument("--quantizer", help="weight quantizer (uniform)")
    g.add_argument("--no-distill", action="store_true", help="fine-tune without distillation")
    g.add_argument("--threads", type=int, help="torch threads")


def _config_from_args(args: argparse.Namespace):
    base: dict[str, Any] = {}
    if args.config:
        try:
            base = SearchConfig.load(args.config).to_dict()
        except (ValueError, FileNotFoundError) as e:
            raise UserError(str(e)) from None
    cli = {k: getattr(args, k) for k in ("model", "checkpoint", "weights", "dataset", "data_root", "image_size",
                                         "normalize", "loader_workers", "batch_size", "budget", "target",
                                         "max_latency_ms", "max_energy_mj", "timeout", "run", "seed",
                                         "storage", "sampler", "base_epochs", "trial_steps", "final_epochs",
                                         "criterion", "quantizer", "prune_choices", "threads", "rungs", "sensitivity_threshold_pp",
                                         "sensitivity_bn_images",
                                         "tolerance_pp", "finalists", "finalist_epochs", "finalist_margin_pp",
                                         "latency_seeds", "backend", "workers", "address")
           if getattr(args, k, None) is not None}
    if getattr(args, "trials", None) is not None:
        try:
            cli["trials"] = int(args.trials)
        except ValueError:
            raise UserError(f"malformed --trials {args.trials!r}; expected a whole number >= 1") from None
    if getattr(args, "no_distill", False):
        cli["distill"] = False
    if getattr(args, "no_sensitivity", False):
        cli["sensitivity"] = False
    merged = {**base, **cli}
    try:
        return SearchConfig.from_dict(merged)
    except ValueError as e:
        raise UserError(str(e)) from None


def cmd_search(args: argparse.Namespace) -> int:
    cfg = _config_from_args(args)
    result = api.search(progress=not args.quiet, **cfg.to_dict())
    _print_summary(result.summary, args)
    return 0


def _print_summary(summary: dict, args: argparse.Namespace) -> None:
    if getattr(args, "json", False):
        print(json.dumps(summary, indent=2, default=str))
        return
    best = summary["best"]
    print(f"\nrun: {summary['run']}")
    print(f"{count_line(summary['trial_counts'])}; search {summary['search_seconds']:.0f} s, "
          f"total {summary['wall_seconds']:.0f} s")
    if not best.get("feasible"):
        print("warning: no trained candidate met every constraint; the closest one is reported", file=sys.stderr)
    print(summary_table(summary["base"], best))
    print(f"  (chosen = trial {best['trial']} after the final fine-tune; `squeezer report` shows its search-time "
          f"score)")
    print(f"\nchosen policy: {summary['run']}/best/policy.json   model: {summary['run']}/best/model.pt")
    print(f"next: squeezer report {summary['run']}   |   squeezer export {summary['run']} --format onnx")


def _whole_number(text: str | None, flag: str) -> int | None:
    if text is None:
        return None
    try:
        n = int(text)
    except ValueError:
        raise UserError(f"malformed {flag} {text!r}; expected a whole number >= 1") from None
    if n < 1:
        raise UserError(f"`trials >= 1` must hold, but got trials={n}")
    return n


def cmd_resume(args: argparse.Namespace) -> int:
    result = api.resume(args.run_dir, trials=_whole_number(args.trials, "--trials"), progress=not args.quiet,
                        storage=args.storage)
    _print_summary(result.summary, args)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    rep = api.report(args.run_dir, files=not getattr(args, "no_files", False))
    print(json.dumps(rep, indent=2, default=str) if args.json else format_report(rep))
    if rep.get("files") and not args.json:
        print(f"\nwrote {rep['files']['pareto_png']} and {rep['files']['report_html']}")
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    shape = _parse_shape(args.input_shape)
    cost = tools.cost(args.model, input_shape=shape, target=args.target, policy=args.policy,
                      num_classes=args.num_classes)
    if args.json:
        print(json.dumps(cost.to_dict(), indent=2, default=str))  # squeezer.cost/2
        return 0
    print(f"{args.model} on {args.target}, input {tuple(shape)}" + (f", policy {args.policy}" if args.policy else ""))
    print(f"  size          {format_bytes(cost.size_bytes)} ({int(cost.size_bytes):,} bytes)")
    print(f"  MACs          {cost.macs / 1e6:.2f} M")
    print(f"  latency       {cost.latency_ms:.3f} ms")
    print(f"  energy        {cost.energy_mj:.4f} mJ")
    print(f"  peak memory   {format_bytes(cost.peak_memory_bytes)}")
    return 0


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        raise UserError(f"malformed --input-shape {text!r}; expected C,H,W such as 1,28,28") from None
    if len(parts) != 3 or min(parts) < 1:
        raise UserError(f"`--input-shape is C,H,W with positive sizes` must hold, but got {text!r}")
    return parts  # type: ignore[return-value]


def cmd_targets(args: argparse.Namespace) -> int:
    rows = tools.targets()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for r in rows:
        extra = r.get("description") or r.get("summary") or ""
        alias = f" (aliases: {', '.join(r['aliases'])})" if r.get("aliases") else ""
        print(f"{r['name']:<12} {extra}{alias}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    summary = tools.calibrate(args.target, args.measurements, args.out, kit=args.kit, runtime=args.runtime)
    print(json.dumps(summary, indent=2, default=str) if args.json else
          "\n".join(f"{k}: {v}" for k, v in summary.items()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="squeezer", description="Make CNNs fit real hardware: joint search of pruning, "
                                             "quantization, low-rank and distillation policies.")

    try:
        v = version("squeezer")
    except PackageNotFoundError:
        v = "dev"
    p.add_argument("--version", action="version", version=f"squeezer {v}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    s = sub.add_parser("search", help="search a compression policy under a budget (the main job)")
    _add_search_options(s)
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.set_defaults(func=cmd_search)

    s = sub.add_parser("resume", help="continue an interrupted (or extend a finished) search")
    s.add_argument("run_dir")
    s.add_argument("--trials", help="new total of trained trials")
    s.add_argument("--storage", help="Optuna storage URL, if not the run's")
    s.add_argument("--quiet", action="store_true")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_resume)

    s = sub.add_parser("report", help="base model, Pareto front, chosen policy, all trials")
    s.add_argument("run_dir")
    s.add_argument("--json", action="store_true", help="machine-readable report")
    s.add_argument("--no-files", action="store_true", help="do not write RUN/pareto.png and RUN/report.html")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("cost", help="what a model costs on a target")
    s.add_argument("--model", required=True)
    s.add_argument("--target", default="arm")
    s.add_argument("--input-shape", default="1,28,28", help="C,H,W (default 1,28,28)")
    s.add_argument("--num-classes", type=int, default=10)
    s.add_argument("--policy", help="a squeezer.policy/1 file to apply")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_cost)

    s = sub.add_parser("targets", help="list hardware targets")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_targets)

    s = sub.add_parser("calibrate", help="fit a target's cost model to measurements (yours, or taken here)")
    s.add_argument("--target", help="target to start from ('host', 'host-ort' measure this machine)")
    s.add_argument("--measurements", help="CSV of measured rows (model, latency_ms[, energy_mj]), e.g. a kit's")
    s.add_argument("--out", help="calibrated target file to write (.yaml)")
    s.add_argument("--kit", help="write a calibration kit here (graphs + run_kit.py) for another device")
    s.add_argument("--runtime", default="onnxruntime", choices=["onnxruntime"],
                   help="the runtime a --kit is written for (default onnxruntime)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_calibrate)


    for info in pkgutil.iter_modules(commands.__path__):
        mod = importlib.import_module(f"{commands.__name__}.{info.name}")
        if hasattr(mod, "register"):
            mod.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    signal.signal(signal.SIGTERM, raise_terminated)  # SIGTERM unwinds the run as Ctrl-C does
    for noisy in ("optuna", "torch_pruning", "ray"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"squeezer: error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        print(f"squeezer: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        print("squeezer: interrupted; finished trials are kept (squeezer resume RUN continues)", file=sys.stderr)
        return 128 + int(getattr(e, "signum", signal.SIGINT))
    except Exception as e:  # noqa: BLE001 - last resort: one line unless debugging
        if os.environ.get("SQUEEZER_DEBUG"):
            raise
        print(f"squeezer: internal error: {type(e).__name__}: {e} (SQUEEZER_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
