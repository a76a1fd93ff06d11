"""Report files of a run: ``pareto.png`` and ``report.html`` (the report data is :mod:`search.report`'s)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from .budget import parse_size
from .report import evaluated_points, format_report, report_hypervolume


def plot_pareto(rep: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """Accuracy vs latency, size and energy for every evaluated trial; budget lines; the chosen
    trial marked. Returns exactly what was plotted (points per panel, lines, chosen trial)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    cfg = rep.get("config") or {}
    pts = evaluated_points(rep)
    best = rep.get("best") or {}
    chosen = best.get("trial")
    limits = {"size_bytes": parse_size(cfg["budget"]) if cfg.get("budget") else None,
              "latency_ms": cfg.get("max_latency_ms"), "energy_mj": cfg.get("max_energy_mj")}
    panels = [("latency_ms", "latency (ms)"), ("size_bytes", "size (bytes)"), ("energy_mj", "energy (mJ)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    plotted: dict[str, Any] = {"panels": {}, "chosen": chosen, "budget_lines": {}}
    for ax, (key, label) in zip(axes, panels):
        ok = [p for p in pts if p["feasible"]]
        bad = [p for p in pts if not p["feasible"]]
        ax.scatter([p[key] for p in ok], [p["val_accuracy"] for p in ok], s=22, c="tab:blue", label="feasible trial")
        if bad:
            ax.scatter([p[key] for p in bad], [p["val_accuracy"] for p in bad], s=22, c="tab:gray", marker="x",
                       label="over a limit")
        panel = {"x": [p[key] for p in ok + bad], "y": [p["val_accuracy"] for p in ok + bad],
                 "numbers": [p["number"] for p in ok + bad]}
        if key == "latency_ms":
            front = sorted(rep.get("pareto") or [], key=lambda p: p["latency_ms"])
            if front:
                ax.step([p["latency_ms"] for p in front], [p["val_accuracy"] for p in front], where="post",
                        c="tab:orange", label="Pareto front")
        if limits.get(key):
            ax.axvline(limits[key], c="tab:red", ls="--", label="budget")
            plotted["budget_lines"][key] = limits[key]
        base = rep.get("base") or {}
        if base.get(key) is not None and base.get("val_accuracy") is not None:
            ax.scatter([base[key]], [base["val_accuracy"]], marker="s", s=50, c="k", label="base model")
        hit = [p for p in pts if p["number"] == chosen]
        if hit:
            ax.scatter([hit[0][key]], [hit[0]["val_accuracy"]], marker="*", s=260, c="gold", edgecolors="k",
                       zorder=5, label=f"chosen (trial {chosen})")
            panel["chosen_xy"] = (hit[0][key], hit[0]["val_accuracy"])
        if key == "size_bytes":
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
        plotted["panels"][key] = panel
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{cfg.get('model', '')} on {cfg.get('target', '')}, budget {cfg.get('budget', '')}: "
                 f"{len(pts)} evaluated trials")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return plotted


def write_html(rep: dict[str, Any], path: str | Path, *, image: str = "pareto.png") -> None:
    """A self-contained summary page next to the plot (links it by relative path)."""

    hv = rep.get("hypervolume") or report_hypervolume(rep)
    cfg = rep.get("config") or {}
    rows = []
    for t in rep.get("trials", []):
        c = t.get("cost") or {}
        acc = f"{t['val_accuracy']:.4f}" if t.get("val_accuracy") is not None else ""
        lat = f"{c['latency_ms']:.4}" if c else ""
        rows.append(f"<tr><td>{t['number']}</td><td>{html.escape(t['state'])}</td><td>{acc}</td>"
                    f"<td>{lat}</td><td>{c.get('size_bytes', '')}</td>"
                    f"<td>{html.escape(str(t.get('origin') or ''))}</td>"
                    f"<td>{html.escape(str(t.get('worker') or ''))}</td></tr>")
    doc = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>squeezer report: {html.escape(str(rep.get('run')))}</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}} pre{{background:#f6f6f6;padding:8px}}</style></head>
<body><h1>squeezer report</h1>
<p>run <code>{html.escape(str(rep.get('run')))}</code>: {html.escape(str(cfg.get('model')))} on
{html.escape(str(cfg.get('dataset')))}, target {html.escape(str(cfg.get('target')))}, budget {html.escape(str(cfg.get('budget')))}</p>
<p>hypervolume {hv['value']:.4f} (accuracy x latency/base latency, reference: accuracy 0 at
{hv['reference_point']['latency_ms']:.4g} ms; {hv['n_points']} feasible evaluated trials)</p>
<img src="{html.escape(image)}" alt="Pareto plot" style="max-width:100%">
<h2>Summary</h2><pre>{html.escape(format_report(rep))}</pre>
<h2>All trials</h2><table><tr><th>#</th><th>state</th><th>val acc</th><th>latency ms</th><th>size B</th>
<th>from</th><th>worker</th></tr>{''.join(rows)}</table></body></html>
"""
    Path(path).write_text(doc)


def write_report_files(rep: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """``RUN/pareto.png`` and ``RUN/report.html``; returns the plotted data and the paths."""
    run_dir = Path(run_dir)
    plotted = plot_pareto(rep, run_dir / "pareto.png")
    write_html(rep, run_dir / "report.html")
    return {"plotted": plotted, "png": str(run_dir / "pareto.png"), "html": str(run_dir / "report.html")}
