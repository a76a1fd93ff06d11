"""NAS-Bench-201 networks (Dong & Yang, ICLR 2020), built plainly, as NAS-Bench-201's own code writes them.

Used to calibrate the shipped ``arm-a72``/``arm-a76``/``eyeriss`` profiles on published
measurements and by ``benchmarks/hw_fidelity.py``; measurement CSVs given to
:func:`hw_models.cli_calibrate` may name a model ``nb201:<arch_str>``.

- Input 3x32x32, batch 1. Stem: Conv3x3(3->16, no bias) + BN.
- Three stages of 5 cells (C = 16, 32, 64); between stages a residual reduction block:
  ReLU-Conv3x3(s2)-BN, ReLU-Conv3x3-BN, shortcut AvgPool2x2(s2) -> Conv1x1 (no BN/bias).
- A cell has 4 nodes; node j = ``sum(op(i->j)(node i) for i < j)`` (edges 0->1, 0->2, 1->2,
  0->3, 1->3, 2->3); the cell output is node 3. ``nor_conv_kxk`` = ReLU-Conv(no bias)-BN,
  ``avg_pool_3x3`` (count_include_pad=False), ``skip_connect`` = identity, ``none`` =
  ``x.mul(0.)`` (NAS-Bench-201's ``Zero`` op): every edge is built and traced.
- Head: BN + ReLU, global average pool, Linear(64 -> classes).

What a runtime executes of such a network (a ``none`` edge is a constant zero, ops whose
result only it reads are dead code, ops on zeros fold away) is no business of this module:
the cost model's graph rewrites (:mod:`hw_models.graph`, rules in each target file) do it on
any traced model. HW-NAS-Bench-360's Raspberry Pi 5 / Pixel rows are one measurement per
isomorphism class (:func:`unique_str`, :func:`measured_representatives`).

Example:
    >>> t = nb201_table("|nor_conv_3x3~0|+|none~0|none~1|+|skip_connect~0|none~1|none~2|")
    >>> sum(1 for l in t if l.kind == "conv2d")  # the stem, 15 cells' conv, 2 x 3 reduction convs
    22
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
from torch import nn

from .trace import trace

OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
EDGES = ((0, 1), (0, 2), (1, 2), (0, 3), (1, 3), (2, 3))


def parse_arch(arch: str | Sequence[str] | Sequence[int]) -> tuple[str, ...]:
    """The six edge ops of an ``arch_str`` (or of op names / op indices 0-4), in :data:`EDGES` order."""
    if isinstance(arch, str):
        ops = []
        for node in arch.strip("|").split("|+|"):
            for tok in node.strip("|").split("|"):
                name, _, src = tok.partition("~")
                ops.append((name, int(src)))
        if len(ops) != 6:
            raise ValueError(f"`an arch_str has 6 edges` must hold, but got {len(ops)} in {arch!r}")
        return tuple(o for o, _ in ops)
    out = tuple(OPS[a] if isinstance(a, int) else str(a) for a in arch)
    if len(out) != 6 or any(o not in OPS for o in out):
        raise ValueError(f"`6 ops from {OPS}` must hold, but got {arch!r}")
    return out


def unique_str(arch: str | Sequence) -> str:
    """NAS-Bench-201's isomorphism key of a cell (``Structure.to_unique_str(consider_zero=True)``).

    Node 0 is ``"0"``; every other node is the sorted ``+``-join of its incoming terms, where a
    ``none`` edge or an edge from a zero node (``"#"``) gives ``"#"``, ``skip_connect`` passes
    the source's string and any other op gives ``"(src)@op"``. The key of the cell is node 3's
    string. NB-201's 15,625 cells fall into 6,466 keys. As in NB-201's own code, a node made
    of several zero terms (``"#+#"``) is not itself treated as zero.

    HW-NAS-Bench-360 (the Raspberry Pi 5 / Pixel rows of the shared data) measured one network
    per key, the one with the lowest ``arch_idx``, and gives every architecture of the key that
    measurement (see :func:`measured_representatives`).

    Example:
        >>> a = "|none~0|+|none~0|skip_connect~1|+|avg_pool_3x3~0|skip_connect~1|nor_conv_3x3~2|"
        >>> b = "|none~0|+|none~0|skip_connect~1|+|avg_pool_3x3~0|nor_conv_1x1~1|nor_conv_3x3~2|"
        >>> unique_str(a) == unique_str(b), unique_str(a)
        (True, '#+(#+#)@nor_conv_3x3+(0)@avg_pool_3x3')
    """
    ops = parse_arch(arch)
    nodes = ["0", "", "", ""]
    for j in (1, 2, 3):
        terms = []
        for e, (i, jj) in enumerate(EDGES):
            if jj != j:
                continue
            if ops[e] == "none" or nodes[i] == "#":
                terms.append("#")
            elif ops[e] == "skip_connect":
                terms.append(nodes[i])
            else:
                terms.append(f"({nodes[i]})@{ops[e]}")
        nodes[j] = "+".join(sorted(terms))
    return nodes[3]


def measured_representatives(archs: Mapping[int, str]) -> dict[int, int]:
    """``arch_idx -> arch_idx`` of the network actually measured for it in HW-NAS-Bench-360:
    the lowest index with the same :func:`unique_str` (all ``arch_idx`` of NB-201 must be given).

    Example:
        >>> measured_representatives({0: "|none~0|+|none~0|none~1|+|skip_connect~0|none~1|none~2|",
        ...                           5: "|skip_connect~0|+|none~0|none~1|+|skip_connect~0|none~1|none~2|"})
        {0: 0, 5: 0}
    """
    key = {idx: unique_str(a) for idx, a in archs.items()}
    first: dict[str, int] = {}
    for idx in sorted(key):
        first.setdefault(key[idx], idx)
    return {idx: first[k] for idx, k in key.items()}


def is_connected(ops: Sequence[str]) -> bool:
    """Whether the cell output depends on its input through non-``none`` edges (otherwise the
    converters fold the whole network away: the < 0.1 ms rows of the shared data)."""
    has_value = [True, False, False, False]
    for e, (i, j) in enumerate(EDGES):
        if ops[e] != "none" and has_value[i]:
            has_value[j] = True
    return has_value[3]


class Zero(nn.Module):
    """NAS-Bench-201's ``none`` edge: ``x.mul(0.)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul(0.0)


