"""The final stage: the chosen policy's full fine-tune (QAT + distillation), its test metric, ``best/``.

Runs once per run: concurrent processes wait on a lock and then read ``best/metrics.json``.
The chosen trial is marked in the study (:func:`search.study.mark_chosen`): a dashboard user
sees which trial it is and that its search-time score is not the fine-tuned one.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import optuna
from optuna.trial import FixedTrial

from ..compressors.packing import packed_size
from ..evaluators.checkpoint import save_checkpoint
from ..evaluators.finetune import compress_and_finetune
from .context import Context
from .finalists import choose_final
from .limits import constraints_of, cost_dict, target_sram
from .runfolder import BEST, file_lock, write_json
from .schema import read_run_json, stamped
from .study import mark_chosen
from .workload import seed_everything

log = logging.getLogger("squeezer")

#: Calibration batches the data-driven pruning criteria see in the final fine-tune.
CALIB_BATCHES = 8


def finish(ctx: Context, study: optuna.Study, *, progress: bool = True) -> dict[str, Any]:
    """Fine-tune the chosen trial's policy, measure it, save ``best/``; returns its metrics."""
    with file_lock(ctx.run_dir / ".finish.lock"):
        path = ctx.run_dir / BEST / "metrics.json"
        if path.is_file():
            return read_run_json(path, "metrics")
        return _finish(ctx, study, progress=progress)


def _finish(ctx: Context, study: optuna.Study, *, progress: bool) -> dict[str, Any]:
    cfg, best_dir = ctx.cfg, ctx.run_dir / BEST
    runs = _Finalists(ctx, progress=progress)
    trial, status, finalists = choose_final(study, cfg, ctx.run_dir, runs,
                                            base_metric=ctx.base_metrics.get("val_metric"))
    policy = ctx.space.sample(FixedTrial(trial.params))
    cost = ctx.estimate(policy)
    if status != "feasible":
        cons = constraints_of(cost, cfg, target_sram(ctx.target))
        log.warning("no trained candidate met every constraint; using trial %d, %.1f%% over its tightest limit",
                    trial.number, 100 * max(cons))
    model, policy, ft_seconds, val_acc = runs.kept.get(trial.number) or _final_fine_tune(ctx, trial, policy,
                                                                                           progress=progress)
    test_acc = ctx.score(model, ctx.data.test) if ctx.data.test is not None else None
    metrics = stamped("metrics", {
        "metric": ctx.workload.metric_name, "val_metric": val_acc, "test_metric": test_acc,
        "trial_val_metric": trial.values[0] if trial.user_attrs.get("evaluated") else None,
        **cost_dict(cost), "trial": trial.number, "feasible": status == "feasible", "target": cfg.target,
        "budget_bytes": cfg.budget_bytes, "packed_bytes": packed_size(model, coding=policy.coding),
        "finetune_seconds": round(ft_seconds, 1),
        "finalists": [{"number": r["number"], "val_metric": r["val_metric"]} for r in finalists.get("trials", [])
                      if r["number"] in finalists["candidates"]] if finalists else None})
    policy.save(best_dir / "policy.json", meta={"model": cfg.model, "dataset": cfg.dataset, "target": cfg.target,
                                                "trial": trial.number, "metric": metrics["metric"],
                                                "test_metric": test_acc})
    save_checkpoint(best_dir / "model.pt", model, model_name=cfg.model, input_shape=ctx.input_shape,
                    num_classes=ctx.data.num_classes, policy=policy,
                    normalization={"mean": ctx.data.mean, "std": ctx.data.std}, meta=metrics)
    write_json(best_dir / "metrics.json", metrics)
    mark_chosen(study, trial, *chosen_notes(metrics, cfg))
    return metrics


