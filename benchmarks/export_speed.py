"""Exported chosen model of a search vs exported fp32 base on this machine (ONNX Runtime, one thread).

For each model: run a short ``squeezer search`` (the CLI, fresh run folder), export the chosen
model with ``squeezer export RUN --format onnx`` (verified by ONNX Runtime on the whole test set
against the accuracy the search reported), export the run's fp32 base model the same way, and
also write the chosen model in the plain QDQ form (every integer weight a runtime
``DequantizeLinear``, what the exporter wrote before) to show what the per-layer form buys.
All artifacts are timed in the same process, interleaved in rounds (each round times every
artifact; the result is the median over rounds of per-round medians), at batch 1 and batch 32.
Writes ``benchmarks/RESULTS_export.md``.

    python benchmarks/export_speed.py [--models resnet20 mobilenet_v2] [--target arm] [--trials 4]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from squeezer.evaluators.checkpoint import load_checkpoint  # noqa: E402
from squeezer.evaluators.datasets import load_dataset  # noqa: E402
from squeezer.evaluators.export import deploy_model, export_onnx, runtime_op_types  # noqa: E402
from squeezer.evaluators.formats import export_model  # noqa: E402
from squeezer.hw_models.kit_runner import onnx_session, time_interleaved  # noqa: E402
from squeezer.search.schema import read_run_json  # noqa: E402

BUDGETS = {"resnet20": "300kB", "mobilenet_v2": "2MB"}

NOTES = """
What ONNX Runtime does with a QDQ graph on this host (checked with each session's optimized graph,
`SessionOptions.optimized_model_filepath`; `evaluators.export.runtime_op_types` does the same):

- It fuses `DQ(input) + DQ(weight) -> Conv -> Q(output)` into `QLinearConv` (NHWC int8 kernels, with
  `Transpose` at the edges of each int8 region). A conv whose output goes to a float op (the
  residual `Add`, the pooling head) has no output Q and stays a float conv with Q -> DQ on its input:
  in ResNet-20 only the first conv of each block fuses (9 of 22), in MobileNetV2 36 of 53.
- It never constant-folds a `DequantizeLinear` (to keep QDQ groups), so an int8 weight outside a
  fused group was dequantized at every inference, and a non-constant weight also turns off the fp32
  conv's blocked NCHWc kernels: pruned MobileNetV2 with int8 weights ran at 0.34x of fp32.
  `Cast(int8 -> float) -> Mul(scale)` is constant-folded at load (also from INT4), so the exporter
  now writes that form for exactly the weights ORT would not fuse (asked of ORT itself);
  `session.disable_quant_qdq=1` would also fold them, but it turns off every int8 kernel and users'
  runtimes would need the option.
- Float weights with QDQ activations around them are quantized by ORT itself
  (`WeightBiasQuantization`, per-tensor int8): ORT then computes with weights the PyTorch model
  never had (the 0.5 pp verification would catch a loss); the search no longer samples activation
  bits for float-weight layers.
- Tried and dropped: `ConvInteger` + rescale for the unfused int8 convs (same numbers up to float
  rounding) ran 20x slower than the float conv with Q -> DQ on this ORT.
