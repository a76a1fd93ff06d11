"""``squeezer export RUN [--trial N] [--format F] [--out PATH]``: deployable artifacts, verified.

Without ``--format`` it writes the chosen policy (``policy.json``) and the compressed model
(``model.pt``, a ``squeezer.model/1`` checkpoint loadable with ``torch.load(..., weights_only=True)``)
into ``--out`` (a folder, default ``RUN/export/``). Every artifact is run by its own runtime on
the test set and its accuracy and size are printed next to what the search reported; an ONNX or
ExecuTorch artifact is also timed here (batch 1, one thread) next to what the cost model of its
runtime here (``host-ort``, ``host-xnnpack``) predicts.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ...evaluators.export import VerificationError
from ..artifacts import export


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


def format_table(results: list[Any], reported: dict[str, Any], label: str) -> str:
    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * float(v):.2f}%"

    def num(v: Any) -> str:
        return "-" if v is None else f"{int(v):,}"

    rows = [("artifact", "format", "file bytes", "size model B", "search size B", "runtime test acc",
             "PyTorch test acc", "search test acc", "max |dlogit|")]
    for r in results:
        rows.append((str(r.path), r.format, num(r.file_bytes), num(r.expected_bytes), num(reported.get("size_bytes")),
                     pct(r.runtime_test_accuracy), pct(r.torch_test_accuracy), pct(r.reported_test_accuracy),
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
    try:
        done = export(args.run, args.fmt, args.out, trial=args.trial, finetune=args.finetune, data_root=args.data_root,
                      test_size=args.test_size)
    except VerificationError as e:
        print(f"squeezer: error: verification failed: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(done.to_dict(), indent=2))
    else:
        print(format_table(done.artifacts, done.reported, done.label))
        for m in done.measured:
            pred = m["predicted_latency_ms"]
            print(f"latency here ({m['format']}, batch 1, one thread): measured {m['measured_latency_ms']:.3f} ms; "
                  + (f"{m['target']} predicts {pred:.3f} ms (measured / predicted = "
                     f"{m['measured_latency_ms'] / pred:.2f})" if pred else f"{m['target']}: no prediction"))
    return 0
