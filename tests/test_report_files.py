"""``squeezer report RUN`` writes pareto.png and report.html that plot what the JSON says."""

from __future__ import annotations

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


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from squeezer.search.config import SearchConfig
    from squeezer.search.pipeline import start

    root = tmp_path_factory.mktemp("rep")
    cfg = SearchConfig(model="resnet20", dataset="digits", budget="60kB", base_epochs=4, trial_steps=4,
                       final_epochs=0.2, trials=3, seed=2, sensitivity=False, run=str(root / "r"))
    start(cfg, progress=False)[1]
    return root / "r"


def test_report_files_plot_what_the_json_says(run):
    from squeezer.search.plots import write_report_files
    from squeezer.search.report import report

    r = subprocess.run([sys.executable, "-m", "squeezer", "report", str(run), "--json"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    png, page = run / "pareto.png", run / "report.html"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert rep["files"]["pareto_png"] == str(png)
    text = page.read_text()
    assert 'src="pareto.png"' in text and f"{rep['hypervolume']['value']:.4f}" in text
    # The page's trial table says where each trial came from (no sensitivity here: seeds are uniform).
    for t in rep["trials"]:
        assert f"<tr><td>{t['number']}</td>" in text
        assert t["origin"] in ("sampler", "seed:uniform")
    assert text.count("<td>seed:uniform</td>") == sum(t["origin"] == "seed:uniform" for t in rep["trials"]) >= 1

    plotted = write_report_files(report(run), run)["plotted"]
    evaluated = [t for t in rep["trials"] if t["state"] == "COMPLETE" and t["evaluated"]]
    for key in ("latency_ms", "size_bytes", "energy_mj"):
        panel = plotted["panels"][key]
        assert sorted(panel["numbers"]) == sorted(t["number"] for t in evaluated)
        by_n = {t["number"]: t for t in evaluated}
        for n, x, y in zip(panel["numbers"], panel["x"], panel["y"]):
            assert x == by_n[n]["cost"][key] and y == by_n[n]["val_accuracy"]
    assert plotted["chosen"] == rep["best"]["trial"]
    assert plotted["panels"]["latency_ms"]["chosen_xy"][1] == pytest.approx(rep["best"]["val_accuracy"], abs=1.0)
    assert plotted["budget_lines"]["size_bytes"] == 60_000
    feas = [t for t in evaluated if max(t["constraints"]) <= 0]
    assert rep["hypervolume"]["n_points"] == len(feas)
    assert rep["hypervolume"]["value"] == pytest.approx(hypervolume_2d(
        [(t["val_accuracy"], t["cost"]["latency_ms"]) for t in feas], ref_latency=rep["base"]["latency_ms"]))
