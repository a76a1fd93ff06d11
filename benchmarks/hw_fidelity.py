"""Fidelity of the hardware cost models against published device measurements.

For every device in ``../shared/data/hw-measurements/`` this fits the target's free parameters
(:func:`hw_models.calibrate`) on k-1 folds of the shipped rows and predicts the held-out fold,
and does the same for a MACs-line baseline (``latency = a * MACs + b`` by least squares on the
same training rows); it prints Spearman, median absolute percentage error (MdAPE) and the
share within +-20%, pooled over the held-out folds.

    python benchmarks/hw_fidelity.py                      # all devices, 5-fold CV
    python benchmarks/hw_fidelity.py --write-profiles     # also refit arm-a72 / arm-a76 / eyeriss on all rows
    python benchmarks/hw_fidelity.py --host               # also: calibrate host here, then 10 torchvision models x random policies
    python benchmarks/hw_fidelity.py --json runs/hw_fidelity_results.json   # every number as JSON

Rows whose cell output does not depend on its input (``none`` on every path) are left out,
as the data README says (the converters fold those networks away). Every network is built
plainly, as NAS-Bench-201's code writes it (all six edges, ``none`` as ``x.mul(0.)``), and
priced through the general path (``trace`` -> ``estimate_table``): what each runtime executes
of it follows from its target's graph rules (:mod:`hw_models.graph`; LiteRT: a ``none`` edge
is a zero and what only it reads is dead code; the simulators cost every op but the ``none``
edges; ONNX Runtime on the Pi 5 keeps ``x * 0``; TorchScript mobile runs the graph as written).
The HW-NAS-Bench-360 file (Raspberry Pi 5, Pixel) holds one measurement per NAS-Bench-201
isomorphism class (``Structure.to_unique_str(consider_zero=True)``), taken on the class's
lowest ``arch_idx`` and copied to its other members: every row is predicted for the network
that was measured (:func:`hw_models.nb201.measured_representatives`). Found on the calibration
rows: all 115 groups of rows sharing one measured value are exactly such classes; predicting
each row's own network instead caps Spearman at ~0.93 on these devices.
"""

from __future__ import annotations

import argparse
import csv
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

torch.set_num_threads(1)

from squeezer.hw_models import get_target, save_target  # noqa: E402
from squeezer.hw_models.calibrate import CalibrationRow, calibrate, metrics  # noqa: E402
from squeezer.hw_models.cost import estimate_table  # noqa: E402
from squeezer.hw_models.graph import runtime_graph  # noqa: E402
from squeezer.hw_models.nb201 import is_connected, measured_representatives, nb201_table, parse_arch  # noqa: E402
from squeezer.hw_models.targets import GraphRules, RuntimeRules  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "hw-measurements"
CACHE = ROOT / "runs" / "cache" / "nb201_plain_tables.pkl"

# device key: (csv file, latency column, energy column, base target, classes, runtime, sample,
#              which network was measured: "self" or "class-min" (see hw_models.nb201.measured_representatives))
# The networks are built plainly (every edge, ``none`` as x.mul(0.)); what the runtime executes of
# them follows from the base target's graph rules, or from RUNTIME_GRAPH where the device's
# runtime is not the base target's.
DEVICES = {
    "pi4": ("nb201_raspi4_latency_calibration.csv", "raspi4_latency_ms", None, "arm-a72", 10, "litert", None, "self"),
    "pi5-litert": ("nb360_pi5_cifar100_calibration.csv", "pi5_litert_lat_ms_median", "pi5_litert_energy_mj",
                   "arm-a76", 100, "litert", None, "class-min"),
    "pi5-onnx": ("nb360_pi5_cifar100_calibration.csv", "pi5_onnx_lat_ms_median", "pi5_onnx_energy_mj",
                 "arm-a76", 100, "onnxruntime", None, "class-min"),
    "pi5-torchmobile": ("nb360_pi5_cifar100_calibration.csv", "pi5_torchmobile_lat_ms_median",
                        "pi5_torchmobile_energy_mj", "arm-a76", 100, "pytorch", None, "class-min"),
    "pixel-litert": ("nb360_pi5_cifar100_calibration.csv", "pixel_litert_lat_ms_median", None, "arm-a76", 100,
                     "litert", None, "class-min"),
    "pixel3": ("nb201_pixel3_eyeriss_fpga_latency.csv", "pixel3_latency_ms", None, "arm-a76", 10, "litert", 1000,
               "self"),
    "eyeriss": ("nb201_pixel3_eyeriss_fpga_latency.csv", "eyeriss_latency_ms", None, "eyeriss", 10, "simulator",
                1000, "self"),
    "fpga": ("nb201_pixel3_eyeriss_fpga_latency.csv", "fpga_latency_ms", None, "eyeriss", 10, "simulator", 1000,
             "self"),
}
#: Graph rules of runtimes measured on a base target that models another runtime: ONNX Runtime
#: folds constants and removes dead code but keeps x * 0 (IEEE: NaN * 0 is NaN); TorchScript
#: mobile runs the graph as written.
RUNTIME_GRAPH = {"onnxruntime": GraphRules(zero_multiply=False), "pytorch": GraphRules.none()}
#: Shipped profiles refit on all rows with --write-profiles.
PROFILES = {"pi4": "arm-a72", "pi5-litert": "arm-a76", "eyeriss": "eyeriss"}


