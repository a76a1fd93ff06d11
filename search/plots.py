"""Report files of a run: ``pareto.png`` and ``report.html`` (the report data is :mod:`search.report`'s).

Every mark, line and column is named where it is drawn (legends on every panel, a legend of
marks and one of columns on the page), in the words of the text report.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from .budget import format_bytes
from .report import (
    REASON_WORDS,
    chosen_line,
    evaluated_points,
    format_report,
    hypervolume_text,
    metric_text,
    report_hypervolume,
)

#: Panels of pareto.png: x key, axis label.
PANELS = [("latency_ms", "latency on the target (ms, cost model)"), ("size_bytes", "size (bytes, log scale)"),
          ("energy_mj", "energy per inference (mJ, cost model)")]


def _limit_text(name: str, limit: float, key: str) -> str:
    value = format_bytes(limit) if key.endswith("_bytes") else f"{limit:g} {key.rsplit('_', 1)[1]}"
    return f"{'size budget' if name == 'size' else name.replace('_', ' ') + ' limit'} {value}"


def marks(rep: dict[str, Any]) -> dict[str, str]:
    """Label of every mark of pareto.png (its legends and the page's legend say the same)."""
    metric, cfg, best = rep["metric"], rep.get("config") or {}, rep.get("best") or {}
    chosen, pts = best.get("trial"), evaluated_points(rep)
    out = {"feasible": f"trained trial, every limit met (search-time val {metric})",
           "infeasible": "trained trial over a limit", "front": "Pareto front (best val for the latency)",
           "base": f"base model (uncompressed, val {metric})",
           "chosen": f"chosen trial {chosen}: search-time val after {cfg.get('trial_steps')} steps",
           "final": f"chosen trial {chosen} after the final fine-tune (val {metric}; the summary's number)",
           **{f"limit:{n}": _limit_text(n, lim["limit"], lim["key"]) for n, lim in (rep.get("limits") or {}).items()}}
    drawn = {"infeasible": any(not p["feasible"] for p in pts), "front": bool(rep.get("pareto")),
             "chosen": any(p["number"] == chosen for p in pts), "final": best.get("val_metric") is not None,
             "base": (rep.get("base") or {}).get("val_metric") is not None}
    return {k: v for k, v in out.items() if drawn.get(k, True)}


def _draw_panel(ax: Any, rep: dict[str, Any], pts: list[dict[str, Any]], key: str, scale: float) -> dict[str, Any]:
    """One panel: trials, front, limits, base, chosen (search-time and fine-tuned)."""
    label, base, best = marks(rep), rep.get("base") or {}, rep.get("best") or {}
    ok, bad = [p for p in pts if p["feasible"]], [p for p in pts if not p["feasible"]]
    ax.scatter([p[key] for p in ok], [scale * p["val_metric"] for p in ok], s=22, c="tab:blue",
               label=label["feasible"])
    if bad:
        ax.scatter([p[key] for p in bad], [scale * p["val_metric"] for p in bad], s=22, c="tab:gray", marker="x",
                   label=label["infeasible"])
    panel: dict[str, Any] = {"x": [p[key] for p in ok + bad], "y": [p["val_metric"] for p in ok + bad],
                             "numbers": [p["number"] for p in ok + bad], "limits": {}}
    if key == "latency_ms" and rep.get("pareto"):
        front = sorted(rep["pareto"], key=lambda p: p["latency_ms"])
        ax.step([p["latency_ms"] for p in front], [scale * p["val_metric"] for p in front], where="post",
                c="tab:orange", label=label["front"])
    for name, lim in (rep.get("limits") or {}).items():
        if lim["key"] == key:
            ax.axvline(lim["limit"], c="tab:red", ls="--", label=label[f"limit:{name}"])
            panel["limits"][name] = lim["limit"]
    if base.get(key) is not None and base.get("val_metric") is not None:
        ax.scatter([base[key]], [scale * base["val_metric"]], marker="s", s=50, c="k", label=label["base"])
    hit = [p for p in pts if p["number"] == best.get("trial")]
    if hit:
        ax.scatter([hit[0][key]], [scale * hit[0]["val_metric"]], marker="*", s=260, c="gold", edgecolors="k",
                   zorder=5, label=label["chosen"])
        panel["chosen_xy"] = (hit[0][key], hit[0]["val_metric"])
    if best.get(key) is not None and best.get("val_metric") is not None:
        ax.scatter([best[key]], [scale * best["val_metric"]], marker="D", s=60, c="none", edgecolors="darkgoldenrod",
                   linewidths=2, zorder=6, label=label["final"])
        panel["final_xy"] = (best[key], best["val_metric"])
    return panel


def plot_pareto(rep: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Search-time validation metric vs latency, size and energy for every trained trial; the
    limits; the base model; the chosen trial before and after its final fine-tune. Returns
    what was plotted (per panel: ``x``, ``y`` in the metric's units, trial numbers, limits)."""
    import matplotlib  # 0.5 s to import: only when the report files are written

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    cfg, metric = rep.get("config") or {}, rep["metric"]
    scale = 100.0 if metric == "accuracy" else 1.0  # accuracy in % as in the text report
    pts = evaluated_points(rep)
    fig, axes = plt.subplots(1, 3, figsize=(16, 6.2))
    plotted: dict[str, Any] = {"panels": {}, "chosen": (rep.get("best") or {}).get("trial"), "y_scale": scale,
                               "marks": marks(rep)}
    for ax, (key, xlabel) in zip(axes, PANELS):
        plotted["panels"][key] = _draw_panel(ax, rep, pts, key, scale)
        if key == "size_bytes":
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_bytes(v)))
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"validation {metric}" + (" (%)" if scale == 100 else ""))
        ax.grid(alpha=0.3)
    # One legend for all panels, below them: it names every mark and line and hides no point.
    handles = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.suptitle(f"{cfg.get('model', '')} on {cfg.get('target', '')}, budget {cfg.get('budget', '')}: "
                 f"{len(pts)} trials trained to the end (search-time val {metric} after "
                 f"{cfg.get('trial_steps')} fine-tune steps)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return plotted


#: The columns of the page's trial table: header, what it is.
COLUMNS = [("#", "trial number (as in optuna-dashboard)"),
           ("state", "Optuna's state of the trial, as optuna-dashboard shows it"),
           ("reason", "squeezer's reason: " + "; ".join(f"{k}: {v}" for k, v in REASON_WORDS.items())),
           ("val", "search-time validation metric after the trial's short fine-tune (value@N: at the rung of step N)"),
           ("latency ms", "the cost model's latency on the target, per inference"),
           ("size bytes", "the cost model's stored size of the compressed model"),
           ("train s", "seconds of the trial's fine-tune and scoring"),
           ("from", "who proposed the policy: the sampler, or a seed policy"),
           ("worker", "host:pid of the process that trained it")]


def _trial_cells(t: dict[str, Any], metric: str) -> list[str]:
    c = t.get("cost") or {}
    val = metric_text(t["val_metric"], metric) if t.get("val_metric") is not None else ""
    if not val and t.get("rung_metric"):
        step, v = list(t["rung_metric"].items())[-1]
        val = f"{metric_text(v, metric)}@{step}"
    reason = t["reason"] + (f"@{t['pruned_at']}" if t["reason"] == "stopped" and t.get("pruned_at") else "")
    return [str(t["number"]), t["state"], reason, val, f"{c['latency_ms']:.4g}" if c else "",
            str(c.get("size_bytes", "")), f"{t['train_seconds']:.0f}" if t.get("train_seconds") else "",
            str(t.get("origin") or ""), str(t.get("worker") or "")]


def _trial_rows(rep: dict[str, Any]) -> str:
    chosen = (rep.get("best") or {}).get("trial")
    rows = []
    for t in rep.get("trials", []):
        mark = ' class="chosen" title="the chosen trial"' if t["number"] == chosen else ""
        cells = "".join(f"<td>{html.escape(v)}</td>" for v in _trial_cells(t, rep["metric"]))
        rows.append(f"<tr{mark}>{cells}</tr>")
    return "".join(rows)


def _legend(rep: dict[str, Any]) -> str:
    """What each mark of the plot and each column of the table is."""
    glyphs = {"feasible": "blue dot", "infeasible": "gray cross", "front": "orange steps", "base": "black square",
              "chosen": "gold star", "final": "hollow gold diamond"}
    items = [f"<li><b>{glyphs.get(k, 'red dashed line')}</b>: {html.escape(v)}</li>" for k, v in marks(rep).items()]
    cols = "".join(f"<dt>{html.escape(h)}</dt><dd>{html.escape(d)}</dd>" for h, d in COLUMNS)
    return f"<ul class=legend>{''.join(items)}</ul>", f"<dl class=columns>{cols}</dl>"


def write_html(rep: dict[str, Any], path: str | Path, *, image: str = "pareto.png") -> None:
    """A self-contained summary page next to the plot (links it by relative path)."""
    rep = rep if rep.get("hypervolume") else {**rep, "hypervolume": report_hypervolume(rep)}
    cfg, metric, e = rep.get("config") or {}, rep["metric"], html.escape
    marks_html, columns_html = _legend(rep)
    workers = rep.get("workers") or {}
    heads = "".join(f"<th>{e(h if h != 'val' else f'val {metric}')}</th>" for h, _ in COLUMNS)
    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>squeezer report: {e(str(rep.get('run')))}</title>
<style>body{{font-family:sans-serif;max-width:1400px;margin:auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}} pre{{background:#f6f6f6;padding:8px;white-space:pre-wrap}}
tr.chosen{{background:#fff3b0;font-weight:bold}} dt{{font-weight:bold;float:left;width:7em;clear:left}}
dd{{margin-left:8em}} .legend li{{margin:2px 0}}</style></head>
<body><h1>squeezer report</h1>
<p>run <code>{e(str(rep.get('run')))}</code>: {e(str(cfg.get('model')))} on {e(str(cfg.get('dataset')))},
target {e(str(cfg.get('target')))}, budget {e(str(cfg.get('budget')))}; metric: {e(metric)}
({'top-1 accuracy, shown in %' if metric == 'accuracy' else 'your metric, higher is better'}).
Workers that trained trials: {len(workers)}{e(' (' + ', '.join(f'{w}: {n} trials' for w, n in workers.items()) + ')'
                                                 if workers else '')}.</p>
<p>{e(chosen_line(rep.get('best'), cfg))}.</p>
<p>{e(hypervolume_text(rep))}.</p>
<img src="{e(image)}" alt="Pareto plot" style="max-width:100%">
<h2>Marks and lines of the plot</h2>{marks_html}
<h2>Summary</h2><pre>{e(format_report(rep))}</pre>
<h2>All trials</h2>{columns_html}
<table><tr>{heads}</tr>{_trial_rows(rep)}</table></body></html>
"""
    Path(path).write_text(doc)


def write_report_files(rep: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """``RUN/pareto.png`` and ``RUN/report.html``; returns the plotted data and the paths."""
    run_dir = Path(run_dir)
    plotted = plot_pareto(rep, run_dir / "pareto.png")
    write_html(rep, run_dir / "report.html")
    return {"plotted": plotted, "png": str(run_dir / "pareto.png"), "html": str(run_dir / "report.html")}
