"""The report of a run: base model, Pareto front, chosen policy per layer, all trials.

``report(run_dir)`` returns a JSON-ready dict (a stable interface: ``base`` and ``best``
objects with ``size_bytes``, ``latency_ms``, ``energy_mj``, ``test_accuracy`` (and
``val_accuracy`` for ``best``), and ``trials``, a list with ``number``, ``state`` (Optuna's
state name), ``status`` (:func:`trial_status`), ``origin`` (``sampler``, or ``seed:uniform``,
``seed:sensitivity``, ``seed:sensitivity-latency``), ``values``, ``params``, ``worker``, ``val_accuracy``
and, for early-stopped trials, ``pruned_at`` and ``rung_accuracy``); ``format_report`` renders it
for people.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .budget import format_bytes
from .config import SearchConfig
from .errors import UserError


def _load_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise UserError(f"{path} is corrupt (not JSON)") from None


def report(run_dir: str | Path) -> dict[str, Any]:
    import optuna

    from .job import STUDY_NAME, pareto_front, storage_url

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a squeezer run (no config.yaml)")
    try:
        cfg = SearchConfig.load(run_dir / "config.yaml")
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
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
    from .plots import report_hypervolume

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
