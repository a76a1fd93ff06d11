"""Parsing of human budgets: ``2MB`` = 2,000,000 bytes, ``2MiB`` = 2,097,152 bytes.

Example:
    >>> parse_size("2MB"), parse_size("2MiB"), parse_size("512kB"), parse_size("1.5 GiB")
    (2000000, 2097152, 512000, 1610612736)
"""

from __future__ import annotations

import math
import re

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9,
    "kib": 2**10, "mib": 2**20, "gib": 2**30,
}
_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int | float, what: str = "size") -> int:
    """Bytes in ``text`` (decimal kB/MB/GB, binary KiB/MiB/GiB, B or a plain number).

    ``what`` names the value in error messages (e.g. ``"budget"``).

    Raises:
        ValueError: malformed, unknown unit, or not positive.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = _RE.match(str(text))
        if not m:
            raise ValueError(f"malformed {what} {text!r}; expected a number with a unit such as 2MB, 500kB, 2MiB")
        value, unit = float(m.group(1)), m.group(2)
    key = unit.lower()
    if key not in _UNITS:
        raise ValueError(f"unknown {what} unit {unit!r} in {text!r}; use B, kB, MB, GB, KiB, MiB or GiB")
    # kB vs KB: both mean 1000 here; 'Kib'/'kib' both 1024. Case only matters for readability.
    n = value * _UNITS[key]
    if not math.isfinite(n) or n <= 0:
        raise ValueError(f"`{what} > 0` must hold, but got {text!r}")
    return int(round(n))


def parse_positive(text: str | float, what: str) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"malformed {what} {text!r}; expected a positive number") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"`{what} > 0` must hold, but got {what}={text!r}")
    return v


def format_bytes(n: float) -> str:
    """``1234567`` -> ``'1.23 MB'`` (decimal units, as budgets are given)."""
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= f:
            return f"{n / f:.2f} {unit}"
    return f"{int(n)} B"