def load_archs(data: Path) -> dict[int, tuple[str, float]]:
    with (data / "nb201_archs.csv").open() as f:
        return {int(r["arch_idx"]): (r["arch_str"], float(r["macs_M"])) for r in csv.DictReader(f)}


class Tables:
    """NAS-Bench-201 layer tables, cached on disk (tracing is ~0.1 s per network)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict = {}
        if path.is_file():
            try:
                self.data = pickle.loads(path.read_bytes())
            except Exception:  # noqa: BLE001 - a stale cache is rebuilt
                self.data = {}
        self.dirty = False

    def get(self, arch: str, classes: int):
        key = (arch, classes)
        t = self.data.get(key)
        if t is None:
            t = nb201_table(arch, classes)
            self.data[key] = t
            self.dirty = True
        return t

    def save(self) -> None:
        if self.dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_bytes(pickle.dumps(self.data))
            self.dirty = False


def device_rows(key: str, data: Path, archs: dict, reps: dict[int, int], tables: Tables, seed: int = 0):
    """Calibration rows of one device; ``reps`` maps an ``arch_idx`` to the network measured for it
    (:func:`hw_models.nb201.measured_representatives`), used where the device's rule is ``class-min``."""
    fname, lcol, ecol, _, classes, _, sample, measured = DEVICES[key]
    with (data / fname).open() as f:
        raw = [r for r in csv.DictReader(f)]
    if sample is not None and len(raw) > sample:
        rng = np.random.default_rng(seed)
        raw = [raw[i] for i in sorted(rng.choice(len(raw), sample, replace=False))]
    rows, macs, dropped = [], [], 0
    for r in raw:
        idx = reps[int(r["arch_idx"])] if measured == "class-min" else int(r["arch_idx"])
        arch, macs_m = archs[idx]
        lat = float(r[lcol])
        if not is_connected(parse_arch(arch)) or lat < 0.1:
            dropped += 1
            continue
        e = float(r[ecol]) if ecol and r.get(ecol) not in (None, "") else None
        rows.append(CalibrationRow(model=f"nb201:{arch}", latency_ms=lat, energy_mj=e, num_classes=classes,
                                   table=tables.get(arch, classes), runtime=key))
        macs.append(macs_m)
    return rows, np.array(macs), dropped


def kfold(n: int, k: int, seed: int = 0) -> list[np.ndarray]:
    return np.array_split(np.random.default_rng(seed).permutation(n), k)


def line_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    a, b = np.polyfit(x, y, 1)
    return float(a), float(b)


def device_target(key: str):
    """The base target of a device, with the graph rules of the runtime it was measured in."""
    base = get_target(DEVICES[key][3])
    graph = RUNTIME_GRAPH.get(DEVICES[key][5])
    if graph is None:
        return base
    return base.replace(runtime=RuntimeRules(name=DEVICES[key][5], graph=graph,
                                             integer_kernels=base.runtime.integer_kernels))


