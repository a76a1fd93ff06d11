"""``squeezer report RUN`` writes pareto.png and report.html that plot what the JSON says."""

from __future__ import annotations

import html
import json
import subprocess
import sys

import pytest

from squeezer.search.report import hypervolume_2d


def test_hypervolume_2d_by_hand():
    # Two points: (acc 0.9 at half the latency) and (acc 0.8 at a quarter): 0.25*0.8 + 0.5*0.9.
    assert hypervolume_2d([(0.9, 0.5), (0.8, 0.25)], ref_latency=1.0) == pytest.approx(0.65)
    assert hypervolume_2d([(0.9, 0.5), (0.5, 0.6)], ref_latency=1.0) == pytest.approx(0.45)  # dominated adds 0
    assert hypervolume_2d([(0.9, 1.2)], ref_latency=1.0) == 0.0                               # slower than ref
    assert hypervolume_2d([], ref_latency=1.0) == 0.0


def test_report_files_plot_what_the_json_says(digits_run):
    from squeezer.search.plots import COLUMNS, write_report_files
    from squeezer.search.report import report

    run = digits_run
    r = subprocess.run([sys.executable, "-m", "squeezer", "report", str(run), "--json"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    png, page = run / "pareto.png", run / "report.html"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert rep["files"]["pareto_png"] == str(png)
    text = page.read_text()
    assert 'src="pareto.png"' in text and f"hypervolume {rep['hypervolume']['value']:.4f}" in text
    # The page's trial table: Optuna's state and squeezer's reason side by side, where each trial came from
    # (no sensitivity here: seeds are uniform); the chosen trial's row is marked.
    chosen = rep["best"]["trial"]
    for t in rep["trials"]:
        mark = ' class="chosen" title="the chosen trial"' if t["number"] == chosen else ""
        row = f"<tr{mark}><td>{t['number']}</td>"
        assert f"{row}<td>{t['state']}</td><td>{t['reason']}" in text
        assert t["origin"] in ("sampler", "seed:uniform")
    assert text.count("<td>seed:uniform</td>") == sum(t["origin"] == "seed:uniform" for t in rep["trials"]) >= 1
    for head, words in COLUMNS:                                    # every column is said in words
        assert f"<dt>{html.escape(head)}</dt><dd>{html.escape(words)}</dd>" in text

    plotted = write_report_files(report(run), run)["plotted"]
    evaluated = [t for t in rep["trials"] if t["state"] == "COMPLETE" and t["evaluated"]]
    for key in ("latency_ms", "size_bytes", "energy_mj"):
        panel = plotted["panels"][key]
        assert sorted(panel["numbers"]) == sorted(t["number"] for t in evaluated)
        by_n = {t["number"]: t for t in evaluated}
        for n, x, y in zip(panel["numbers"], panel["x"], panel["y"]):
            assert x == by_n[n]["cost"][key] and y == by_n[n]["val_metric"]
        # The star is the chosen trial's search-time score, the diamond its fine-tuned one (the summary's).
        assert panel["chosen_xy"] == (by_n[chosen]["cost"][key], rep["best"]["trial_val_metric"])
        assert panel["final_xy"] == (rep["best"][key], rep["best"]["val_metric"])
    assert plotted["chosen"] == chosen and plotted["y_scale"] == 100     # accuracy in %, as in the text report
    assert plotted["panels"]["size_bytes"]["limits"] == {"size": 60_000}
    # Every mark of the plot is named on the page, the budget line with its value.
    assert plotted["marks"]["limit:size"] == "size budget 60.00 kB"
    for label in plotted["marks"].values():
        assert html.escape(label) in text
    feas = [t for t in evaluated if max(t["constraints"].values()) <= 0]
    assert rep["hypervolume"]["n_points"] == len(feas)
    assert rep["hypervolume"]["value"] == pytest.approx(hypervolume_2d(
        [(t["val_metric"], t["cost"]["latency_ms"]) for t in feas], ref_latency=rep["base"]["latency_ms"]))
