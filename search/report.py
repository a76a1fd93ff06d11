"""The report of a run: base model, Pareto front, chosen policy per layer, all trials.

``report(run_dir)`` returns a JSON-ready dict (a stable interface: ``base`` and ``best``
objects with ``size_bytes``, ``latency_ms``, ``energy_mj``, ``test_accuracy`` (and
``val_accuracy`` for ``best``), and ``trials``, a list with ``number``, ``state`` (Optuna's
state name), ``status`` (:func:`trial_status`), ``origin`` (``sampler``, or ``seed:uniform``,
``seed:sensitivity``, ``seed:sensitivity-latency``), ``values``, ``params``, ``worker``, ``val_accuracy``
and, for early-stopped trials, ``pruned_at`` and ``rung_accuracy``); ``format_report`` renders it
for people.

Hypervolume (2-D, reported as ``hypervolume`` in the report JSON): the area dominated by the
feasible evaluated trials in the plane (validation accuracy, latency / base latency), bounded by
the reference point (accuracy 0, the base model's latency). 1.0 would be a perfect model at
zero latency; a trial no faster than the base model adds nothing. It is comparable across runs
of the same model and target (the benchmark uses it to compare searches).

Example:
    >>> hypervolume_2d([(0.9, 0.5), (0.8, 0.25)], ref_latency=1.0)
    0.65
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterable

import optuna

from .budget import format_bytes
from .errors import UserError
from .limits import is_feasible
from .records import corrupt_trial_files
from .runfolder import load_config, storage_url
from .selection import pareto_front
from .study import STUDY_NAME

log = logging.getLogger("squeezer")


def _load_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is corrupt (not JSON)") from None


def report(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    for damaged in corrupt_trial_files(run_dir):  # the study holds their results; say so, use none of them
        log.warning("%s", damaged)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials: list = []
    try:
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage_url(cfg, run_dir))
        trials = study.get_trials(deepcopy=False)
    except KeyError:
        pass  # the study was never created (the run stopped before its first trial)
    except Exception as e:  # noqa: BLE001 - unreadable storage
        raise UserError(f"cannot read the study of {run_dir}: {str(e).splitlines()[0]}") from None
    base = _load_json(run_dir / "base" / "metrics.json")
    best = _load_json(run_dir / "best" / "metrics.json")
    policy = _load_json(run_dir / "best" / "policy.json")
    if best is not None and policy is not None:
        best = {**best, "policy": policy}
    rows = []
    for t in trials:
        ua = t.user_attrs
        rung = {int(k): v for k, v in (ua.get("rung_acc") or {}).items()}
        rows.append({"number": t.number, "state": t.state.name, "values": list(t.values) if t.values else None,
                     "params": dict(t.params), "worker": ua.get("worker"), "status": trial_status(t),
                     "origin": f"seed:{ua['seed_policy']}" if ua.get("seed_policy") else "sampler",
                     "evaluated": bool(ua.get("evaluated", False)), "constraints": ua.get("constraints"),
                     "cost": ua.get("cost"), "val_accuracy": ua.get("val_accuracy"),
                     "pruned_at": ua.get("pruned_at"),
                     "rung_accuracy": {str(k): rung[k] for k in sorted(rung)},
                     "train_seconds": ua.get("train_seconds"),
                     "datetime_start": t.datetime_start.isoformat() if t.datetime_start else None,
                     "datetime_complete": t.datetime_complete.isoformat() if t.datetime_complete else None})
    front = [{"number": t.number, "val_accuracy": t.values[0], "latency_ms": t.values[1],
              **(t.user_attrs.get("cost") or {})} for t in pareto_front(
                  [t for t in trials if t.state.name == "COMPLETE"])]
    rep = {"schema": "squeezer.report/1", "run": str(run_dir), "config": cfg.to_dict(), "base": base,
           "best": best, "pareto": front, "trials": rows,
           "summary": _load_json(run_dir / "summary.json")}

    rep["hypervolume"] = report_hypervolume(rep)
    return rep


def trial_status(t) -> str:
    """What happened to a trial, in words: ``trained``, ``over budget`` (rejected by the cost
    model, never trained), ``stopped`` (early-stopped at a rung), ``surplus`` (not needed: the
    asked count was reached), ``failed`` (its worker died; re-queued), ``running``, ``queued``."""
    ua, state = t.user_attrs, t.state.name
    if state == "COMPLETE":
        return "trained" if ua.get("evaluated") else "over budget"
    if state == "PRUNED":
        return "stopped" if "pruned_at" in ua else "surplus"
    return {"FAIL": "failed", "RUNNING": "running", "WAITING": "queued"}.get(state, state.lower())


def _accuracy_cell(t: dict[str, Any]) -> str:
    """Validation accuracy; a stopped trial shows its last rung's accuracy and step."""
    if t["val_accuracy"] is not None:
        return f"{t['val_accuracy']:.4f}"
    if t.get("status") == "stopped" and t.get("rung_accuracy"):
        step, acc = list(t["rung_accuracy"].items())[-1]
        return f"{acc:.4f}@{step}"
    return "-"