def cross_validate(key: str, rows, macs: np.ndarray, folds: int) -> dict:
    base = device_target(key)
    n = len(rows)
    pl, pe, bl, be = np.zeros(n), np.full(n, np.nan), np.zeros(n), np.full(n, np.nan)
    bll, bel = np.zeros(n), np.full(n, np.nan)
    live = np.array([runtime_graph(r.table, base.runtime.graph).macs / 1e6 for r in rows])  # what runs
    y = np.array([r.latency_ms for r in rows])
    ye = np.array([r.energy_mj if r.energy_mj is not None else np.nan for r in rows])
    for test in kfold(n, folds):
        mask = np.ones(n, bool)
        mask[test] = False
        train = [rows[i] for i in np.flatnonzero(mask)]
        fitted = calibrate(base, train)
        for i in test:
            c = estimate_table(rows[i].table, None, fitted, layers=False)
            pl[i], pe[i] = c.latency_ms, c.energy_mj
        a, b = line_fit(macs[mask], y[mask])
        bl[test] = a * macs[test] + b
        a, b = line_fit(live[mask], y[mask])
        bll[test] = a * live[test] + b
        if not np.isnan(ye).all():
            a, b = line_fit(macs[mask], ye[mask])
            be[test] = a * macs[test] + b
            a, b = line_fit(live[mask], ye[mask])
            bel[test] = a * live[test] + b
    out = {"latency": {"model": metrics(pl, y), "macs_line": metrics(bl, y), "live_macs_line": metrics(bll, y)},
           "twins": twins(rows, y, pl, base.runtime.graph)}
    if not np.isnan(ye).all():
        out["energy"] = {"model": metrics(pe, ye), "macs_line": metrics(be, ye), "live_macs_line": metrics(bel, ye)}
    return out


def _executed(table, rules) -> tuple:
    """What a runtime with ``rules`` executes of ``table``, as a hashable multiset of ops."""
    return tuple(sorted((l.kind, l.in_channels, l.out_channels, l.kernel, l.stride, l.in_hw, len(l.inputs))
                        for l in runtime_graph(table, rules)))


def twins(rows, y: np.ndarray, pred: np.ndarray, rules) -> dict:
    """The measurement noise floor: rows whose network executes the same graph as other rows'
    ("twins") should measure the same. ``twin_within20``: share of those rows within +-20% of
    the median of their twins' measurements (what knowing the twins' latency predicts);
    ``model_within20``: the cross-validated model on the same rows; ``slow_share``: rows over
    1.3x the fastest measurement of their graph."""
    groups: dict = {}
    for i, r in enumerate(rows):
        groups.setdefault(_executed(r.table, rules), []).append(i)
    multi = [g for g in groups.values() if len(g) > 1]
    idx = [i for g in multi for i in g]
    if not idx:
        return {"rows": 0}
    twin = [abs(y[i] / np.median([y[j] for j in g if j != i]) - 1) <= 0.2 for g in multi for i in g]
    slow = [y[i] > 1.3 * min(y[j] for j in g) for g in multi for i in g]
    return {"rows": len(idx), "graphs": len(multi), "twin_within20": round(float(np.mean(twin)), 4),
            "model_within20": round(float(np.mean(np.abs(pred[idx] / y[idx] - 1) <= 0.2)), 4),
            "slow_share": round(float(np.mean(slow)), 4)}


# --- host check ------------------------------------------------------------------------------

HOST_EVAL_MODELS = ("resnet18", "resnet34", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
                    "squeezenet1_0", "shufflenet_v2_x1_0", "mnasnet1_0", "efficientnet_b0", "regnet_y_400mf")


def random_policy(table, rng):
    """Random structural policy: per-layer pruning ratios and, sometimes, low-rank factors."""
    from squeezer.compressors.policy import LayerPolicy, Policy

    layers = {}
    for n in table.compressible()[:-1]:
        if rng.random() < 0.6:
            layers[n] = LayerPolicy(prune_ratio=float(rng.choice([0.0, 0.25, 0.5])),
                                    rank_ratio=float(rng.choice([0.5, 0.75])) if rng.random() < 0.2 else None,
                                    weight_bits=int(rng.choice([4, 8])) if rng.random() < 0.5 else None)
    return Policy(layers=layers)


