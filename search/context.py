"""What every stage of a run shares, and :func:`prepare`, which builds it once per process.

``prepare`` checks everything cheap before anything expensive: the target, the data, that the
model runs on the data's inputs, and that the budget is reachable at all (the smallest policy
of the space is priced) -- then trains or loads the base model, traces it, and builds the space.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import hw_models
from ..compressors.distill import logit_maps
from ..compressors.policy import Policy
from ..evaluators.splits import DataSplits
from .budget import format_bytes
from .config import SearchConfig
from .errors import UserError
from .limits import cost_dict, resolve_target, target_bits
from .runfolder import BASE_METRICS, BASE_MODEL, file_lock, write_json
from .schema import read_run_json, stamped
from .space import SearchSpace
from .workload import Workload, build_base

log = logging.getLogger("squeezer")


@dataclass
class Context:
    """What every stage of a run shares (built once per process by :func:`prepare`)."""

    cfg: SearchConfig
    run_dir: Path
    workload: Workload
    base: nn.Module
    base_metrics: dict[str, Any]
    target: Any
    table: Any
    space: SearchSpace
    trial_train: Any
    smallest_size_bytes: int
    #: Set by the sensitivity stage (``narrowing.sensitivity_first``): the probes, the narrowed
    #: choices per dimension, and the dropped choices given back to keep the limits reachable.
    sensitivity: dict[str, Any] | None = None
    narrowed: dict[str, list] = field(default_factory=dict)
    readmitted: list = field(default_factory=list)
    _rung_val: Any = None

    @property
    def data(self) -> DataSplits:
        return self.workload.data

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.data.input_shape

    @property
    def rung_val(self) -> Any:
        """The validation subset trials are scored on at a rung (built on first use)."""
        if self._rung_val is None:
            n = min(self.cfg.rung_val_size, len(self.data.val))
            self._rung_val = self.data.val.subset(n, seed=self.cfg.seed)
        return self._rung_val

    def estimate(self, policy: Policy | None) -> Any:
        """Totals only (no per-op rows): the search prices thousands of policies."""
        return hw_models.estimate_table(self.table, policy, self.target, layers=False)

    def score(self, model: nn.Module, split: Any) -> float:
        return self.workload.score(model, split)


def check_runs(arch: nn.Module, cfg: SearchConfig, data: DataSplits) -> Any:
    """The model's output on one input of the data's shape (else a one-line error)."""
    try:
        with torch.no_grad():
            return arch.eval()(torch.zeros(1, *data.input_shape))
    except RuntimeError as e:
        raise UserError(f"model {cfg.model} cannot run on {cfg.dataset}'s {'x'.join(map(str, data.input_shape))} "
                        f"inputs: {str(e).splitlines()[0]}") from None


def check_budget_reachable(cfg: SearchConfig, table: Any, space: SearchSpace, target: Any) -> int:
    """The smallest size the space can reach on ``target``; a one-line error if above the budget."""
    smallest = hw_models.estimate_table(table, space.smallest_policy(), target)
    if smallest.size_bytes > cfg.budget_bytes:
        raise UserError(f"budget {cfg.budget} ({cfg.budget_bytes:,} bytes) is below the smallest size "
                        f"{cfg.model} can reach on {cfg.target}: {int(smallest.size_bytes):,} bytes "
                        f"({format_bytes(smallest.size_bytes)}); raise --budget or pick a smaller --model")
    return int(smallest.size_bytes)


def build_space(cfg: SearchConfig, arch: nn.Module, input_shape: tuple[int, ...], target: Any) -> SearchSpace:
    wbits, abits = target_bits(target)
    return SearchSpace.build(arch, input_shape, weight_bits=wbits, act_bits=abits, distill=cfg.distill,
                             criterion=cfg.criterion, quantizer=cfg.quantizer, prune_choices=cfg.prune_ratio_choices)


def log_unpruned(space: SearchSpace) -> None:
    """Say which layers no policy prunes, and why (every conv/linear is still quantized)."""
    whole = space.groups_info.unpruned()
    for why in sorted(set(whole.values())):
        names = [n for n, w in whole.items() if w == why]
        log.info("pruning leaves %d of %d conv/linear layers whole (%s): %s", len(names), len(space.layers), why,
                 ", ".join(names[:6]) + (f", ... ({len(names) - 6} more)" if len(names) > 6 else ""))


def base_metrics_of(cost: Any, cfg: SearchConfig, workload: Workload, base: nn.Module, meta: dict[str, Any],
                    path: Path) -> dict[str, Any]:
    """The base model's metrics (``base/metrics.json``, computed once per run)."""
    if path.is_file():
        return read_run_json(path, "metrics")
    data = workload.data
    metrics = stamped("metrics", {
        "metric": workload.metric_name, "val_metric": workload.score(base, data.val),
        "test_metric": workload.score(base, data.test) if data.test is not None else None, **cost_dict(cost),
        "model": cfg.model, "dataset": cfg.dataset, "target": cfg.target,
        **{k: v for k, v in meta.items() if k != "normalization"}})
    write_json(path, metrics)
    return metrics


def prepare(cfg: SearchConfig, run_dir: Path, workload: Workload, *, progress: bool = True) -> Context:
    """Target, data checks, base model, traced table and search space (everything before trials)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    target = resolve_target(cfg.target)
    # The architecture alone fixes the table, the space and the smallest reachable size:
    # check the budget before spending minutes on the base model.
    arch = workload.architecture()
    if logit_maps(check_runs(arch, cfg, workload.data)) is None and cfg.distill:
        log.warning("distillation off: %s's outputs hold no class scores to use as soft targets (a detector's "
                    "boxes); fine-tunes use the loss alone", cfg.model)
        cfg = cfg.with_(distill=False)
    table = hw_models.trace(arch, workload.data.input_shape)
    space = build_space(cfg, arch, workload.data.input_shape, target)
    smallest = check_budget_reachable(cfg, table, space, target)
    with file_lock(run_dir / ".base.lock"):  # concurrent processes of one run train it once
        base, meta = build_base(cfg, workload, run_dir / BASE_MODEL, run_dir.parent / ".cache", progress=progress)
    log_unpruned(space)  # after the base checkpoint's checks: bad input stays one line
    base_cost = hw_models.estimate_table(table, None, target)
    metrics = base_metrics_of(base_cost, cfg, workload, base, meta, run_dir / BASE_METRICS)
    trial_train = workload.data.train.subset(cfg.trial_train_size, seed=cfg.seed)
    return Context(cfg, run_dir, workload, base, metrics, target, table, space, trial_train, smallest)
