"""Calibration: fit a target's free parameters to measured (model, latency[, energy]) rows.

The latency model (:mod:`hw_models.cost`) is a sum of terms, each linear in one parameter:
a per-kind overhead (``overhead_us``) or the reciprocal of a per-class efficiency
(``efficiency``). :func:`calibrate` computes each row's summed terms once and fits the
parameters by robust least squares on ``log(predicted) - log(measured)`` (so every row
counts by its relative error), with a weak pull of every parameter towards its prior (the
target file's value) so that parameters the rows cannot identify keep their physical
values. Energy is then fitted the same way: ``energy_scale.compute``, ``energy_scale.memory``
and ``active_power_mw`` (power above idle x predicted latency).

:func:`measure_host` times real runtimes on this machine (PyTorch eager; ONNX Runtime with
``runtime="onnxruntime"``): median of repeats after warm-up, one thread. A target that models
ONNX Runtime is calibrated by measurement on micro-benchmark graphs (:mod:`hw_models.micro`,
nn-Meter style): :func:`measure_runtime` exports them as ``squeezer export`` does and times them
with :mod:`hw_models.kit_runner`, the same runner a calibration kit (:func:`hw_models.micro.write_kit`)
carries to another device.

Example:
    >>> from squeezer.hw_models.nb201 import nb201_table
    >>> t = get_target("arm-a72")
    >>> rows = [CalibrationRow(model="a", latency_ms=2.0 * estimate_table(tab, None, t).latency_ms, table=tab)
    ...         for tab in [nb201_table([3, 3, 3, 3, 3, 3]), nb201_table([2, 1, 4, 2, 1, 4])]]
    >>> fitted = calibrate(t, rows)
    >>> evaluate(fitted, rows)["mdape"] < evaluate(t, rows)["mdape"]
    True
"""

from __future__ import annotations

import copy
import csv
import io
import math
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import onnxruntime as ort
import torch

from ..compressors.apply import apply_policy_
from ..compressors.policy import LayerPolicy, Policy
from ..evaluators.models import build_model
from . import kit_runner
from .bench import load_artifact
from .cost import coefficients, estimate_table, features
from .micro import MICRO_CLASSES, STRUCTURAL_POLICIES, MicroGraph, build_micro, export_micro, micro_set, write_kit
from .nb201 import nb201_table
from .targets import EFFICIENCY_CLASSES, Target, get_target, save_target
from .trace import LayerTable, trace


@dataclass(frozen=True)
class CalibrationRow:
    """One measurement.

    Attributes:
        model: model name (zoo, torchvision, ``pkg.mod:factory`` or ``nb201:<arch_str>``).
        latency_ms: measured batch-1 latency.
        energy_mj: measured energy per inference, if any.
        input_shape: ``(C, H, W)``.
        num_classes: classifier outputs.
        policy: the policy the measured model was compressed with (``None`` = none).
        table: its traced table (built from ``model`` when missing).
        runtime: what measured it (``torch``, ``onnxruntime``, ``litert``...).
    """

    model: str
    latency_ms: float
    energy_mj: float | None = None
    input_shape: tuple[int, ...] = (3, 32, 32)
    num_classes: int = 10
    policy: Policy | None = field(default=None, compare=False)
    table: LayerTable | None = field(default=None, compare=False, repr=False)
    runtime: str = ""

    def __post_init__(self) -> None:
        if not (self.latency_ms > 0 and math.isfinite(self.latency_ms)):
            raise ValueError(f"`latency_ms > 0` must hold, but got latency_ms={self.latency_ms} for {self.model!r}")
        if self.energy_mj is not None and not self.energy_mj > 0:
            raise ValueError(f"`energy_mj > 0` must hold, but got energy_mj={self.energy_mj} for {self.model!r}")

    def resolved_table(self) -> LayerTable:
        if self.table is not None:
            return self.table
        return table_for(self.model, self.input_shape, self.num_classes)


