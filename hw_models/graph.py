"""The graph a runtime executes: the rewrites deployment converters do, on any traced table.

A traced :class:`~hw_models.trace.LayerTable` is the graph as the model's code writes it. A
runtime first rewrites it (LiteRT's converter, ONNX Runtime's graph optimiser, XNNPACK's
partitioner), and the cost model must price what is left. The rewrites a target's runtime does
are data (the ``runtime.graph`` rules of its file, :class:`~hw_models.targets.GraphRules`):

- ``zero_multiply``: ``x * 0`` (and ``zeros_like(x)``) is a constant zero, whatever ``x``
  holds; ``x + 0`` drops the zero term; ``x + 0``, ``x * 1`` are ``x`` (algebraic
  simplification). A product with a zero tensor is zero.
- ``constant_folding``: an op whose inputs are all constants is evaluated once, at conversion
  or load time: it costs nothing per inference.
- ``dead_code``: an op whose result reaches no output is removed.

The result is another table (the rows the runtime runs, inputs renamed past the removed ones),
cached on the table per rule set, so pricing it again costs a dictionary look-up.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from squeezer.hw_models.targets import GraphRules
    >>> from squeezer.hw_models.trace import trace
    >>> class Cell(nn.Module):              # a NAS-Bench-201-style cell with a "none" edge
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
    ...     def forward(self, x):
    ...         return self.b(x) + self.a(x).mul(0.0)
    >>> t = trace(Cell(), (4, 8, 8), groups=False)
    >>> [l.name for l in runtime_graph(t, GraphRules()) if l.macs]       # conv "a" is dead code
    ['b']
    >>> sorted(l.name for l in runtime_graph(t, GraphRules.none()) if l.macs)  # PyTorch eager runs both
    ['a', 'b']
"""

from __future__ import annotations

from dataclasses import replace
from typing import Mapping

from .targets import GraphRules
from .trace import COMPRESSIBLE, LayerSpec, LayerTable

LIVE, ZERO, CONST = "live", "zero", "const"

#: Kinds whose output is zero when every input is zero (no bias added, no offset).
_ZERO_PRESERVING = ("pool", "gap", "flatten", "concat", "add", "mul")
#: Activations with f(0) = 0.
_ZERO_AT_ZERO = {"ReLU", "ReLU6", "LeakyReLU", "PReLU", "Hardtanh", "Hardswish", "Tanh", "SiLU", "GELU", "Mish",
                 "ELU", "SELU", "CELU", "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "silu", "hardswish",
                 "tanh", "gelu", "leaky_relu", "elu", "mish", "neg"}


def runtime_graph(table: LayerTable, rules: GraphRules) -> LayerTable:
    """The table of the ops a runtime with ``rules`` executes (see the module docstring)."""
    if not rules.rewrites:
        return table
    cache: dict = table.__dict__.setdefault("_runtime_graphs", {})
    out = cache.get(rules)
    if out is None:
        out = cache[rules] = _rewrite(table, rules)
    return out


def _rewrite(table: LayerTable, rules: GraphRules) -> LayerTable:
    state: dict[str, str] = {"input": LIVE}
    rename: dict[str, str] = {}
    kept: list[LayerSpec] = []
    for l in table:
        ins = tuple(dict.fromkeys(rename.get(i, i) for i in l.inputs))
        state[l.name], row, alias = _fold(l, ins, state, rules)
        if alias is not None:
            rename[l.name] = alias
        elif row is not None:
            kept.append(row)
    outputs = tuple(dict.fromkeys(rename.get(o, o) for o in table.outputs))
    if rules.dead_code:
        kept = _reachable(kept, outputs)
    return LayerTable(layers=tuple(kept), input_shape=table.input_shape, outputs=outputs,
                      group_members=table.group_members, group_sizes=table.group_sizes, method=table.method)


def _fold(l: LayerSpec, ins: tuple[str, ...], state: Mapping[str, str],
          rules: GraphRules) -> tuple[str, LayerSpec | None, str | None]:
    """(state of ``l``'s output, the row the runtime runs or ``None``, the tensor ``l`` is an
    alias of or ``None``)."""
    if rules.zero_multiply:
        zeros = [i for i in ins if state.get(i, LIVE) == ZERO]
        if l.makes_zero or (l.kind == "mul" and zeros):
            return ZERO, None, None
        if l.is_identity and ins:
            return state.get(ins[0], LIVE), None, ins[0]
        if l.kind == "add" and zeros:
            ins = tuple(i for i in ins if i not in zeros)
            if not ins:
                return ZERO, None, None
            if len(ins) == 1:
                return state.get(ins[0], LIVE), None, ins[0]  # x + 0: x itself
    live = tuple(i for i in ins if state.get(i, LIVE) == LIVE)
    if ins and not live and rules.constant_folding:
        zero = all(state.get(i) == ZERO for i in ins) and _keeps_zero(l)
        return (ZERO if zero else CONST), None, None
    if not rules.constant_folding:
        live = ins  # constants are tensors the op reads at run time
    return LIVE, (l if live == l.inputs else replace(l, inputs=live)), None


def _keeps_zero(l: LayerSpec) -> bool:
    if l.kind in COMPRESSIBLE:
        return not l.bias
    if l.kind == "act":
        return l.module_type in _ZERO_AT_ZERO
    return l.kind in _ZERO_PRESERVING


def _reachable(rows: list[LayerSpec], outputs: tuple[str, ...]) -> list[LayerSpec]:
    """``rows`` whose result some output depends on."""
    need = set(outputs)
    keep = []
    for l in reversed(rows):
        if l.name in need:
            keep.append(l)
            need.update(l.inputs)
    return keep[::-1]
