"""The report of a run: base model, Pareto front, chosen policy per layer, all trials.

``report(run_dir)`` returns a JSON-ready dict (``squeezer.report/2``, keys as in the README's
"JSON fields"): ``base`` and ``best`` (``metric``, ``val_metric``, ``test_metric``,
``size_bytes``, ``latency_ms``, ``energy_mj``, ...; ``best`` also ``trial_val_metric``, the
chosen trial's search-time score), ``limits``, ``pareto``, ``trials`` (each with ``state``, as
Optuna and optuna-dashboard show it, and ``reason``, squeezer's: :func:`search.study.trial_reason`),
``trial_counts``, ``workers`` (who trained trials) and ``hypervolume``. Run folders of older
versions are read into the same keys (:mod:`search.schema`). ``format_report`` renders it for
people.

Hypervolume (2-D, reported as ``hypervolume`` in the report JSON): the area dominated by the
feasible evaluated trials in the plane (validation metric, latency / base latency), bounded by
the reference point (metric 0, the base model's latency). 1.0 would be a perfect model at
zero latency; a trial no faster than the base model adds nothing. It is comparable across runs
of the same model and target (the benchmark uses it to compare searches).

Example:
    >>> hypervolume_2d([(0.9, 0.5), (0.8, 0.25)], ref_latency=1.0)
    0.65
    >>> metric_text(0.8816, "accuracy"), metric_text(0.8816, "balanced_accuracy"), metric_delta(0.88, 0.87, "accuracy")
    ('88.16%', '0.8816', '+1.00 pp')
"""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path
from typing import Any, Iterable

import optuna

from .budget import format_bytes
from .config import SearchConfig, finalist_fine_tune_epochs
from .errors import UserError
from .limits import constraint_values, is_feasible, limits_of, resolve_target, target_sram
from .records import corrupt_trial_files
from .runfolder import MEASURED_SUFFIX, load_config, read_json, storage_url
from .schema import read_run_json, stamped
from .selection import pareto_front
from .study import STUDY_NAME, trial_counts, trial_reason, trial_workers, user_attr

#: What each ``reason`` means, in words (the report's legend).
REASON_WORDS = {"trained": "fine-tuned and scored", "stopped": "stopped early at a rung",
                "over_budget": "over a limit: rejected by the cost model, never trained",
                "surplus": "not needed: the asked number of trials was reached",
                "failed": "its worker died; re-queued", "running": "running", "queued": "queued"}

log = logging.getLogger("squeezer")


def metric_text(v: float | None, metric: str) -> str:
    """A metric's value for people: top-1 accuracy as a percentage, any other metric as is."""
    if v is None:
        return "-"
    return f"{100 * v:.2f}%" if metric == "accuracy" else f"{v:.4f}"


def metric_delta(v: float, ref: float, metric: str) -> str:
    """``v - ref`` for people (percentage points for accuracy)."""
    return f"{100 * (v - ref):+.2f} pp" if metric == "accuracy" else f"{v - ref:+.4f}"


def _study_trials(cfg: SearchConfig, run_dir: Path) -> list:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage_url(cfg, run_dir))
        return study.get_trials(deepcopy=False)
    except KeyError:
        return []  # the study was never created (the run stopped before its first trial)
    except Exception as e:  # noqa: BLE001 - unreadable storage
        raise UserError(f"cannot read the study of {run_dir}: {str(e).splitlines()[0]}") from None


def run_limits(cfg: SearchConfig) -> dict[str, dict[str, Any]]:
    """The run's limits by constraint name: the cost figure each bounds and the limit."""
    try:
        sram = target_sram(resolve_target(cfg.target))
    except UserError:
        sram = None  # a calibrated target file that is gone: no SRAM limit known
    return {name: {"key": key, "limit": limit} for name, (key, limit) in limits_of(cfg, sram).items()}


def named(constraints: Any, names: list[str]) -> dict[str, float] | None:
    """A trial's constraints by name (version-1 runs recorded a list, in the order of ``names``)."""
    if constraints is None or isinstance(constraints, dict):
        return constraints
    vals = constraint_values(constraints)
    return dict(zip(names, vals)) if len(names) == len(vals) else {str(i): v for i, v in enumerate(vals)}