def table_for(model: str, input_shape: Sequence[int] = (3, 32, 32), num_classes: int = 10) -> LayerTable:
    """Trace a model by name (``nb201:<arch_str>`` builds a NAS-Bench-201 network)."""
    if model.startswith("nb201:"):
        return nb201_table(model[len("nb201:"):], num_classes, input_hw=int(input_shape[-1]))
    if model.startswith("micro:"):
        return trace(build_micro(model, int(input_shape[0]), num_classes), tuple(input_shape))
    return trace(build_model(model, in_channels=int(input_shape[0]), num_classes=num_classes), tuple(input_shape))


# --- metrics -------------------------------------------------------------------------------

def metrics(pred: Sequence[float], meas: Sequence[float]) -> dict[str, float]:
    """Spearman rank correlation, median absolute percentage error, share within +-20%."""
    from scipy.stats import spearmanr  # local: scipy.stats adds ~0.9 s to importing hw_models

    p = np.asarray(pred, float)
    m = np.asarray(meas, float)
    ape = np.abs(p - m) / m
    rho = float(spearmanr(p, m).statistic) if len(p) > 2 else float("nan")
    return {"n": int(len(p)), "spearman": rho, "mdape": float(np.median(ape)) if len(p) else float("nan"),
            "within20": float(np.mean(ape <= 0.2)) if len(p) else float("nan")}


def evaluate(target: "str | Target", rows: Sequence[CalibrationRow], *, energy: bool = False) -> dict[str, float]:
    """Metrics of ``target``'s predictions on ``rows`` (latency, or energy when ``energy``)."""
    t = get_target(target)
    preds, meas = [], []
    for r in rows:
        if energy and r.energy_mj is None:
            continue
        c = estimate_table(r.resolved_table(), r.policy, t, layers=False)
        preds.append(c.energy_mj if energy else c.latency_ms)
        meas.append(r.energy_mj if energy else r.latency_ms)
    return metrics(preds, meas)


# --- fitting --------------------------------------------------------------------------------

def _fit_log_linear(F: np.ndarray, y: np.ndarray, theta0: np.ndarray, *, prior_weight: float,
                    lower: np.ndarray, upper: np.ndarray, f_scale: float = 0.1) -> np.ndarray:
    """min sum rho(log(F theta) - log y) + w * sum (log theta - log theta0)^2 over theta > 0."""
    from scipy.optimize import least_squares  # local: ~0.4 s at import, only fitting needs it

    n = len(y)
    w = math.sqrt(prior_weight * n / max(1, F.shape[1]))
    z0 = np.log(np.clip(theta0, lower, upper))
    ly = np.log(y)
    lt0 = np.log(theta0)

    def resid(z: np.ndarray) -> np.ndarray:
        th = np.exp(z)
        pred = F @ th
        return np.concatenate([np.log(np.maximum(pred, 1e-12)) - ly, w * (z - lt0)])

    def jac(z: np.ndarray) -> np.ndarray:
        th = np.exp(z)
        pred = np.maximum(F @ th, 1e-12)
        j1 = F * th[None, :] / pred[:, None]
        return np.vstack([j1, w * np.eye(len(z))])

    res = least_squares(resid, z0, jac=jac, bounds=(np.log(lower), np.log(upper)), loss="soft_l1",
                        f_scale=f_scale, max_nfev=200)
    return np.exp(res.x)


