"""The search from Python: :func:`search` and :func:`resume`, with names or with your own objects.

A model is a zoo / torchvision / ``package.module:factory`` name, or a trained ``nn.Module``;
data is a dataset name, or ``(train, val)`` / ``(train, val, test)`` torch Datasets or
DataLoaders; ``metric(model, loader) -> float`` (higher is better) replaces top-1 accuracy and
``loss(model, batch, teacher) -> tensor`` replaces cross-entropy with distillation in every
fine-tune. Every other option is a :class:`~search.config.SearchConfig` field, with the CLI's
names and defaults (``budget="2MB"``, ``target="arm"``, ``trials=10``, ``max_latency_ms=``, ...).

Example (a search of two trials on scikit-learn's digits, ~1 minute on 2 cores)::

    import squeezer
    result = squeezer.search("lenet5", "digits", budget="20kB", trials=2, trial_steps=20,
                             base_epochs=1, final_epochs=0.2, run="runs/doc-example")
    result.best.metrics["size_bytes"] <= 20_000
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FixedTrial
from torch import nn

from ..compressors.policy import Policy
from ..evaluators.checkpoint import Loaded, load_checkpoint
from ..evaluators.export import ExportResult
from ..evaluators.formats import export_model
from ..evaluators.splits import DataSplits
from ..evaluators.train import Loss, Metric
from .backends.ray import check_picklable
from .config import ALIASES, SearchConfig
from .context import Context, prepare
from .errors import UserError
from .limits import resolve_target
from .narrowing import narrow, run_narrowing
from .pipeline import reopen, start
from .plots import write_report_files
from .report import report as build_report
from .runfolder import BEST, load_config, storage_url
from .selection import pareto_front
from .sensitivity import load_or_measure, space_choices
from .study import STUDY_NAME
from .workload import Workload, check_names, load_data, named_workload, object_name, splits_of


@dataclass
class Candidate:
    """A trial's policy and metrics; ``model`` is the compressed model where one was kept (the
    chosen trial's, fine-tuned)."""

    trial: int
    policy: Policy
    metrics: dict[str, Any]
    model: nn.Module | None = None


@dataclass
class SearchResult:
    """What a search found: ``best`` (the chosen policy, its fine-tuned model and metrics), ``base``
    (the base model's metrics), ``front`` (the Pareto front of the trials: metric vs latency),
    ``summary`` (what the CLI prints) and the run folder."""

    run_dir: Path
    best: Candidate
    base: dict[str, Any]
    front: list[Candidate]
    summary: dict[str, Any]
    input_shape: tuple[int, ...]
    data: DataSplits = field(repr=False)
    model_name: str = ""

    def export(self, fmt: str, path: str | Path, *, verify: bool = True) -> ExportResult:
        """Write the chosen model as ``fmt`` (``onnx``, ``pte``, ``torchscript``, ``state_dict``,
        ``policy``) and, with ``verify``, run it in its own runtime on the test split (the
        validation split when there is none), as ``squeezer export`` does."""
        loaded = Loaded(self.best.model, self.model_name, self.input_shape, self.data.num_classes, self.best.policy,
                        {"mean": list(self.data.mean), "std": list(self.data.std)}, dict(self.best.metrics))
        check = self.data if self.data.test is not None else _val_as_test(self.data)
        return export_model(loaded, fmt, path, data=check if verify else None, target=self.best.metrics.get("target"),
                            reported=self.best.metrics if self.data.test is not None else {})


def _val_as_test(data: DataSplits) -> DataSplits:
    return DataSplits(data.name, data.train, data.val, data.val, data.num_classes, data.mean, data.std, data.classes)


def _options(options: dict[str, Any]) -> dict[str, Any]:
    """Option names as :class:`SearchConfig` fields (the CLI's spellings accepted too)."""
    known = {f.name for f in fields(SearchConfig)}
    out = {}
    for k, v in options.items():
        name = ALIASES.get(k, k)
        if name not in known:
            raise UserError(f"unknown option {k!r}; known: {', '.join(sorted(known | set(ALIASES)))}")
        out[name] = v
    return out


def workload_of(model: Any, data: Any, cfg: SearchConfig, metric: Metric | None, loss: Loss | None,
                ) -> tuple[Workload, SearchConfig]:
    """The workload of an API call, and the config that names it (``object:<Class>`` for objects)."""
    if model is not None and not isinstance(model, (str, nn.Module)):
        raise UserError(f"model must be a name or a torch.nn.Module, got {type(model).__name__}")
    splits = None if data is None or isinstance(data, str) else splits_of(data, cfg.workers_for(False))
    if isinstance(model, nn.Module):
        cfg = cfg.with_(model=object_name(model), checkpoint=None)
    if splits is not None:
        cfg = cfg.with_(dataset=splits.name if splits.name.startswith("object:") else f"object:{splits.name}")
    splits = splits if splits is not None else load_data(cfg)
    obj = model if isinstance(model, nn.Module) else None
    if obj is not None and cfg.weights:
        raise UserError("weights= loads pretrained weights into a torchvision model built by name; load them into "
                        "your model object yourself")
    return Workload(cfg.model, splits, obj, metric, loss, None if obj is not None else cfg.weights), cfg


