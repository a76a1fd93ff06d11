"""Micro-benchmark graphs for calibrating a runtime target by measurement (nn-Meter style).

A graph is a small CNN built from the blocks a search produces (conv3x3 / pointwise chains,
inverted residuals with depthwise convs, residual basic blocks, conv + max-pool stages; stem,
global pooling and a linear head) at a few widths and resolutions, under a policy that puts the
float <-> integer boundaries in different places: float, all int8, weight-only int8, int4
weights, alternating int8/float layers, an int8 first half, pruned (float, int8 weights, int8), low-rank factors
(float and int8). Each is exported the way ``squeezer export`` writes it (ONNX QDQ, BN and
normalisation folded, weights ONNX Runtime does not fuse dequantized at load) and timed in the
runtime; the rows fit the target (:func:`hw_models.calibrate`). The graphs are named by a spec,
``micro:<family>-c<channels>-r<resolution>-n<blocks>``, which :func:`build_micro` rebuilds, so
a measurements CSV from another device can be fitted here.

Example:
    >>> m = build_micro("micro:res-c16-r8-n2")
    >>> from squeezer.hw_models.trace import trace
    >>> t = trace(m, MICRO_INPUT[:1] + (8, 8))
    >>> len(t.compressible()), sum(l.kind == "add" for l in t)
    (6, 2)
"""

from __future__ import annotations

import csv
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from ..compressors.apply import apply_policy_
from ..compressors.policy import LayerPolicy, Policy
from ..evaluators.checkpoint import Loaded
from ..evaluators.export import deploy_model, export_onnx
from ..evaluators.formats import export_model
from . import kit_runner
from .trace import LayerTable, trace

#: Input channels and classes of every micro graph (Fashion-MNIST-like: one channel).
MICRO_INPUT = (1, 28, 28)
MICRO_CLASSES = 10
FAMILIES = ("chain3", "chain1", "res", "mbconv", "pool")
#: The default set: (family, channels, resolution, blocks).
DEFAULT_SPECS = (("chain3", 16, 28, 3), ("chain3", 48, 14, 3), ("chain3", 96, 7, 3),
                 ("chain1", 32, 28, 3), ("chain1", 128, 7, 3),
                 ("res", 16, 28, 2), ("res", 32, 14, 2), ("res", 64, 7, 2),
                 ("mbconv", 16, 28, 2), ("mbconv", 32, 14, 2), ("mbconv", 64, 7, 2),
                 ("pool", 32, 28, 2), ("pool", 64, 14, 2),
                 # deeper graphs: the per-node cost apart from the per-inference one (a network has tens of nodes)
                 ("res", 16, 28, 6), ("res", 32, 14, 6), ("chain3", 32, 14, 8), ("mbconv", 32, 14, 5),
                 ("chain1", 64, 14, 10),
                 # wide 1x1 chains on small maps: weights (1.6-12.6 MB fp32) stream from L3/DRAM at every
                 # inference, as in a network's last stages; small graphs keep theirs in L2
                 ("chain1", 256, 4, 6), ("chain1", 640, 2, 4), ("chain1", 1024, 4, 3),
                 # inverted residuals as wide as a mobile network's last stages at 28-32 px input
                 # (256-640-channel depthwise convs on 4x4 and 2x2 maps)
                 ("mbconv", 64, 4, 3), ("mbconv", 96, 2, 3), ("mbconv", 160, 2, 3))
_SPEC = re.compile(r"^micro:(?P<family>[a-z0-9]+)-c(?P<c>\d+)-r(?P<r>\d+)-n(?P<n>\d+)$")


def _cbr(cin: int, cout: int, k: int, groups: int = 1, act: type = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         act())


class _Residual(nn.Module):
    def __init__(self, body: nn.Module, act: bool) -> None:
        super().__init__()
        self.body, self.act = body, nn.ReLU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + x)