"""


def squeezer(*argv: str) -> dict:
    """Run the CLI as a user would; return its JSON output."""
    r = subprocess.run([sys.executable, "-m", "squeezer", *argv, "--json"], cwd=ROOT, capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise SystemExit(f"squeezer {' '.join(argv)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout)


def timed_rounds(runs: dict[str, object], x: np.ndarray, *, rounds: int, repeats: int) -> dict[str, float]:
    """Median over rounds of each artifact's per-round median (ms); artifacts interleaved per round
    (:func:`hw_models.kit_runner.time_interleaved`, the calibration kit's timing)."""
    return time_interleaved(runs, {k: x for k in runs}, rounds=rounds, repeats=repeats, warmup=max(3, repeats // 5))


def describe(policy: dict | None) -> str:
    """One line: how many layers run int8 kernels (w+a), weight-only integers, float; pruned layers."""
    if not policy:
        return "fp32"
    kinds: Counter = Counter()
    pruned = 0
    for name, lp in policy.get("layers", {}).items():
        w, a = lp.get("weight_bits"), lp.get("act_bits")
        kinds["int w+a" if w is not None and a is not None else "int w" if w is not None
              else "float w + int a" if a is not None else "float"] += 1
        pruned += float(lp.get("prune_ratio", 0.0)) > 0
    return ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())) + f"; {pruned} pruned"


def measure(arts: dict[str, Path], shape, args) -> dict[str, dict[str, float]]:
    """Each artifact timed interleaved (batch 1 and 32), speed-ups against the first one, and what
    ONNX Runtime runs per inference (int8 kernels, runtime DQ / Q)."""
    sessions = {k: onnx_session(p) for k, p in arts.items()}
    rng = np.random.default_rng(0)
    lat1 = timed_rounds(sessions, rng.random((1, *shape), dtype=np.float32), rounds=args.rounds, repeats=args.repeats)
    lat32 = timed_rounds(sessions, rng.random((32, *shape), dtype=np.float32), rounds=args.rounds,
                         repeats=max(3, args.repeats // 8))
    ref = next(iter(arts))
    out = {}
    for k, p in arts.items():
        ops = Counter(op for op, _ in runtime_op_types(p))
        out[k] = {"bytes": p.stat().st_size, "b1": lat1[k], "b32": lat32[k], "s1": lat1[ref] / lat1[k],
                  "s32": lat32[ref] / lat32[k], "int8": ops.get("QLinearConv", 0) + ops.get("QGemm", 0),
                  "dq": ops.get("DequantizeLinear", 0), "q": ops.get("QuantizeLinear", 0)}
    return out


def compare(arts: dict[str, Path], shape, args) -> list[str]:
    """Markdown rows of :func:`measure`."""
    lines = ["| artifact | ONNX bytes | batch-1 ms | batch-32 ms | speed-up b1 | speed-up b32 | int8 kernels "
             "| runtime DQ |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k, m in measure(arts, shape, args).items():
        lines.append(f"| {k} | {m['bytes']:,} | {m['b1']:.3f} | {m['b32']:.2f} | {m['s1']:.2f}x | {m['s32']:.2f}x | "
                     f"{m['int8']} | {m['dq']} |")
    return lines


def plain_qdq(best, data, path: Path) -> Path:
    """The chosen model in the plain QDQ form (every integer weight a runtime DequantizeLinear)."""
    export_onnx(deploy_model(best.model, mean=data.mean, std=data.std), path, data.input_shape, fold_weights=False)
    return path


def base_onnx(run: Path, dest: Path, data=None, base=None) -> Path:
    """The run's exported fp32 base: ``RUN/export/base_fp32.onnx`` if there, else exported to ``dest``
    (only then are the base checkpoint, unless given as ``base``, and the dataset, unless given,
    loaded)."""
    path = run / "export" / "base_fp32.onnx"
    if path.is_file():
        return path
    return export_model(base if base is not None else load_checkpoint(run / "base" / "model.pt"), "onnx", dest,
                        data=data if data is not None else load_dataset("fashion-mnist")).path


def time_trial(run: Path, args) -> int:
    """A non-chosen trial of a finished run (e.g. a mixed policy) vs the run's exported fp32 base."""
    out = squeezer("export", str(run), "--trial", str(args.trial), "--finetune", str(args.finetune), "--format", "onnx",
                   "--out", str(run / "export" / f"trial{args.trial}.onnx"))["artifacts"][0]
    ckpt = load_checkpoint(run / "base" / "model.pt")  # its input shape; exported too if not yet
    base = base_onnx(run, run / "export" / "base_fp32.onnx", base=ckpt)
    pol = json.loads((run / "trials" / f"{args.trial:04d}.json").read_text()).get("policy")
    lines = [f"Trial {args.trial}: {describe(pol)}; ONNX accuracy {100 * out['runtime_test_accuracy']:.2f}% (PyTorch "
             f"{100 * out['torch_test_accuracy']:.2f}%), file {out['file_bytes']:,} B = {out['size_ratio']:.3f}x the size "
             "model.", ""]
    lines += compare({"fp32 base": base, f"trial {args.trial}": Path(out["path"])}, ckpt.input_shape, args)
    print("\n".join(lines))
    return 0


def time_existing(run: Path, args) -> int:
    """The chosen model of an existing run folder (read only): exported now, in the plain QDQ form,
    and the file exported before (``RUN/export/model.onnx``, if any), against its fp32 base."""
    out_dir = Path(args.runs or tempfile.mkdtemp(prefix="export_existing_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    new = squeezer("export", str(run), "--format", "onnx", "--out", str(out_dir / "model.onnx"))["artifacts"][0]
    data = load_dataset("fashion-mnist")
    base = base_onnx(run, out_dir / "base_fp32.onnx", data)
    best = load_checkpoint(run / "best" / "model.pt")
    arts = {"fp32 base": base, "chosen, exported now": Path(new["path"]),
            "chosen, plain QDQ": plain_qdq(best, data, out_dir / "model_plain_qdq.onnx")}
    if (run / "export" / "model.onnx").is_file():
        arts["chosen, file exported before"] = run / "export" / "model.onnx"
    lines = [f"Chosen: {describe(best.policy.to_dict() if best.policy else None)}; ONNX accuracy "
             f"{100 * new['runtime_test_accuracy']:.2f}% (reported {100 * new['reported_test_accuracy']:.2f}%), file "
             f"{new['file_bytes']:,} B = {new['size_ratio']:.3f}x the size model.", ""]
    lines += compare(arts, best.input_shape, args)
    lines += ["", predicted_speedup(run)]
    print("\n".join(lines))
    return 0


def predicted_speedup(run: Path) -> str:
    """What the run's cost model predicted: base over chosen latency on the run's target, and test metrics."""
    base, best = (read_run_json(run / d / "metrics.json", "metrics") for d in ("base", "best"))
    return (f"Predicted on {best['target']}: {base['latency_ms']:.3f} -> {best['latency_ms']:.3f} ms "
            f"({base['latency_ms'] / best['latency_ms']:.2f}x); test {best['metric']} {100 * base['test_metric']:.2f}% "
            f"-> {100 * best['test_metric']:.2f}%; size {base['size_bytes']:,} -> {best['size_bytes']:,} B")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["resnet20", "mobilenet_v2"])
    ap.add_argument("--target", default="arm")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--trial-steps", type=int, default=40)
    ap.add_argument("--base-epochs", type=float, default=0.5)
    ap.add_argument("--final-epochs", type=float, default=0.3)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=40, help="timed runs per artifact per round at batch 1")
    ap.add_argument("--runs", default=None, help="folder for the run folders (default: a temp folder)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS_export.md"))
    ap.add_argument("--trial-of", metavar="RUN", help="only export trial --trial of this run folder (fine-tuned "
                                                      "--finetune epochs) and time it against the run's fp32 base")
    ap.add_argument("--trial", type=int, default=1)
    ap.add_argument("--existing", metavar="RUN", help="only re-export the chosen model of this (finished) run folder "
                                                      "into --runs and time it against the run's fp32 base")
    ap.add_argument("--finetune", type=float, default=0.2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.trial_of:
        return time_trial(Path(args.trial_of), args)
    if args.existing:
        return time_existing(Path(args.existing), args)
    runs_root = Path(args.runs or tempfile.mkdtemp(prefix="export_speed_"))
    data = load_dataset("fashion-mnist")
    rows, details = [], []
    t_all = time.time()
    for name in args.models:
        run = runs_root / f"{name}-{args.target}"
        t0 = time.time()
        summary = squeezer("search", "--model", name, "--budget", BUDGETS.get(name, "2MB"), "--target", args.target,
                           "--trials", str(args.trials), "--trial-steps", str(args.trial_steps), "--base-epochs",
                           str(args.base_epochs), "--final-epochs", str(args.final_epochs), "--seed", "0",
                           "--threads", "1", "--quiet", "--run", str(run))
        t_search = time.time() - t0
        chosen = squeezer("export", str(run), "--format", "onnx", "--out", str(run / "export" / "model.onnx"))
        chosen = chosen["artifacts"][0]
        base_ld = load_checkpoint(run / "base" / "model.pt")
        base_metrics = json.loads((run / "base" / "metrics.json").read_text())
        base = export_model(base_ld, "onnx", run / "export" / "base_fp32.onnx", data=data, reported=base_metrics)
        best = load_checkpoint(run / "best" / "model.pt")
        arts = {"fp32 base": base.path, "chosen": Path(chosen["path"]),
                "chosen, plain QDQ": plain_qdq(best, data, run / "export" / "model_plain_qdq.onnx")}
        metrics = json.loads((run / "best" / "metrics.json").read_text())
        for k, m in measure(arts, data.input_shape, args).items():
            acc = base.runtime_test_accuracy if k == "fp32 base" else \
                chosen.get("runtime_test_accuracy") if k == "chosen" else None
            rows.append((name, k, m["bytes"], acc, m["b1"], m["b32"], m["s1"], m["s32"], m["int8"], m["dq"], m["q"]))
            print(rows[-1], flush=True)
        details.append(f"- {name}: search {t_search:.0f} s, chosen trial {(summary.get('best') or {}).get('trial', metrics.get('trial'))}"
                       f" ({describe(best.policy.to_dict() if best.policy else None)}); reported test accuracy "
                       f"{100 * metrics['test_metric']:.2f}%, ONNX {100 * chosen['runtime_test_accuracy']:.2f}% "
                       f"(base {100 * base.runtime_test_accuracy:.2f}%); file {chosen['file_bytes']:,} B = "
                       f"{chosen['size_ratio']:.3f}x the size model ({chosen.get('expected_bytes') or 0:,} B); "
                       f"notes: {'; '.join(chosen.get('notes', [])) or '-'}")
    import onnxruntime

    cmd = (f"python benchmarks/export_speed.py --models {' '.join(args.models)} --target {args.target} "
           f"--trials {args.trials} --trial-steps {args.trial_steps} --base-epochs {args.base_epochs} "
           f"--final-epochs {args.final_epochs} --rounds {args.rounds} --repeats {args.repeats}")
    lines = ["# Export speed: exported chosen model of a search vs exported fp32 base (host)", "",
             f"Command: `{cmd}` ({(time.time() - t_all) / 60:.1f} min in all)", "",
             f"Machine: {platform.processor() or platform.machine()}, ONNX Runtime {onnxruntime.__version__} "
             f"(CPUExecutionProvider, 1 intra-op thread), torch {torch.__version__}; {time.strftime('%Y-%m-%d')}.",
             "Each model: `squeezer search --model M --budget B --target T ...` (fresh run folder, the CLI), "
             "`squeezer export RUN --format onnx` (verified by ONNX Runtime on the whole Fashion-MNIST test set "
             "against the accuracy the search reported), the run's fp32 base exported and verified the same way, "
             "and the chosen model again in the plain QDQ form (`export_onnx(..., fold_weights=False)`: every "
             "integer weight a runtime DequantizeLinear, as the exporter wrote before). Latency: the artifacts "
             f"are timed interleaved in {args.rounds} rounds ({args.repeats} runs at batch 1, "
             f"{max(3, args.repeats // 8)} at batch 32 per round, after warm-up); the median over rounds of the "
             "per-round medians. The machine is shared with other jobs: only ratios within a run mean anything. "
             "Runtime ops: what ORT runs per inference (its optimized graph).", "",
             "| model | artifact | ONNX bytes | ONNX acc | batch-1 ms | batch-32 ms | speed-up b1 | speed-up b32 "
             "| int8 kernels | runtime DQ | runtime Q |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, k, size, acc, l1, l32, s1, s32, qk, dq, q in rows:
        a = "-" if acc is None else f"{100 * acc:.2f}%"
        lines.append(f"| {n} | {k} | {size:,} | {a} | {l1:.3f} | {l32:.2f} | {s1:.2f}x | {s32:.2f}x | {qk} | {dq} | {q} |")
    lines += ["", *details, NOTES]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
