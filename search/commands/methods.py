"""``squeezer methods [--json]``: every compression method a policy can name, by kind."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..tools import methods


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("methods", help="list the compression methods a policy can name, by kind",
                              description="List every registered method (pruning criteria, sparsity methods, "
                                          "quantizers, sharing, decompositions, regularizers, distillation) "
                                          "with the policy field that selects it.")
    p.add_argument("--json", action="store_true", help="print {kind: {name: summary}} as JSON")
    p.set_defaults(func=handler)


def handler(args: argparse.Namespace) -> int:
    data = methods()
    if args.json:
        print(json.dumps({k: v["methods"] for k, v in data.items()}, indent=2))
        return 0
    for kind, info in data.items():
        print(f"{kind}  (policy: {info['field']})")
        if "error" in info:
            print(f"  unavailable: {info['error']}")
        width = max((len(n) for n in info["methods"]), default=0)
        for name, summary in info["methods"].items():
            print(f"  {name:<{width}}  {summary}")
        print()
    return 0