def trial_row(t: Any, names: list[str]) -> dict[str, Any]:
    """One trial of the report (keys of the JSON vocabulary)."""
    ua = t.user_attrs
    rung = {int(k): v for k, v in (user_attr(t, "rung_metric") or {}).items()}
    return {"number": t.number, "state": t.state.name, "reason": trial_reason(t),
            "values": list(t.values) if t.values else None, "params": dict(t.params), "worker": ua.get("worker"),
            "origin": f"seed:{ua['seed_policy']}" if ua.get("seed_policy") else "sampler",
            "evaluated": bool(ua.get("evaluated", False)), "constraints": named(ua.get("constraints"), names),
            "cost": ua.get("cost"), "val_metric": user_attr(t, "val_metric"), "pruned_at": ua.get("pruned_at"),
            "rung_metric": {str(k): rung[k] for k in sorted(rung)}, "train_seconds": ua.get("train_seconds"),
            "datetime_start": t.datetime_start.isoformat() if t.datetime_start else None,
            "datetime_complete": t.datetime_complete.isoformat() if t.datetime_complete else None}


def report(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    cfg = load_config(run_dir)
    for damaged in corrupt_trial_files(run_dir):  # the study holds their results; say so, use none of them
        log.warning("%s", damaged)
    trials = _study_trials(cfg, run_dir)
    base = read_run_json(run_dir / "base" / "metrics.json", "metrics")
    best = read_run_json(run_dir / "best" / "metrics.json", "metrics")
    policy_path = run_dir / "best" / "policy.json"
    if best is not None and policy_path.is_file():
        best = {**best, "policy": read_json(policy_path)}
    if best is not None and "trial_val_metric" not in best:  # version 1 did not record it: the study has it
        hit = [user_attr(t, "val_metric") for t in trials if t.number == best.get("trial")]
        best["trial_val_metric"] = hit[0] if hit else None
    limits = run_limits(cfg)
    front = [{"number": t.number, "val_metric": t.values[0], "latency_ms": t.values[1],
              **(t.user_attrs.get("cost") or {})} for t in pareto_front(
                  [t for t in trials if t.state.name == "COMPLETE"])]
    rep = stamped("report", {
        "run": str(run_dir), "config": cfg.to_dict(), "metric": (best or base or {}).get("metric", "accuracy"),
        "limits": limits, "base": base, "best": best, "pareto": front,
        "trials": [trial_row(t, list(limits)) for t in trials], "trial_counts": trial_counts(trials),
        "workers": trial_workers(trials), "summary": read_run_json(run_dir / "summary.json", "summary"),
        "measured": measured_latencies(run_dir)})
    rep["hypervolume"] = report_hypervolume(rep)
    return rep


def measured_latencies(run_dir: Path) -> list[dict[str, Any]]:
    """Latencies measured on this machine by ``squeezer export`` (every other latency of a report
    is the cost model's prediction on the run's target)."""
    out = []
    for p in sorted((run_dir / "export").rglob("*" + MEASURED_SUFFIX)) if (run_dir / "export").is_dir() else []:
        try:
            out.append(read_json(p))
        except (OSError, ValueError):
            log.warning("%s is damaged; its measurement is not reported", p)
    return out


def measured_lines(rep: dict[str, Any]) -> list[str]:
    """Which latencies are predicted and which measured."""
    target = (rep.get("best") or rep.get("base") or {}).get("target") or rep["config"].get("target")
    lines = [f"latency: predicted by the cost model on {target} (base, chosen, Pareto front, trials)"]
    for m in rep.get("measured") or []:
        pred = m.get("predicted_latency_ms")
        lines.append(f"  measured here: {m['path']} ({m['format']}, batch 1, {m.get('threads', 1)} thread) "
                     f"{m['measured_latency_ms']:.3f} ms; {m.get('target')} predicts "
                     + (f"{pred:.3f} ms" if pred is not None else "nothing (no model recorded)"))
    if not rep.get("measured"):
        lines.append("  nothing measured yet: `squeezer export RUN --format onnx` measures the exported model here")
    return lines


def _metric_cell(t: dict[str, Any], metric: str) -> str:
    """Search-time validation metric; a stopped trial shows its last rung's value and step."""
    if t["val_metric"] is not None:
        return metric_text(t["val_metric"], metric)
    if t["reason"] == "stopped" and t.get("rung_metric"):
        step, v = list(t["rung_metric"].items())[-1]
        return f"{metric_text(v, metric)}@{step}"
    return "-"


def _reason_cell(t: dict[str, Any]) -> str:
    if t["reason"] == "stopped" and t.get("pruned_at") is not None:
        return f"stopped@{t['pruned_at']}"
    return t["reason"]


def count_line(counts: dict[str, int]) -> str:
    """``trials: N sampled: ...`` with every reason that occurred (the summary line)."""
    trained, stopped = counts.get("trained", 0), counts.get("stopped", 0)
    parts = [f"{trained} trained to the end", f"{stopped} stopped early at a rung ({trained + stopped} count "
             f"toward --trials)", f"{counts.get('over_budget', 0)} over budget (rejected by the cost model, never "
             f"trained)"]
    parts += [f"{counts[r]} {r} ({REASON_WORDS[r]})" for r in ("surplus", "failed", "running", "queued")
              if counts.get(r)]
    return textwrap.fill(f"trials: {counts.get('sampled', 0)} sampled: " + ", ".join(parts), width=110,
                         subsequent_indent="  ")


def trial_table(rep: dict[str, Any], *, max_trials: int = 30) -> list[str]:
    """The trial table: Optuna's state and squeezer's reason side by side, then a legend."""
    metric, steps = rep["metric"], rep["config"].get("trial_steps")
    lines = [count_line(rep["trial_counts"]),
             f"  {'#':>4} {'state':<9} {'reason':<12} {'val ' + metric[:10]:>12} {'latency ms':>11} {'size':>10} "
             f"{'train s':>7}  {'from':<24} worker"]
    for t in rep["trials"][-max_trials:]:
        c = t["cost"] or {}
        lat = f"{c['latency_ms']:.3f}" if c else "-"
        size = format_bytes(c["size_bytes"]) if c else "-"
        secs = f"{t['train_seconds']:.0f}" if t["train_seconds"] else "-"
        lines.append(f"  {t['number']:>4} {t['state']:<9} {_reason_cell(t):<12} {_metric_cell(t, metric):>12} "
                     f"{lat:>11} {size:>10} {secs:>7}  {t.get('origin', ''):<24} {t['worker'] or ''}")
    lines += ["  state: Optuna's (as optuna-dashboard shows it); reason: squeezer's "
              "(stopped@N: stopped at fine-tune step N).",
              f"  val {metric}: search-time validation {metric} after {steps} fine-tune steps (value@N: at the rung "
              f"of step N); train s: seconds of the trial's fine-tune and scoring.",
              "  latency and size: the cost model's, on the target."]
    return lines


def _policy_lines(best: dict[str, Any]) -> list[str]:
    lines = [f"chosen policy (trial {best.get('trial')}), per layer:",
             f"  {'layer':<32} {'prune':>5} {'wbits':>5} {'abits':>5} {'rank':>5}"]
    for name, lp in best["policy"]["layers"].items():
        lines.append(f"  {name:<32} {lp.get('prune_ratio', 0):>5.2f} {str(lp.get('weight_bits', 'fp32')):>5} "
                     f"{str(lp.get('act_bits', 'fp32')):>5} {str(lp.get('rank_ratio', '-')):>5}")
    d = best["policy"].get("distill")
    if d:
        lines.append(f"  distillation: {d['method']} T={d['temperature']:.2f} alpha={d['alpha']:.2f}")
    return lines + [""]


def chosen_line(best: dict[str, Any] | None, cfg: dict[str, Any]) -> str:
    """Which accuracy is which: the chosen trial's search-time score vs its fine-tuned one."""
    if not best:
        return "no chosen model yet (the final stage has not run)"
    metric = best.get("metric", "accuracy")
    search_time = best.get("trial_val_metric")
    return (f"chosen: trial {best.get('trial')} after the final fine-tune ({cfg.get('final_epochs')} epochs); "
            f"its search-time val {metric} (after {cfg.get('trial_steps')} steps, the star in pareto.png) "
            f"was {metric_text(search_time, metric) if search_time is not None else 'not recorded'}"
            + finalists_text(best.get("finalists"), cfg, metric)
            + ("" if best.get("feasible", True) else "; it meets no limit set (the least infeasible trial)"))


def finalists_text(finalists: list[dict[str, Any]] | None, cfg: dict[str, Any], metric: str) -> str:
    """How the finalists scored after their longer fine-tune (empty without finalists)."""
    if not finalists:
        return ""
    scores = ", ".join(f"trial {f['number']} {metric_text(f['val_metric'], metric)}" for f in finalists)
    epochs = finalist_fine_tune_epochs(cfg.get("finalist_epochs"), cfg.get("final_epochs"))
    return (f"; chosen among finalists fine-tuned for {epochs} epochs each "
            f"(val {metric}: {scores})")


def hypervolume_text(rep: dict[str, Any]) -> str:
    hv, metric = rep["hypervolume"], rep["metric"]
    return (f"hypervolume {hv['value']:.4f}: the share of the (val {metric}, latency / base latency) square that "
            f"the {hv['n_points']} feasible trained trials dominate, from {metric} 0 at the base model's latency "
            f"({hv['reference_point']['latency_ms']:.4g} ms); 1.0 = a perfect model at zero latency")


def format_report(rep: dict[str, Any], *, max_trials: int = 30) -> str:
    cfg, metric = rep["config"], rep["metric"]
    base, best = rep.get("base"), rep.get("best")
    lines = [f"run {rep['run']}  (model {cfg['model']}, dataset {cfg['dataset']}, target {cfg['target']}, "
             f"budget {cfg['budget']})", "", summary_table(base, best), *measured_lines(rep),
             textwrap.fill(chosen_line(best, cfg), width=110, initial_indent="  ", subsequent_indent="  "), ""]
    if rep["pareto"]:
        lines.append(f"Pareto front (feasible trained trials: search-time val {metric} vs latency on the target):")
        lines.append(f"  {'trial':>5} {'val ' + metric[:10]:>14} {'latency ms':>11} {'size':>10} {'energy mJ':>10}")
        for p in rep["pareto"]:
            lines.append(f"  {p['number']:>5} {metric_text(p['val_metric'], metric):>14} {p['latency_ms']:>11.3f} "
                         f"{format_bytes(p.get('size_bytes', 0)):>10} {p.get('energy_mj', 0):>10.4f}")
        lines += [textwrap.fill(hypervolume_text(rep), width=110, initial_indent="  ", subsequent_indent="  "), ""]
    if best and best.get("policy"):
        lines += _policy_lines(best)
    lines += trial_table(rep, max_trials=max_trials)
    workers = rep.get("workers") or {}
    lines.append(f"workers that trained trials: {len(workers)}"
                 + (f" ({', '.join(f'{w}: {n}' for w, n in workers.items())})" if workers else ""))
    return "\n".join(lines)


def summary_table(base: dict | None, best: dict | None) -> str:
    """Base model vs the chosen one after its final fine-tune (what ``squeezer search`` prints)."""
    metric = (best or base or {}).get("metric", "accuracy")

    def cell(d, k, fmt):
        if not d or d.get(k) is None:
            return "-"
        return fmt(d[k])

    rows = [("size", "size_bytes", lambda v: format_bytes(v)),
            (f"test {metric}", "test_metric", lambda v: metric_text(v, metric)),
            (f"val {metric}", "val_metric", lambda v: metric_text(v, metric)),
            ("latency (predicted)", "latency_ms", lambda v: f"{v:.3f} ms"),
            ("energy", "energy_mj", lambda v: f"{v:.4f} mJ"),
            ("peak memory", "peak_memory_bytes", lambda v: format_bytes(v)),
            ("MACs", "macs", lambda v: f"{v / 1e6:.2f} M")]
    width = max(19, len(metric) + 5)
    out = [f"  {'':<{width}} {'base':>12} {'chosen':>12} {'base/chosen':>11}"]
    for label, key, fmt in rows:
        r = ""
        both = base and best and base.get(key) is not None and best.get(key) is not None
        if both and key in ("test_metric", "val_metric"):
            r = metric_delta(best[key], base[key], metric)
        elif both and best[key]:
            r = f"{base[key] / best[key]:.2f}x"
        out.append(f"  {label:<{width}} {cell(base, key, fmt):>12} {cell(best, key, fmt):>12} {r:>11}")
    return "\n".join(out)


def hypervolume_2d(points: Iterable[tuple[float, float]], *, ref_latency: float) -> float:
    """Area dominated by ``(metric, latency)`` points (max metric, min latency) up to
    ``(0, ref_latency)``, with latency divided by ``ref_latency``."""
    pts = sorted((lat / ref_latency, acc) for acc, lat in points if lat < ref_latency and acc > 0)
    area, best = 0.0, 0.0
    for i, (x, y) in enumerate(pts):
        best = max(best, y)
        nxt = pts[i + 1][0] if i + 1 < len(pts) else 1.0
        area += (nxt - x) * best
    return round(area, 6)


def evaluated_points(rep: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per evaluated trial of the report: metric, latency, size, energy, feasibility."""
    out = []
    for t in rep.get("trials", []):
        if t.get("state") != "COMPLETE" or not t.get("evaluated") or not t.get("cost"):
            continue
        c = t["cost"]
        out.append({"number": t["number"], "val_metric": t["val_metric"], "latency_ms": c["latency_ms"],
                    "size_bytes": c["size_bytes"], "energy_mj": c["energy_mj"],
                    "feasible": is_feasible(t.get("constraints"))})
    return out


def report_hypervolume(rep: dict[str, Any]) -> dict[str, Any]:
    pts = [p for p in evaluated_points(rep) if p["feasible"]]
    base = rep.get("base") or {}
    ref = base.get("latency_ms") or max((p["latency_ms"] for p in pts), default=1.0) or 1.0
    return {"value": hypervolume_2d([(p["val_metric"], p["latency_ms"]) for p in pts], ref_latency=ref),
            "objectives": ["val_metric (max)", "latency_ms / reference (min)"],
            "reference_point": {"val_metric": 0.0, "latency_ms": ref}, "n_points": len(pts)}