def search(model: Any = None, data: Any = None, *, metric: Metric | None = None, loss: Loss | None = None,
           progress: bool = True, **options: Any) -> SearchResult:
    """Search a compression policy for ``model`` under a budget; fine-tune and return the chosen one.

    Args:
        model: a trained ``nn.Module``, or a model name (default ``mobilenet_v2``, trained once).
        data: ``(train, val)`` or ``(train, val, test)`` Datasets/DataLoaders, or a dataset name
            (default ``fashion-mnist``). The search decides on ``val``; ``test`` is only measured.
        metric: ``metric(model, loader) -> float``, higher is better (default top-1 accuracy).
        loss: ``loss(model, batch, teacher) -> tensor`` for every fine-tune (default
            cross-entropy + distillation from the base model).
        **options: any ``squeezer search`` option by name: ``budget``, ``target``, ``trials``,
            ``run``, ``max_latency_ms``, ``backend``, ``seed``, ... (:class:`SearchConfig`).

    Raises:
        UserError (a ``ValueError``): bad input, with one line saying what to change.
    """
    if isinstance(model, str):
        options.setdefault("model", model)
    if isinstance(data, str):
        options.setdefault("dataset", data)
    try:
        cfg = SearchConfig.from_dict(_options(options))
    except ValueError as e:
        raise UserError(str(e)) from None
    check_names(cfg if model is None or isinstance(model, str) else cfg.with_(model=object_name(model)))
    resolve_target(cfg.target)
    workload, cfg = workload_of(model, data, cfg, metric, loss)
    if cfg.backend == "ray":
        check_picklable(workload)  # before any work: the workers receive these objects
    ctx, summary = start(cfg, workload, progress=progress)
    return result_of(ctx, summary)


def resume(run: str | Path, *, model: Any = None, data: Any = None, metric: Metric | None = None,
           loss: Loss | None = None, trials: int | None = None, storage: str | None = None,
           progress: bool = True) -> SearchResult:
    """Continue the run in ``run`` (after a crash, or to ``trials`` trained trials). A run made
    from objects needs them again (``model=``, ``data=``; ``metric``/``loss`` if it had them)."""
    if trials is not None and (not isinstance(trials, int) or trials < 1):
        raise UserError(f"`trials >= 1` must hold, but got trials={trials!r}")
    cfg = load_config(Path(run))
    needs = [what for what, name in (("model", cfg.model), ("data", cfg.dataset))
             if name.startswith("object:") and {"model": model, "data": data}[what] is None]
    if needs:
        raise UserError(f"run {run} was started from Python objects ({cfg.model}, {cfg.dataset}); pass them again: "
                        f"squeezer.resume({str(run)!r}, {', '.join(f'{w}=...' for w in needs)})")
    workload = None
    if model is not None or data is not None or metric is not None or loss is not None:
        workload, named = workload_of(model, data, cfg, metric, loss)
        if (named.model, named.dataset) != (cfg.model, cfg.dataset):
            raise UserError(f"run {run} searched model {cfg.model} on {cfg.dataset}, but got {named.model} on "
                            f"{named.dataset}; pass the run's own model and data")
        if cfg.backend == "ray":
            check_picklable(workload)
    ctx, summary = reopen(run, workload, trials=trials, storage=storage, progress=progress)
    return result_of(ctx, summary)


def result_of(ctx: Context, summary: dict[str, Any]) -> SearchResult:
    """The :class:`SearchResult` of a finished run (the chosen model loaded from ``best/``)."""
    best_dir = ctx.run_dir / BEST
    arch = ctx.workload.model
    loaded = load_checkpoint(best_dir / "model.pt", architecture=arch)
    best = Candidate(summary["best"]["trial"], loaded.policy or Policy(), summary["best"], loaded.model)
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage_url(ctx.cfg, ctx.run_dir))
    front = [Candidate(t.number, ctx.space.sample(FixedTrial(t.params)),
                       {"val_metric": t.values[0], **(t.user_attrs.get("cost") or {})})
             for t in pareto_front(study.get_trials(deepcopy=False))]
    return SearchResult(ctx.run_dir, best, ctx.base_metrics, front, summary, ctx.input_shape, ctx.data,
                        ctx.cfg.model)


def report(run: str | Path, *, files: bool = True) -> dict[str, Any]:
    """The report of a run (:func:`search.report.report`); with ``files``, also ``RUN/pareto.png``
    and ``RUN/report.html`` (their paths under ``"files"``)."""
    rep = build_report(run)
    if files:
        written = write_report_files(rep, run)
        rep["files"] = {"pareto_png": written["png"], "report_html": written["html"]}
    return rep


def sensitivity(run: str | Path, *, force: bool = False, val_size: int = 128, threshold_pp: float | None = None,
                model: Any = None, data: Any = None, metric: Metric | None = None,
                progress: bool = True) -> dict[str, Any]:
    """The run's sensitivity probes (measured once, cached in ``RUN/sensitivity.json``; ``force``
    measures again) and the narrowing a search of this run uses -- or, at another
    ``threshold_pp``, would use: ``narrowed`` and ``readmitted`` are added to the probes."""
    if val_size < 1:
        raise UserError(f"`--val-size >= 1` must hold, but got {val_size}")
    run = Path(run)
    cfg = load_config(run)
    workload, _ = workload_of(model, data, cfg, metric, None) if (model is not None or data is not None) \
        else (named_workload(cfg), cfg)
    ctx = prepare(cfg, run, workload, progress=progress)
    sens = load_or_measure(ctx, force=force, val_size=val_size, progress=progress)
    thr = threshold_pp if threshold_pp is not None else cfg.sensitivity_threshold_pp
    # The run's own narrowing (as its search uses it), or what another threshold would give.
    narrowed, readmitted = run_narrowing(ctx, sens) if thr == cfg.sensitivity_threshold_pp else narrow(ctx, sens, thr)
    full = space_choices(ctx.space)
    return {**sens, "model": cfg.model, "dataset": cfg.dataset, "threshold_pp": thr, "narrowed": narrowed,
            "dropped": sum(len(full[d]) - len(v) for d, v in narrowed.items()),
            "readmitted": [{"dimension": d, "choice": c, "loss_pp": v} for d, c, v in readmitted]}
