"""``squeezer methods [--json]``: every compression method a policy can name, by kind."""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any

#: kind -> (module, registry attribute, policy field that selects it)
KINDS: dict[str, tuple[str, str, str]] = {
    "pruning_criteria": ("...compressors.pruning", "PRUNING_CRITERIA", 'pruning.criterion'),
    "sparsity_methods": ("...compressors.sparsity", "SPARSITY_METHODS", 'sparsity.method'),
    "quantizers": ("...compressors.quantize", "QUANTIZERS", 'layers.*.quantizer'),
    "sharing": ("...compressors.sharing", "SHARING", 'layers.*.sharing'),
    "decompositions": ("...compressors.lowrank", "DECOMPOSITIONS", 'layers.*.decomposition'),
    "regularizers": ("...compressors.regularizers", "REGULARIZERS", 'regularizer'),
    "distillation": ("...compressors.distill", "DISTILLATION", 'distill.method'),
}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("methods", help="list the compression methods a policy can name, by kind",
                              description="List every registered method (pruning criteria, sparsity methods, "
                                          "quantizers, sharing, decompositions, regularizers, distillation) "
                                          "with the policy field that selects it.")
    p.add_argument("--json", action="store_true", help="print {kind: {name: summary}} as JSON")
    p.set_defaults(func=handler)


def collect() -> dict[str, dict[str, Any]]:
    """``{kind: {"field": policy field, "methods": {name: summary}}}``; a kind whose module
    cannot be imported is listed with an ``error`` (so one broken module never hides the rest)."""
    out: dict[str, dict[str, Any]] = {}
    for kind, (mod, attr, fld) in KINDS.items():
        try:
            reg = getattr(importlib.import_module(mod, __package__), attr)  # lazy: sharing etc. load only here
            out[kind] = {"field": fld, "methods": {n: reg.summary(n) for n in reg.names()}}
        except Exception as e:  # noqa: BLE001 - report, keep listing the others
            out[kind] = {"field": fld, "methods": {}, "error": f"{type(e).__name__}: {e}"}
    return out


def handler(args: argparse.Namespace) -> int:
    data = collect()
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