def format_report(rep: dict[str, Any], *, max_trials: int = 30) -> str:
    lines = [f"run {rep['run']}  (model {rep['config']['model']}, dataset {rep['config']['dataset']}, "
             f"target {rep['config']['target']}, budget {rep['config']['budget']})", ""]
    base, best = rep.get("base"), rep.get("best")
    lines.append(summary_table(base, best))
    lines.append("")
    if rep["pareto"]:
        lines.append("Pareto front (validation accuracy vs latency):")
        lines.append(f"  {'trial':>5} {'val acc':>8} {'latency ms':>11} {'size':>10} {'energy mJ':>10}")
        for p in rep["pareto"]:
            lines.append(f"  {p['number']:>5} {p['val_accuracy']:>8.4f} {p['latency_ms']:>11.3f} "
                         f"{format_bytes(p.get('size_bytes', 0)):>10} {p.get('energy_mj', 0):>10.4f}")
        lines.append("")
    if best and best.get("policy"):
        lines.append(f"chosen policy (trial {best.get('trial')}), per layer:")
        lines.append(f"  {'layer':<32} {'prune':>5} {'wbits':>5} {'abits':>5} {'rank':>5}")
        for name, lp in best["policy"]["layers"].items():
            lines.append(f"  {name:<32} {lp.get('prune_ratio', 0):>5.2f} {str(lp.get('weight_bits', 'fp32')):>5} "
                         f"{str(lp.get('act_bits', 'fp32')):>5} {str(lp.get('rank_ratio', '-')):>5}")
        d = best["policy"].get("distill")
        if d:
            lines.append(f"  distillation: {d['method']} T={d['temperature']:.2f} alpha={d['alpha']:.2f}")
        lines.append("")
    trials = rep["trials"]
    count = {k: sum(1 for t in trials if t.get("status") == k) for k in ("trained", "stopped", "over budget")}
    lines.append(f"trials: {len(trials)} sampled, {count['trained'] + count['stopped']} trained "
                 f"({count['stopped']} stopped early at a rung), {count['over budget']} rejected by the cost model")
    lines.append(f"  {'#':>4} {'status':<12} {'val acc':>11} {'latency ms':>11} {'size':>10} {'s':>6}  "
                 f"{'from':<24} worker")
    for t in trials[-max_trials:]:
        status = t.get("status") or t["state"].lower()
        if status == "stopped" and t.get("pruned_at") is not None:
            status = f"stopped@{t['pruned_at']}"
        lat = f"{t['cost']['latency_ms']:.3f}" if t["cost"] else "-"
        size = format_bytes(t["cost"]["size_bytes"]) if t["cost"] else "-"
        secs = f"{t['train_seconds']:.0f}" if t["train_seconds"] else "-"
        lines.append(f"  {t['number']:>4} {status:<12} {_accuracy_cell(t):>11} {lat:>11} {size:>10} {secs:>6}  "
                     f"{t.get('origin', ''):<24} {t['worker'] or ''}")
    return "\n".join(lines)


def summary_table(base: dict | None, best: dict | None) -> str:
    def cell(d, k, fmt):
        if not d or d.get(k) is None:
            return "-"
        return fmt(d[k])

    rows = [("size", "size_bytes", lambda v: format_bytes(v)),
            ("test accuracy", "test_accuracy", lambda v: f"{100 * v:.2f}%"),
            ("val accuracy", "val_accuracy", lambda v: f"{100 * v:.2f}%"),
            ("latency", "latency_ms", lambda v: f"{v:.3f} ms"),
            ("energy", "energy_mj", lambda v: f"{v:.4f} mJ"),
            ("peak memory", "peak_memory_bytes", lambda v: format_bytes(v)),
            ("MACs", "macs", lambda v: f"{v / 1e6:.2f} M")]
    out = [f"  {'':<14} {'base':>12} {'chosen':>12} {'ratio':>8}"]
    for label, key, fmt in rows:
        r = ""
        if base and best and base.get(key) and best.get(key) is not None and key not in ("test_accuracy", "val_accuracy"):
            r = f"{base[key] / best[key]:.2f}x" if best[key] else ""
        elif base and best and base.get(key) is not None and best.get(key) is not None:
            r = f"{100 * (best[key] - base[key]):+.2f} pp"
        out.append(f"  {label:<14} {cell(base, key, fmt):>12} {cell(best, key, fmt):>12} {r:>8}")
    return "\n".join(out)


def hypervolume_2d(points: Iterable[tuple[float, float]], *, ref_latency: float) -> float:
    """Area dominated by ``(accuracy, latency)`` points (max accuracy, min latency) up to
    ``(0, ref_latency)``, with latency divided by ``ref_latency``."""
    pts = sorted((lat / ref_latency, acc) for acc, lat in points if lat < ref_latency and acc > 0)
    area, best = 0.0, 0.0
    for i, (x, y) in enumerate(pts):
        best = max(best, y)
        nxt = pts[i + 1][0] if i + 1 < len(pts) else 1.0
        area += (nxt - x) * best
    return round(area, 6)


def _feasible(row: dict[str, Any]) -> bool:
    return is_feasible(row.get("constraints"))


def evaluated_points(rep: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per evaluated trial of the report: accuracy, latency, size, energy, feasibility."""
    out = []
    for t in rep.get("trials", []):
        if t.get("state") != "COMPLETE" or not t.get("evaluated") or not t.get("cost"):
            continue
        c = t["cost"]
        out.append({"number": t["number"], "val_accuracy": t["val_accuracy"], "latency_ms": c["latency_ms"],
                    "size_bytes": c["size_bytes"], "energy_mj": c["energy_mj"], "feasible": _feasible(t)})
    return out


def report_hypervolume(rep: dict[str, Any]) -> dict[str, Any]:
    pts = [p for p in evaluated_points(rep) if p["feasible"]]
    base = rep.get("base") or {}
    ref = base.get("latency_ms") or max((p["latency_ms"] for p in pts), default=1.0) or 1.0
    return {"value": hypervolume_2d([(p["val_accuracy"], p["latency_ms"]) for p in pts], ref_latency=ref),
            "objectives": ["val_accuracy (max)", "latency_ms / reference (min)"],
            "reference_point": {"val_accuracy": 0.0, "latency_ms": ref}, "n_points": len(pts)}