def _block(family: str, c: int) -> nn.Module:
    if family in ("chain3", "chain1"):
        return _cbr(c, c, 3 if family == "chain3" else 1)
    if family == "res":
        return _Residual(nn.Sequential(_cbr(c, c, 3), nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)),
                         act=True)
    if family == "mbconv":
        e = 4 * c
        return _Residual(nn.Sequential(_cbr(c, e, 1, act=nn.ReLU6), _cbr(e, e, 3, groups=e, act=nn.ReLU6),
                                       nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c)), act=False)
    return nn.Sequential(_cbr(c, c, 3), nn.MaxPool2d(2))  # pool


class Micro(nn.Module):
    """Stem conv3x3 + BN + ReLU, ``n`` blocks of ``family`` at ``c`` channels, global pool, linear."""

    def __init__(self, family: str, c: int, n: int, in_channels: int = MICRO_INPUT[0],
                 num_classes: int = MICRO_CLASSES) -> None:
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"`family in {FAMILIES}` must hold, but got family={family!r}")
        self.stem = _cbr(in_channels, c, 3)
        self.blocks = nn.Sequential(*(_block(family, c) for _ in range(n)))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def parse_spec(spec: str) -> tuple[str, int, int, int]:
    """``(family, channels, resolution, blocks)`` of ``micro:<family>-c<C>-r<R>-n<N>``."""
    m = _SPEC.match(spec)
    if m is None or m["family"] not in FAMILIES:
        raise ValueError(f"`a micro graph is named micro:<family>-c<C>-r<R>-n<N> with family in {FAMILIES}` "
                         f"must hold, but got {spec!r}")
    return m["family"], int(m["c"]), int(m["r"]), int(m["n"])


def build_micro(spec: str, in_channels: int = MICRO_INPUT[0], num_classes: int = MICRO_CLASSES) -> Micro:
    """The (untrained) micro graph named ``spec``."""
    family, c, _, n = parse_spec(spec)
    return Micro(family, c, n, in_channels, num_classes)


def spec_name(family: str, c: int, r: int, n: int) -> str:
    return f"micro:{family}-c{c}-r{r}-n{n}"


# --- the policies: where the float <-> integer boundaries fall --------------------------------

INT8 = LayerPolicy(weight_bits=8, act_bits=8)


def _every(lp: LayerPolicy) -> Callable[[list[str]], Policy]:
    return lambda layers: Policy(layers={"_default": lp})


def _alternating(layers: list[str]) -> Policy:
    return Policy(layers={n: INT8 if i % 2 == 0 else LayerPolicy() for i, n in enumerate(layers)})


def _first_half(layers: list[str]) -> Policy:
    half = len(layers) // 2
    return Policy(layers={n: INT8 if i < half else LayerPolicy() for i, n in enumerate(layers)})


#: Policy name -> policy for a graph's conv/linear layers (``None``: float).
POLICIES: dict[str, Callable[[list[str]], Policy] | None] = {
    "fp32": None,
    "w8a8": _every(INT8),
    "w8": _every(LayerPolicy(weight_bits=8)),
    "w4a8": _every(LayerPolicy(weight_bits=4, act_bits=8)),
    "alternating": _alternating,
    "first_half": _first_half,
    "pruned_w8a8": _every(LayerPolicy(prune_ratio=0.5, weight_bits=8, act_bits=8)),
    # pruned float graphs: odd widths (not multiples of the kernels' 8/16-channel blocks)
    "pruned_w8": _every(LayerPolicy(prune_ratio=0.5, weight_bits=8)),
    "pruned75": _every(LayerPolicy(prune_ratio=0.75)),
    "lowrank": _every(LayerPolicy(rank_ratio=0.5)),
    "lowrank_w8a8": _every(LayerPolicy(rank_ratio=0.5, weight_bits=8, act_bits=8)),
}


#: The policies that change what a whole-graph int8 flow runs (XNNPACK's PT2E quantizer makes every
#: layer int8 whatever its bits): structure only.
STRUCTURAL_POLICIES = ("fp32", "pruned_w8a8", "lowrank")


@dataclass(frozen=True)
class MicroGraph:
    """One calibration graph: a model spec at an input shape under a named policy."""

    spec: str
    policy_name: str
    policy: Policy | None
    input_shape: tuple[int, int, int]

    @property
    def file_stem(self) -> str:
        return f"{self.spec[len('micro:'):]}_{self.policy_name}"

    def table(self) -> LayerTable:
        return trace(build_micro(self.spec, self.input_shape[0]), self.input_shape)


