"""Calibration by measurement: micro-benchmark graphs, the kit a user runs on their device
(numpy + onnxruntime only), and its CSV fitted back through ``squeezer calibrate --measurements``."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from squeezer.hw_models import get_target, load_target
from squeezer.hw_models.micro import build_micro, micro_set, parse_spec, write_kit
from squeezer.hw_models.trace import trace
from squeezer.search.cli import main

#: Run the kit's runner in a clean interpreter, then list every module it imported outside the
#: standard library, numpy and onnxruntime (what a device needs installed).
_ISOLATED = """
import runpy, sys
sys.argv = ["run_kit.py", "--rounds", "2", "--repeats", "3"]
try:
    runpy.run_path({path!r}, run_name="__main__")
except SystemExit:
    pass
top = {{m.split(".")[0] for m in sys.modules}}
print(sorted(top & {{"torch", "squeezer", "onnx", "scipy", "yaml", "optuna"}}))
"""


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    d = tmp_path_factory.mktemp("kit")
    graphs = micro_set(specs=[("chain1", 8, 8, 1), ("res", 8, 8, 1)], policies=["fp32", "w8a8", "lowrank_w8a8"])
    write_kit(d, graphs)
    return d


def test_micro_specs_rebuild_and_reject_malformed_names():
    assert parse_spec("micro:mbconv-c16-r14-n2") == ("mbconv", 16, 14, 2)
    t = trace(build_micro("micro:mbconv-c16-r14-n2"), (1, 14, 14), groups=False)
    assert sum(l.kind == "dwconv2d" for l in t) == 2 and sum(l.kind == "add" for l in t) == 2
    with pytest.raises(ValueError, match="micro:<family>"):
        parse_spec("micro:transformer-c16-r14-n2")


def test_kit_round_trip_needs_only_numpy_and_onnxruntime(kit, tmp_path):
    with (kit / "manifest.csv").open() as f:
        manifest = list(csv.DictReader(f))
    assert len(manifest) == 6 and all((kit / r["file"]).is_file() for r in manifest)
    assert sum(bool(r["policy"]) for r in manifest) == 4  # fp32 rows have no policy file
    code = _ISOLATED.format(path=str(kit / "run_kit.py"))
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=300, cwd=kit)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"  # nothing but numpy and onnxruntime was imported
    with (kit / "measurements.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [x["model"] for x in rows] == [x["model"] for x in manifest]
    assert all(float(x["latency_ms"]) > 0 and x["runtime"].startswith("onnxruntime") for x in rows)
    out = tmp_path / "mine.yaml"
    assert main(["calibrate", "--target", "host-ort", "--measurements", str(kit / "measurements.csv"),
                 "--out", str(out)]) == 0
    fitted = load_target(out)
    assert fitted.name == "mine" and fitted.calibration["rows"] == 6
    assert fitted.runtime == get_target("host-ort").runtime  # the runtime's rules travel with the fit
    assert fitted.calibration["latency_after"]["mdape"] <= fitted.calibration["latency_before"]["mdape"]


@pytest.mark.parametrize("argv,msg", [
    (["calibrate"], "--target and --out"),
    (["calibrate", "--kit", "K", "--out", "x.yaml"], "--kit writes a kit"),
    (["calibrate", "--target", "host-ort", "--measurements", "/nonexistent.csv", "--out", "x.yaml"], "not found"),
    (["calibrate", "--target", "host-orz", "--out", "x.yaml"], "did you mean 'host-ort'"),
])
def test_calibrate_cli_bad_input_is_one_line(argv, msg, capsys, tmp_path):
    assert main([str(tmp_path / a) if a == "K" else a for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("squeezer: error:") and msg in err and "Traceback" not in err