def _fine_tune(ctx: Context, policy: Any, epochs: float, *, progress: bool, desc: str) -> tuple[Any, Any]:
    """The base model compressed by ``policy`` and fine-tuned (QAT + distillation) on the
    training split: the final model, and each finalist."""
    cfg = ctx.cfg
    seed_everything(cfg.seed)
    return compress_and_finetune(
        ctx.base, policy, ctx.data.train, input_shape=ctx.input_shape, distill=cfg.distill,
        calib_batches=CALIB_BATCHES, calib_seed=0, batch_size=cfg.batch_size, epochs=epochs,
        lr=cfg.final_lr, seed=cfg.seed, augment=ctx.input_shape[1] >= 16, progress=progress,
        desc=desc, loss_fn=ctx.workload.loss)


def _final_fine_tune(ctx: Context, trial: Any, policy: Any, *, progress: bool) -> tuple[Any, Any, float, float]:
    """The final model: ``(model, policy, fine-tune seconds, validation metric)``."""
    log.info("final fine-tune of trial %d (%g epochs, QAT + distillation)", trial.number, ctx.cfg.final_epochs)
    t0 = time.time()
    model, policy = _fine_tune(ctx, policy, ctx.cfg.final_epochs, progress=progress, desc="final fine-tune")
    return model, policy, time.time() - t0, ctx.score(model, ctx.data.val)


class _Finalists:
    """``measure`` for :func:`search.finalists.choose_final`: a finalist's validation metric after
    its fine-tune. Models fine-tuned for the final fine-tune's epochs are kept (``kept``: trial
    number -> what :func:`_final_fine_tune` returns): the chosen one is the final model, not
    trained or scored twice."""

    def __init__(self, ctx: Context, *, progress: bool) -> None:
        self.ctx, self.progress, self.kept = ctx, progress, {}

    def __call__(self, trial: Any) -> float:
        ctx, epochs, t0 = self.ctx, self.ctx.cfg.finalist_fine_tune_epochs, time.time()
        model, policy = _fine_tune(ctx, ctx.space.sample(FixedTrial(trial.params)), epochs, progress=self.progress,
                                   desc=f"finalist trial {trial.number}")
        seconds, val = time.time() - t0, ctx.score(model, ctx.data.val)
        if epochs == ctx.cfg.final_epochs:
            self.kept[trial.number] = (model, policy, seconds, val)
        return val


def chosen_notes(m: dict[str, Any], cfg: Any) -> tuple[str, str]:
    """The optuna-dashboard notes of the study and of the chosen trial (Markdown)."""
    def num(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}"

    name, fits = m["metric"], "meets every limit" if m["feasible"] else "no trial met every limit: the least infeasible one"
    within = f"within {cfg.tolerance_pp:g} points of the base model's validation {name} (or of the best, if lower)"
    rule = f"the fastest trial {within}"
    if m.get("finalists"):
        rule = (f"the fastest of the finalists (trials {', '.join(str(f['number']) for f in m['finalists'])}, "
                f"each fine-tuned for {cfg.finalist_fine_tune_epochs:g} epochs) {within}")
    chosen = (f"**squeezer chose trial {m['trial']}** ({fits}): {rule}.\n\n"
              f"- search-time (its objective values): validation {name} {num(m['trial_val_metric'])} after "
              f"{cfg.trial_steps} fine-tune steps; {m['latency_ms']:.4g} ms on {cfg.target}\n"
              f"- after the final fine-tune ({cfg.final_epochs:g} epochs): validation {name} "
              f"{num(m['val_metric'])}, test {name} {num(m['test_metric'])}\n"
              f"- size {m['size_bytes']:,} bytes (budget {m['budget_bytes']:,})\n")
    study = (f"{chosen}\nObjectives: `val_metric ({name})` (max) and `latency_ms ({cfg.target})` (min).\n\n"
             f"Constraints: relative violations `cost / limit - 1` of the limits in the study's user attribute "
             f"`constraint_names` (<= 0: met); a trial over a limit was rejected by the cost model, never trained "
             f"(COMPLETE with value 0). PRUNED trials were stopped at a rung (user attribute `pruned_at`) or "
             f"not needed (`surplus`). `squeezer report RUN` says the same per trial.")
    return study, chosen