def host_check(input_hw: int = 64, seed: int = 0, write_profile: bool = False) -> dict:
    """Calibrate ``host`` on this machine (models disjoint from the test set), then predict the
    PyTorch-eager latency of 10 torchvision models under random structural policies.

    Calibration and test models are timed together, round-robin (:func:`time_models`), so both
    sets see the same machine load."""
    import copy

    from squeezer.compressors.apply import apply_policy_
    from squeezer.evaluators.models import build_model
    from squeezer.hw_models.calibrate import HOST_MODELS, HOST_PRIOR_WEIGHT, host_instances, host_policies, time_models
    from squeezer.hw_models.trace import trace

    shape = (3, input_hw, input_hw)
    t0 = time.time()
    calib = host_instances(HOST_MODELS, input_shape=shape, policies=host_policies(seed))
    rng = np.random.default_rng(seed)
    tests = []
    for name in HOST_EVAL_MODELS:
        base = build_model(name, in_channels=3, num_classes=10)
        table = trace(base, shape)
        pol = random_policy(table, rng)
        m = copy.deepcopy(base)
        try:
            apply_policy_(m, pol, shape, skip_quantization=True)
        except Exception as e:  # noqa: BLE001 - report, then time the model unpruned
            print(f"  {name}: policy not applicable ({str(e)[:80]}); timing it uncompressed")
            pol, m = None, copy.deepcopy(base)
        tests.append((name, pol, table, m.eval()))
    lats = time_models([m for *_, m in calib + tests], shape, repeats=21, warmup=3, rounds=7)
    rows = [CalibrationRow(model=name, latency_ms=lat, input_shape=shape, policy=pol, table=table, runtime="torch")
            for (name, pol, table, _), lat in zip(calib, lats)]
    host = calibrate("host", rows, energy=False, prior_weight=HOST_PRIOR_WEIGHT,
                     source=f"measure_host (torch eager, 1 thread, CPU-time clock, round-robin), {len(rows)} rows")
    if write_profile:
        save_target(host, ROOT / "hw_models" / "targets" / "host.yaml")
    out = []
    for (name, pol, table, _), meas in zip(tests, lats[len(calib):]):
        pred = estimate_table(table, pol, host, layers=False).latency_ms
        out.append({"model": name, "measured_ms": round(meas, 3), "predicted_ms": round(pred, 3),
                    "ape": round(abs(pred - meas) / meas, 3),
                    "pruned_layers": 0 if pol is None else sum(1 for lp in pol.layers.values() if lp.prune_ratio > 0),
                    "lowrank_layers": 0 if pol is None else sum(1 for lp in pol.layers.values() if lp.rank_ratio)})
    within = sum(1 for r in out if r["ape"] <= 0.2)
    return {"rows": out, "within20": within, "n": len(out), "input_shape": list(shape),
            "calibration_rows": len(rows), "calibration": host.calibration, "seconds": round(time.time() - t0)}


# --- STM32H743 (arm-m7) ------------------------------------------------------------------------

#: arm-m7's compute efficiencies before the STM32 fit (what the YAML held, from CMSIS-NN kernel structure).
M7_PRIOR_EFFICIENCY = {"conv": 0.35, "pointwise": 0.45, "dwconv": 0.3, "linear": 0.4}


