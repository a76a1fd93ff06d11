"""``squeezer sensitivity RUN [--json] [--force]``: per-layer accuracy loss, alone, per setting.

Measures (or shows the cached ``RUN/sensitivity.json``) what each channel group's pruning
ratio, each layer's weight/activation bits and each layer's rank cost in validation accuracy
without fine-tuning, and which choices a search of this run drops (and gives back where its
budget and limits need them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..api import sensitivity
from ..sensitivity import summarize


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("sensitivity", help="per-layer accuracy loss for pruning, bits and rank (cached)",
                              description="Probe every layer alone (no fine-tune) and write RUN/sensitivity.json; "
                                          "a search narrows its space with it.")
    p.add_argument("run_dir")
    p.add_argument("--force", action="store_true", help="measure again even if RUN/sensitivity.json exists")
    p.add_argument("--val-size", type=int, default=128, help="validation images per probe (128)")
    p.add_argument("--threshold", type=float, help="accuracy points a kept choice may lose (the run's, 10)")
    p.add_argument("--top", type=int, default=15, help="rows of the most damaging probes to print")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    sens = sensitivity(args.run_dir, force=args.force, val_size=args.val_size, threshold_pp=args.threshold,
                       progress=not args.json)
    run, thr, narrowed, readmitted = Path(args.run_dir), sens["threshold_pp"], sens["narrowed"], sens["readmitted"]
    if args.json:
        print(json.dumps({k: v for k, v in sens.items() if k not in ("model", "dataset", "dropped")}, indent=2,
                         default=str))
        return 0
    bn = sens.get("bn_images", 0)
    print(f"{sens['model']} on {sens['dataset']}: {sens['n_probes']} probes on {sens['val_size']} validation images "
          f"in {sens['seconds']:.1f} s (base accuracy {100 * sens['base_accuracy']:.2f}%"
          + (f"; BatchNorm statistics re-estimated on {bn} training images per probe)" if bn else ")"))
    div = sens.get("divergence", {})
    print("\nmost damaging settings (accuracy points lost, alone, no fine-tune"
          + ("; KL divergence from the unchanged model, what the seeds weigh" if div else "") + "):")
    for dim, choice, loss in summarize(sens, top=args.top):
        kl = div.get(dim, {}).get(choice)
        print(f"  {dim:<48} {choice:>6} {loss:>8.2f}" + (f" {kl:>9.4f}" if kl is not None else ""))
    print(f"\na search drops {sens['dropped']} choice(s) in {len(narrowed)} dimension(s) (threshold {thr:g} pp):")
    for d, v in narrowed.items():
        print(f"  {d:<48} keeps {v}")
    if readmitted:
        print(f"\n{len(readmitted)} dropped choice(s) given back so that the space can still meet the run's "
              "budget and limits:")
        for r in readmitted:
            print(f"  {r['dimension']:<48} {str(r['choice']):>6} {r['loss_pp']:>8.2f}")
    print(f"\n{run / 'sensitivity.json'}")
    return 0