def calibrate(target: "str | Target", rows: Iterable[CalibrationRow], *, energy: bool = True,
              prior_weight: float = 1e-3, name: str | None = None, source: str = "") -> Target:
    """Fit ``target``'s latency (and energy) parameters to measured rows.

    Args:
        target: the starting target (its values are the priors).
        rows: measurements; rows with ``energy_mj`` also fit the energy parameters.
        energy: fit energy when rows carry it.
        prior_weight: strength of the pull towards the prior values (relative to the data).
        name: name of the calibrated target (default: unchanged).
        source: where the rows come from (recorded in ``calibration``).

    Returns:
        A new :class:`Target` whose ``calibration`` field records the fit.
    """
    t = get_target(target)
    rows = [r for r in rows]
    if len(rows) < 2:
        raise ValueError(f"`at least 2 calibration rows` must hold, but got {len(rows)}")
    feats = [features(r.resolved_table(), r.policy, t) for r in rows]
    coef = coefficients(t)
    params = sorted({p for f in feats for p in f if not p.startswith("energy.") and f[p] > 0})
    F = np.array([[f.get(p, 0.0) for p in params] for f in feats])
    y = np.array([r.latency_ms for r in rows])
    theta0 = np.array([max(coef[p], 1e-3) for p in params])
    lower = np.array([1e-3 if p.startswith("overhead") else 0.2 for p in params])
    upper = np.array([1e5 if p.startswith("overhead") else 1e4 for p in params])
    before = metrics(F @ theta0, y)
    theta = _fit_log_linear(F, y, theta0, prior_weight=prior_weight, lower=lower, upper=upper)
    after = metrics(F @ theta, y)
    overhead = dict(t.overhead_us)
    eff = dict(t.efficiency)
    for p, v in zip(params, theta):
        sec, key = p.split(".", 1)
        if sec == "overhead_us":
            overhead[key] = round(float(v), 4)
        else:
            eff[key] = round(float(1.0 / v), 5)
    new = replace(t, overhead_us=overhead, efficiency=eff)
    info: dict[str, Any] = {"source": source, "rows": len(rows), "date": time.strftime("%Y-%m-%d"),
                            "fitted": [p for p in params],
                            "latency_before": _round(before), "latency_after": _round(after)}
    erows = [(r, f) for r, f in zip(rows, feats) if r.energy_mj is not None]
    if energy and len(erows) >= 3:
        lat = np.array([estimate_table(r.resolved_table(), r.policy, new, layers=False).latency_ms for r, _ in erows])
        G = np.array([[f["energy.compute_pj"] * 1e-9, f["energy.memory_pj"] * 1e-9, l * 1e-3]
                      for (_, f), l in zip(erows, lat)])
        ye = np.array([r.energy_mj for r, _ in erows])
        e0 = np.array([t.energy_scale.get("compute", 1.0), t.energy_scale.get("memory", 1.0),
                       max(t.active_power_mw, 1.0)])
        eb = metrics(G @ e0, ye)
        e = _fit_log_linear(G, ye, e0, prior_weight=prior_weight, lower=np.array([1e-3, 1e-3, 1e-3]),
                            upper=np.array([1e4, 1e4, 1e6]))
        ea = metrics(G @ e, ye)
        new = replace(new, energy_scale={"compute": round(float(e[0]), 5), "memory": round(float(e[1]), 5)},
                      active_power_mw=round(float(e[2]), 3))
        info.update(energy_rows=len(erows), energy_before=_round(eb), energy_after=_round(ea))
    srcs = dict(new.sources)
    srcs["calibration"] = f"fitted by hw_models.calibrate on {len(rows)} rows{' from ' + source if source else ''}"
    return replace(new, name=name or t.name, calibration=info, sources=srcs, path=None)


def _round(d: Mapping[str, float]) -> dict[str, float]:
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in d.items()}


# --- measuring this machine -------------------------------------------------------------------

#: Models timed by default for the host profile (disjoint from the benchmark's ten test models).
HOST_MODELS = ("lenet5", "resnet20", "vgg_small", "mobilenet_v2_050", "resnet32", "squeezenet1_1",
               "shufflenet_v2_x0_5", "mnasnet0_5", "regnet_x_400mf", "densenet121", "resnet50", "alexnet",
               "vgg11", "resnext50_32x4d", "mnasnet0_75", "regnet_x_800mf", "resnet56", "shufflenet_v2_x1_5")
#: Pull towards the prior for the (few, noisy) host rows.
HOST_PRIOR_WEIGHT = 0.01


def host_policies(seed: int = 0) -> list[Policy | None]:
    """Structural policies timed for the host profile: none, uniform pruning, low-rank."""
    return [None, Policy(layers={"_default": LayerPolicy(prune_ratio=0.5)}),
            Policy(layers={"_default": LayerPolicy(prune_ratio=0.25)}),
            Policy(layers={"_default": LayerPolicy(prune_ratio=0.25, rank_ratio=0.5)})]


