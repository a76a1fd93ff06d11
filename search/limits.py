"""The hardware side of a search: the target, what it can run, and the limits a policy must meet.

A policy's cost (``hw_models`` estimate) is checked against the size budget, the target's
SRAM (microcontrollers: the live activations must fit), and the optional latency and energy
limits. Each limit is a *relative violation*, ``cost / limit - 1`` (``<= 0``: met), Optuna's
constraint convention, so the sampler learns how far over a rejected policy was.

Example:
    >>> from types import SimpleNamespace
    >>> cost = SimpleNamespace(size_bytes=3_000_000, latency_ms=5.0, energy_mj=1.0, peak_memory_bytes=0)
    >>> named_constraints(cost, SearchConfig(budget="2MB", max_latency_ms=10), sram=None)
    {'size': 0.5, 'latency': -0.5}
"""

from __future__ import annotations

from typing import Any

from .. import hw_models
from .config import SearchConfig
from .errors import UserError


def resolve_target(name: str) -> Any:
    """The target named ``name`` (an alias or a ``.yaml`` path); a one-line error if unknown."""
    try:
        return hw_models.get_target(name)
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise UserError(str(e).strip("'\"")) from None


def target_bits(target: Any) -> tuple[tuple[int | None, ...], tuple[int | None, ...]]:
    """Weight and activation widths worth searching on ``target`` (what it can run)."""
    storage = set(getattr(target, "storage_bits", (4, 8, 32)))
    compute = set(getattr(target, "compute_bits", (8, 32)))
    wbits: list[int | None] = [b for b in (2, 4, 8) if b in storage]
    if 16 in storage and 16 in compute and not wbits:
        wbits.append(16)
    if 32 in storage or not wbits:
        wbits.append(None)
    abits: list[int | None] = [b for b in (4, 8) if b in compute]
    if 32 in compute or not abits:
        abits.append(None)
    return tuple(wbits), tuple(abits)


def target_sram(target: Any) -> int | None:
    """On-chip SRAM that must hold the live activations (MCU-class targets), else ``None``."""
    cap = getattr(target, "capacity", {}) or {}
    return cap.get("sram_contiguous_bytes") or cap.get("sram_bytes")


def limits_of(cfg: SearchConfig, sram: int | None) -> dict[str, tuple[str, float]]:
    """Each limit a policy must meet: name -> (cost figure, limit), in the order Optuna stores them:
    size, then peak memory (if the target has an SRAM), latency, energy (if limited)."""
    out: dict[str, tuple[str, float]] = {"size": ("size_bytes", cfg.budget_bytes)}
    if sram:
        out["peak_memory"] = ("peak_memory_bytes", sram)
    if cfg.max_latency_ms:
        out["latency"] = ("latency_ms", cfg.max_latency_ms)
    if cfg.max_energy_mj:
        out["energy"] = ("energy_mj", cfg.max_energy_mj)
    return out


def named_constraints(cost: Any, cfg: SearchConfig, sram: int | None) -> dict[str, float]:
    """Relative violation of each limit of :func:`limits_of` (``<= 0`` = met)."""
    return {name: getattr(cost, key) / limit - 1.0 for name, (key, limit) in limits_of(cfg, sram).items()}


def constraints_of(cost: Any, cfg: SearchConfig, sram: int | None) -> list[float]:
    """:func:`named_constraints` as a list, in its order (what Optuna stores)."""
    return list(named_constraints(cost, cfg, sram).values())


def total_violation(cost: Any, cfg: SearchConfig, sram: int | None) -> float:
    """The summed relative violations of the limits ``cost`` breaks (0: it meets them all)."""
    return sum(max(0.0, c) for c in constraints_of(cost, cfg, sram))


def constraint_values(constraints: dict[str, float] | list[float] | None) -> list[float]:
    """The violations of a trial's ``constraints`` (by name; a list in version-1 runs)."""
    if isinstance(constraints, dict):
        return list(constraints.values())
    return list(constraints or [])


def is_feasible(constraints: dict[str, float] | list[float] | None) -> bool:
    """Every limit met (no constraints recorded counts as met)."""
    return max(constraint_values(constraints) or [0.0]) <= 0


def cost_dict(cost: Any) -> dict[str, float]:
    """The cost figures a trial records (units in the names)."""
    return {"size_bytes": int(cost.size_bytes), "latency_ms": float(cost.latency_ms),
            "energy_mj": float(cost.energy_mj), "peak_memory_bytes": int(cost.peak_memory_bytes),
            "macs": int(cost.macs)}