def stm32_check(data: Path) -> dict:
    """arm-m7 against the STM32H743 rows.

    The MCUNet architectures of those rows are not in the data (only their MAC counts), so the
    fit is one common factor on the four compute efficiencies, chosen so that an MBConv network
    (MobileNetV2 w0.3, 64x64, int8 weights and activations) runs at the median CMSIS-NN MAC/cycle
    of the rows with a MAC count. The one buildable network, ``mbv2-w0.3-r64`` (no MAC count,
    so not in the fit), is the held-out check, with its peak SRAM against our peak-memory model.
    """
    import torchvision

    from squeezer.compressors.policy import LayerPolicy, Policy
    from squeezer.hw_models.trace import trace

    with (data / "stm32h743_measured.csv").open() as f:
        rows = list(csv.DictReader(f))
    t = trace(torchvision.models.mobilenet_v2(width_mult=0.3, num_classes=2), (3, 64, 64))
    pol = Policy(layers={"_default": LayerPolicy(weight_bits=8, act_bits=8)})
    base = get_target("arm-m7")
    mpc = [float(r["MAC_per_cycle_at_480MHz"]) for r in rows
           if r["library"] == "cmsis_nn" and r["MAC_per_cycle_at_480MHz"]]
    clock_hz = base.clock_mhz * 1e6
    goal_ms = t.macs / (float(np.median(mpc)) * clock_hz) * 1e3

    def with_factor(f: float):
        eff = {**base.efficiency, **{k: v * f for k, v in M7_PRIOR_EFFICIENCY.items()}}
        return base.replace(efficiency=eff)

    lo, hi = 0.01, 2.0
    for _ in range(50):  # latency falls as the factor grows
        f = (lo + hi) / 2
        lo, hi = (f, hi) if estimate_table(t, pol, with_factor(f), layers=False).latency_ms > goal_ms else (lo, f)
    fitted = with_factor(f)
    c = estimate_table(t, pol, fitted, layers=False)
    shipped = estimate_table(t, pol, base, layers=False)
    meas = {r["library"]: r for r in rows if r["net_id"] == "mbv2-w0.3-r64"}
    return {"cmsis_rows": len(mpc), "median_mac_per_cycle": float(np.median(mpc)), "factor": round(f, 4),
            "efficiency": {k: round(v, 4) for k, v in fitted.efficiency.items()},
            "mbv2_predicted_ms": round(c.latency_ms, 2), "mbv2_shipped_ms": round(shipped.latency_ms, 2),
            "mbv2_peak_kB": round(c.peak_memory_bytes / 1024, 1),
            "mbv2_measured": {lib: {"latency_ms": float(r["latency_ms"]), "peak_sram_kB": float(r["peak_sram_kB"])}
                              for lib, r in meas.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--devices", nargs="*", default=list(DEVICES))
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--write-profiles", action="store_true", help="refit shipped arm-a72/arm-a76/eyeriss on all rows")
    ap.add_argument("--host", action="store_true", help="also run the host check (10 torchvision models)")
    ap.add_argument("--stm32", action="store_true", help="also fit/check arm-m7 on the STM32H743 rows")
    ap.add_argument("--json", type=Path, default=None, help="write all numbers here")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"no hardware data at {args.data}", file=sys.stderr)
        return 2
    t0 = time.time()
    archs = load_archs(args.data)
    reps = measured_representatives({i: a for i, (a, _) in archs.items()})
    tables = Tables(CACHE)
    results: dict = {}
    print(f"{'device':16s} {'metric':8s} {'rows':>5s} | {'Spearman':>8s} {'MdAPE':>7s} {'<=20%':>6s} | "
          f"{'line Sp':>8s} {'line Md':>7s} {'line 20':>7s} | {'live Sp':>8s} {'live Md':>7s} {'live 20':>7s}")
    for key in args.devices:
        rows, macs, dropped = device_rows(key, args.data, archs, reps, tables)
        tables.save()
        res = cross_validate(key, rows, macs, args.folds)
        res["dropped_disconnected"] = dropped
        results[key] = res
        for metric, d in res.items():
            if not isinstance(d, dict) or "model" not in d:
                continue
            m, b, bv = d["model"], d["macs_line"], d["live_macs_line"]
            print(f"{key:16s} {metric:8s} {m['n']:5d} | {m['spearman']:8.3f} {100 * m['mdape']:6.1f}% "
                  f"{100 * m['within20']:5.1f}% | {b['spearman']:8.3f} {100 * b['mdape']:6.1f}% "
                  f"{100 * b['within20']:6.1f}% | {bv['spearman']:8.3f} {100 * bv['mdape']:6.1f}% "
                  f"{100 * bv['within20']:6.1f}%", flush=True)
        tw = res["twins"]
        if tw["rows"]:
            print(f"{'':16s} twins: {tw['rows']} rows share an executed graph with others ({tw['graphs']} graphs): "
                  f"{100 * tw['twin_within20']:.1f}% within +-20% of their twins' median, the model "
                  f"{100 * tw['model_within20']:.1f}%; {100 * tw['slow_share']:.1f}% over 1.3x their graph's fastest")
        if args.write_profiles and key in PROFILES:
            name = PROFILES[key]
            fitted = calibrate(get_target(name), rows, name=name,
                               source=f"{DEVICES[key][0]} ({DEVICES[key][1]}), {len(rows)} rows")
            fitted = fitted.replace(calibration={**fitted.calibration, "cv_5fold": res})
            path = ROOT / "hw_models" / "targets" / f"{name}.yaml"
            save_target(fitted, path)
            print(f"  wrote {path.relative_to(ROOT)}")
    if args.host:
        h = host_check(write_profile=args.write_profiles)
        results["host"] = h
        for r in h["rows"]:
            print(f"host {r['model']:20s} measured {r['measured_ms']:8.2f} ms  predicted {r['predicted_ms']:8.2f} ms"
                  f"  APE {100 * r['ape']:5.1f}%")
        print(f"host: {h['within20']}/{h['n']} within +-20%")
    if args.stm32:
        st = results["stm32"] = stm32_check(args.data)
        print(f"stm32 arm-m7: efficiency factor {st['factor']} (median CMSIS-NN {st['median_mac_per_cycle']:.3f} "
              f"MAC/cycle over {st['cmsis_rows']} rows) -> {st['efficiency']}")
        m = st["mbv2_measured"]
        print(f"stm32 mbv2-w0.3-r64 (held out): predicted {st['mbv2_predicted_ms']} ms (shipped profile "
              f"{st['mbv2_shipped_ms']} ms), measured CMSIS-NN {m['cmsis_nn']['latency_ms']} ms; peak memory "
              f"{st['mbv2_peak_kB']} kB vs " + ", ".join(f"{k} {v['peak_sram_kB']} kB" for k, v in m.items()))
    print(f"done in {time.time() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