def _runner(model: Any, input_shape: Sequence[int], runtime: str) -> Callable[[], Any]:
    """A zero-argument callable running one batch-1 inference of ``model`` in ``runtime``."""
    x = torch.randn(1, *input_shape)
    if runtime == "torch":
        model = model.eval()

        def run() -> Any:
            with torch.inference_mode():
                return model(x)
        return run
    if runtime == "onnxruntime":
        buf = io.BytesIO()
        torch.onnx.export(model.eval(), (x,), buf, input_names=["x"], output_names=["y"], opset_version=17,
                          dynamo=False)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
        feed = {"x": x.numpy()}
        return lambda: sess.run(None, feed)
    raise ValueError(f"`runtime in ('torch', 'onnxruntime')` must hold, but got runtime={runtime!r}")


def time_models(models: Sequence[Any], input_shape: Sequence[int], *, runtime: str = "torch", repeats: int = 15,
                warmup: int = 3, rounds: int = 5, clock: str = "cpu") -> list[float]:
    """Median batch-1 latency (ms) of each model, one thread, timed round-robin.

    The ``repeats`` timed runs of every model are spread over ``rounds`` passes over all the
    models (after ``warmup`` untimed runs each), so a change in machine load during the
    measurement hits every model alike instead of whichever was timed last: calibration rows
    and the rows they must predict are measured under the same conditions.

    ``clock="cpu"`` (default) times the process's CPU time: with one compute thread this is the
    inference's own time, less affected by other processes competing for the cores than wall
    time; ``clock="wall"`` times wall-clock time.

    Example:
        >>> from squeezer.evaluators.models import build_model
        >>> ms = time_models([build_model("lenet5", in_channels=1, num_classes=10)], (1, 28, 28), repeats=3)
        >>> len(ms) == 1 and 0 < ms[0] < 1000
        True
    """
    if clock not in ("cpu", "wall"):
        raise ValueError(f"`clock in ('cpu', 'wall')` must hold, but got clock={clock!r}")
    if repeats < 1 or rounds < 1:
        raise ValueError(f"`repeats >= 1 and rounds >= 1` must hold, but got repeats={repeats}, rounds={rounds}")
    now = time.process_time if clock == "cpu" else time.perf_counter
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = [_runner(m, input_shape, runtime) for m in models]
        for run in runs:
            for _ in range(warmup):
                run()
        ts: list[list[float]] = [[] for _ in runs]
        per_round = [repeats // rounds + (1 if r < repeats % rounds else 0) for r in range(min(rounds, repeats))]
        for n in per_round:
            for k, run in enumerate(runs):
                for _ in range(n):
                    t0 = now()
                    run()
                    ts[k].append(now() - t0)
    finally:
        torch.set_num_threads(threads)   # the caller's setting, not ours, after the timing
    return [float(np.median(t) * 1e3) for t in ts]


def time_model(model: Any, input_shape: Sequence[int], *, runtime: str = "torch", repeats: int = 15,
               warmup: int = 3, clock: str = "cpu") -> float:
    """Median latency (ms) of one batch-1 inference after ``warmup`` runs, one thread
    (:func:`time_models` of one model)."""
    return time_models([model], input_shape, runtime=runtime, repeats=repeats, warmup=warmup, rounds=1,
                       clock=clock)[0]


def host_instances(models: Sequence[str] = HOST_MODELS, *, input_shape: Sequence[int] = (3, 64, 64),
                   policies: Sequence[Policy | None] | None = None, num_classes: int = 10,
                   seed: int = 0) -> list[tuple[str, Policy | None, Any, Any]]:
    """``(name, policy, traced table, compressed module)`` for every model under every policy it
    takes (structure only: fake quantization is a training-time artefact, the deployable
    structure is what runs)."""
    torch.manual_seed(seed)
    policies = list(policies) if policies is not None else [None]
    out = []
    for name in models:
        base = build_model(name, in_channels=int(input_shape[0]), num_classes=num_classes)
        table = trace(base, tuple(input_shape))
        for pol in policies:
            m = copy.deepcopy(base)
            if pol is not None:
                try:
                    apply_policy_(m, pol, tuple(input_shape), skip_quantization=True)
                except Exception:  # noqa: BLE001 - a policy this model cannot take is skipped
                    continue
            out.append((name, pol, table, m.eval()))
    return out


def measure_host(models: Sequence[str] = HOST_MODELS, *, input_shape: Sequence[int] = (3, 64, 64),
                 policies: Sequence[Policy | None] | None = None, runtime: str = "torch", repeats: int = 15,
                 warmup: int = 3, rounds: int = 5, out_path: str | Path | None = None, num_classes: int = 10,
                 seed: int = 0) -> list[CalibrationRow]:
    """Time ``models`` (each under each policy) on this machine; optionally fit and write a profile.

    Args:
        models: model names (see :func:`evaluators.models.build_model`).
        input_shape: ``(C, H, W)``.
        policies: policies applied (structure only: eager float execution) before timing.
        runtime: ``torch`` (eager) or ``onnxruntime``.
        repeats: timed runs (the median is kept).
        warmup: untimed runs first.
        rounds: passes over all models the repeats are spread over (see :func:`time_models`).
        out_path: when given, calibrate the ``host`` target on the rows and save it there.

    Returns:
        The measured rows (with traced tables).
    """
    inst = host_instances(models, input_shape=input_shape, policies=policies, num_classes=num_classes, seed=seed)
    lats = time_models([m for *_, m in inst], input_shape, runtime=runtime, repeats=repeats, warmup=warmup,
                       rounds=rounds)
    rows = [CalibrationRow(model=name, latency_ms=lat, input_shape=tuple(input_shape), num_classes=num_classes,
                           policy=pol, table=table, runtime=runtime)
            for (name, pol, table, _), lat in zip(inst, lats)]
    if out_path is not None:
        fitted = calibrate("host", rows, energy=False, prior_weight=HOST_PRIOR_WEIGHT,
                           source=f"measure_host ({runtime}) on this machine")
        save_target(fitted, out_path)
    return rows


# --- CSV and CLI helpers ----------------------------------------------------------------------

def read_measurements(path: str | Path) -> list[CalibrationRow]:
    """Rows from a CSV with columns ``model, latency_ms`` and optional ``energy_mj``,
    ``input_shape`` (``3x32x32``), ``num_classes``, ``policy`` (a policy file path), ``runtime``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"measurements file not found: {path}")
    rows = []
    with path.open() as f:
        reader = csv.DictReader(f)
        missing = {"model", "latency_ms"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"measurements file {path}: missing column(s) {sorted(missing)}; "
                             "expected model, latency_ms[, energy_mj, input_shape, num_classes, policy, runtime]")
        for i, r in enumerate(reader):
            shape = tuple(int(x) for x in (r.get("input_shape") or "3x32x32").lower().split("x"))
            pol = None
            if r.get("policy"):
                p = Path(r["policy"])
                pol = Policy.load(p if p.is_absolute() else path.parent / p)
            e = r.get("energy_mj")
            rows.append(CalibrationRow(model=r["model"], latency_ms=float(r["latency_ms"]),
                                       energy_mj=float(e) if e not in (None, "") else None, input_shape=shape,
                                       num_classes=int(r.get("num_classes") or 10), policy=pol,
                                       runtime=r.get("runtime") or ""))
    return rows


def measure_runtime(graphs: Sequence[MicroGraph] | None = None, *, runtime: str = "onnxruntime", rounds: int = 7,
                    repeats: int = 30, workdir: str | Path | None = None) -> list[CalibrationRow]:
    """Time micro-benchmark graphs on this machine (one thread, batch 1, interleaved). ONNX
    Runtime: the kit of :func:`hw_models.micro.write_kit`, run here by its own runner; ExecuTorch
    (``runtime="xnnpack"``): the graphs as ``.pte`` programs, timed by the same function."""
    if runtime not in ("onnxruntime", "xnnpack"):
        raise ValueError(f"`runtime in ('onnxruntime', 'xnnpack')` must hold, but got runtime={runtime!r}")
    with tempfile.TemporaryDirectory() as tmp:
        kit = Path(workdir) if workdir is not None else Path(tmp)
        if runtime == "onnxruntime":
            write_kit(kit, graphs)
            return read_measurements(kit_runner.run_kit(kit, rounds=rounds, repeats=repeats))
        graphs = list(graphs) if graphs is not None else micro_set(policies=STRUCTURAL_POLICIES)
        runs, inputs = {}, {}
        for g in graphs:
            path = kit / f"{g.file_stem}.pte"
            if not path.is_file():  # a workdir keeps the programs of an earlier call (exporting takes ~10 s each)
                export_micro(g, path, fmt="pte")
            runs[g.file_stem] = load_artifact(path)[1]
            inputs[g.file_stem] = np.random.default_rng(0).random((1, *g.input_shape), dtype=np.float32)
        ms = kit_runner.time_interleaved(runs, inputs, rounds=rounds, repeats=repeats)
        return [CalibrationRow(model=g.spec, latency_ms=ms[g.file_stem], input_shape=g.input_shape,
                               num_classes=MICRO_CLASSES, policy=g.policy, runtime="executorch xnnpack")
                for g in graphs]


def cli_calibrate(target: str | None, measurements_csv: str | Path | None, out_path: str | Path | None, *,
                  name: str | None = None, runtime: str = "torch", kit: str | Path | None = None) -> dict[str, Any]:
    """What ``squeezer calibrate`` does: fit ``target`` to a CSV, or measure this machine, and save;
    or write a calibration kit.

    Args:
        target: starting target (name, alias or path).
        measurements_csv: CSV of measurements (see :func:`read_measurements`). Without it, a
            target whose runtime is PyTorch (``host``) or ONNX Runtime (``host-ort``) is measured
            on this machine.
        out_path: where to write the calibrated YAML.
        name: name of the new target (default: the file stem of ``out_path``).
        runtime: with ``kit``, the runtime the kit's graphs are written for (``onnxruntime``).
        kit: write a calibration kit to this folder instead (graphs, manifest, ``run_kit.py``).

    Returns:
        A JSON-able summary (rows, errors before/after, output path; or the kit's files).
    """
    if kit is not None:
        manifest = write_kit(kit, runtime="onnxruntime" if runtime == "torch" else runtime)
        n = sum(1 for _ in manifest.open()) - 1
        return {"kit": str(Path(kit)), "graphs": n, "manifest": str(manifest), "runner": str(Path(kit) / "run_kit.py"),
                "next": f"copy {kit} to the device; there: pip install numpy onnxruntime; python run_kit.py; "
                        f"then: squeezer calibrate --target <start> --measurements {Path(kit) / 'measurements.csv'} "
                        "--out <device>.yaml"}
    if target is None or out_path is None:
        raise ValueError("`--target and --out are given (or --kit)` must hold")
    base = get_target(target)
    if measurements_csv is None:
        if base.runtime.name == "pytorch":
            rows = measure_host(runtime=runtime, policies=host_policies())
            src = f"measure_host ({runtime})"
        elif base.runtime.name in ("onnxruntime", "xnnpack"):
            rows = measure_runtime(runtime=base.runtime.name)
            src = f"{len(rows)} micro-benchmark graphs (hw_models.micro) timed in {base.runtime.name} here"
        else:
            raise ValueError("`measurements are given unless the target's runtime runs here (pytorch, onnxruntime, "
                             "xnnpack)` "
                             f"must hold, but got target={target!r} (runtime {base.runtime.name}) and no "
                             "measurements file")
    else:
        rows = read_measurements(measurements_csv)
        src = str(measurements_csv)
    fitted = calibrate(base, rows, name=name or Path(out_path).stem, source=src,
                       prior_weight=HOST_PRIOR_WEIGHT if measurements_csv is None else 1e-3)
    path = save_target(fitted, out_path)
    return {"target": fitted.name, "from": base.name, "out_path": str(path), **fitted.calibration}


__all__ = ["CalibrationRow", "calibrate", "evaluate", "metrics", "measure_host", "measure_runtime", "time_model",
           "cli_calibrate",
           "read_measurements", "table_for", "EFFICIENCY_CLASSES"]
