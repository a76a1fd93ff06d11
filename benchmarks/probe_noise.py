"""How repeatable the sensitivity probes are: accuracy loss vs KL divergence, few vs many images.

Measures every probe of a run's base model (``search.sensitivity.measure``, the run's settings:
adaptive BN on the run's BN images) twice: on the search's 128 validation images and on
``--many`` (1,024) images, and prints the Spearman rank correlation between the two for the
accuracy loss and for the KL divergence (over the probes that are not neutral). The seeds'
greedies rank choices by these numbers; a ranking that changes with the images is noise.

    python benchmarks/probe_noise.py runs/<name> [--many 1024] [--json out.json]

The run folder needs its ``config.yaml`` and cached base model (any finished or started search).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def compare(a: dict, b: dict) -> dict:
    """Spearman between two probe files' accuracy losses and divergences (non-neutral probes)."""
    from scipy.stats import spearmanr

    keys = [(d, c) for d, row in a["divergence"].items() for c, v in row.items() if v or a["probes"][d][c]]
    out = {"probes": len(keys)}
    for k in ("probes", "divergence"):
        out[f"spearman_{k}"] = round(float(spearmanr([a[k][d][c] for d, c in keys],
                                                    [b[k][d][c] for d, c in keys])[0]), 4)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--few", type=int, default=128, help="validation images of the search's probes (128)")
    p.add_argument("--many", type=int, default=1024, help="validation images of the reference probes")
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    from squeezer.search.config import SearchConfig
    from squeezer.search.context import prepare
    from squeezer.search.sensitivity import measure
    from squeezer.search.workload import named_workload

    torch.set_num_threads(1)
    run = Path(args.run)
    cfg = SearchConfig.load(run / "config.yaml")
    ctx = prepare(cfg, run, named_workload(cfg), progress=False)
    calib = ctx.trial_train.first_batches(2, cfg.batch_size, seed=0)
    res = {n: measure(ctx.base, ctx.space, ctx.data.val, ctx.input_shape, val_size=n, seed=cfg.seed, calib=calib,
                      bn_data=ctx.trial_train, bn_images=cfg.sensitivity_bn_images)
           for n in (args.few, args.many)}
    out = {"run": str(run), "model": cfg.model, "dataset": cfg.dataset, "few": args.few, "many": args.many,
           "seconds": {str(n): r["seconds"] for n, r in res.items()}, **compare(res[args.few], res[args.many])}
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps({**out, "results": {str(n): r for n, r in res.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