def micro_set(specs: Sequence[tuple[str, int, int, int]] = DEFAULT_SPECS,
              policies: Sequence[str] | None = None) -> list[MicroGraph]:
    """Every spec under every policy (default: all of :data:`POLICIES`)."""
    names = list(POLICIES) if policies is None else list(policies)
    unknown = [p for p in names if p not in POLICIES]
    if unknown:
        raise ValueError(f"`policies in {list(POLICIES)}` must hold, but got {unknown}")
    out = []
    for family, c, r, n in specs:
        spec, shape = spec_name(family, c, r, n), (MICRO_INPUT[0], r, r)
        layers = trace(build_micro(spec), shape, groups=False).compressible()  # once per spec
        for p in names:
            make = POLICIES[p]
            out.append(MicroGraph(spec, p, None if make is None else make(layers), shape))
    return out


def export_policy(model: nn.Module, policy: Policy | None, input_shape: tuple[int, ...], path: str | Path, *,
                  seed: int = 0, fmt: str = "onnx") -> Path:
    """Write ``model`` (changed in place) under ``policy`` as ``squeezer export`` writes ``fmt``
    (``onnx``: the policy applied, activation ranges seen on a few random batches, BN and
    normalisation folded, QDQ; ``pte``: the ExecuTorch XNNPACK program). For timing: an untrained
    model runs as fast as a trained one."""
    torch.manual_seed(seed)
    if policy is not None:
        batches = [(torch.rand(32, *input_shape), torch.randint(0, 2, (32,))) for _ in range(2)]
        apply_policy_(model, policy, input_shape, data=batches)
        with torch.no_grad():  # activation quantizers see a few batches of inputs
            for x, _ in batches:
                model(x)
    c = input_shape[0]
    if fmt == "pte":
        norm = {"mean": [0.5] * c, "std": [0.25] * c}
        return export_model(Loaded(model.eval(), "micro", tuple(input_shape), MICRO_CLASSES, policy, norm), "pte",
                            path).path
    export_onnx(deploy_model(model.eval(), mean=(0.5,) * c, std=(0.25,) * c), path, input_shape)
    return Path(path)


def export_micro(g: MicroGraph, path: str | Path, seed: int = 0, fmt: str = "onnx") -> Path:
    """Write the micro graph ``g`` as ``squeezer export`` writes ``fmt`` (:func:`export_policy`)."""
    torch.manual_seed(seed)
    return export_policy(build_micro(g.spec, g.input_shape[0]), g.policy, g.input_shape, path, seed=seed, fmt=fmt)


def write_kit(kit_dir: str | Path, graphs: Sequence[MicroGraph] | None = None, *,
              runtime: str = "onnxruntime") -> Path:
    """A self-contained calibration kit in ``kit_dir``: ``graphs/*.onnx``, their policies,
    ``manifest.csv`` and ``run_kit.py`` (needs only Python, numpy and the runtime).

    Returns the manifest's path.
    """
    if runtime != "onnxruntime":
        raise ValueError(f"`runtime in ('onnxruntime',)` must hold for a kit, but got runtime={runtime!r}")
    kit = Path(kit_dir)
    (kit / "graphs").mkdir(parents=True, exist_ok=True)
    (kit / "policies").mkdir(exist_ok=True)
    rows = []
    for g in graphs if graphs is not None else micro_set():
        onnx_path = export_micro(g, kit / "graphs" / f"{g.file_stem}.onnx")
        pol = ""
        if g.policy is not None:
            pol = f"policies/{g.file_stem}.json"
            g.policy.save(kit / pol)
        rows.append({"file": str(onnx_path.relative_to(kit)), "model": g.spec,
                     "input_shape": "x".join(map(str, g.input_shape)), "num_classes": MICRO_CLASSES, "policy": pol})
    with (kit / "manifest.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=kit_runner.MANIFEST_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    shutil.copyfile(kit_runner.__file__, kit / "run_kit.py")
    return kit / "manifest.csv"