def _op(name: str, c: int) -> nn.Module:
    if name == "nor_conv_3x3":
        return nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))
    if name == "nor_conv_1x1":
        return nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 1, 1, 0, bias=False), nn.BatchNorm2d(c))
    if name == "avg_pool_3x3":
        return nn.AvgPool2d(3, 1, 1, count_include_pad=False)
    if name == "none":
        return Zero()
    return nn.Identity()  # skip_connect


class Cell(nn.Module):
    """One NB201 cell, every edge built (NAS-Bench-201's ``InferCell``)."""

    def __init__(self, c: int, ops: Sequence[str]) -> None:
        super().__init__()
        self.edges = nn.ModuleList(_op(o, c) for o in ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nodes = [x]
        for j in (1, 2, 3):
            nodes.append(sum(self.edges[e](nodes[i]) for e, (i, jj) in enumerate(EDGES) if jj == j))
        return nodes[3]


class Reduction(nn.Module):
    """The residual reduction block between stages."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.ReLU(), nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout))
        self.b = nn.Sequential(nn.ReLU(), nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.shortcut = nn.Sequential(nn.AvgPool2d(2, 2), nn.Conv2d(cin, cout, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) + self.shortcut(x)


class NB201(nn.Module):
    """A NAS-Bench-201 network (see the module docstring)."""

    def __init__(self, arch: str | Sequence, num_classes: int = 10, *, cells: int = 5, width: int = 16,
                 in_channels: int = 3) -> None:
        super().__init__()
        ops = parse_arch(arch)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width))
        layers: list[nn.Module] = []
        c = width
        for s in range(3):
            if s > 0:
                layers.append(Reduction(c, 2 * c))
                c *= 2
            layers += [Cell(c, ops) for _ in range(cells)]
        self.cells = nn.Sequential(*layers)
        self.lastact = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lastact(self.cells(self.stem(x)))
        return self.classifier(torch.flatten(self.pool(x), 1))


def build_nb201(arch: str | Sequence, num_classes: int = 10) -> NB201:
    """Build a NAS-Bench-201 network (untrained), every edge as NAS-Bench-201's code builds it."""
    return NB201(arch, num_classes)


_TABLE_CACHE: dict[tuple, object] = {}


def nb201_table(arch: str | Sequence, num_classes: int = 10, *, input_hw: int = 32):
    """The traced :class:`~hw_models.trace.LayerTable` of a NAS-Bench-201 network (cached per arch)."""
    key = (parse_arch(arch), num_classes, input_hw)
    t = _TABLE_CACHE.get(key)
    if t is None:
        t = trace(build_nb201(key[0], num_classes), (3, input_hw, input_hw), groups=False)
        _TABLE_CACHE[key] = t
    return t
