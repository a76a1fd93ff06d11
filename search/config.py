"""Search configuration: one frozen dataclass, read from CLI flags and/or a YAML file.

Example:
    >>> c = SearchConfig(budget="2MiB")
    >>> c.budget_bytes
    2097152
"""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

from .budget import parse_positive, parse_size


@dataclass(frozen=True)
class SearchConfig:
    model: str = "mobilenet_v2"
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    checkpoint: str | None = None
    target: str = "arm"
    budget: str = "2MB"
    max_latency_ms: float | None = None
    max_energy_mj: float | None = None
    trials: int = 12
    timeout: float | None = None          # seconds of search (the final fine-tune is extra)
    run: str | None = None
    seed: int = 0
    storage: str | None = None
    sampler: str = "tpe"
    backend: str = "optuna"
    # Work per stage (defaults keep the main job near 15 min on 2 CPU cores).
    base_epochs: float = 2.0
    base_lr: float = 0.1
    trial_steps: int = 60
    trial_train_size: int = 12000
    trial_lr: float = 0.01
    val_size: int = 5000
    final_epochs: float = 1.0
    final_lr: float = 0.01
    batch_size: int = 128
    criterion: str = "l1"
    quantizer: str = "uniform"
    distill: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        parse_size(self.budget)  # raises ValueError with a clear message
        if not isinstance(self.trials, int) or isinstance(self.trials, bool) or self.trials < 1:
            raise ValueError(f"`trials >= 1` must hold, but got trials={self.trials!r}")
        for name in ("max_latency_ms", "max_energy_mj", "timeout"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, parse_positive(v, name.replace("_", "-")))
        for name in ("base_epochs", "final_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name} >= 0` must hold, but got {name}={getattr(self, name)}")
        if self.trial_steps < 1:
            raise ValueError(f"`trial_steps >= 1` must hold, but got trial_steps={self.trial_steps}")

    @property
    def budget_bytes(self) -> int:
        return parse_size(self.budget)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SearchConfig":
        names = {f.name for f in fields(cls)}
        norm = {str(k).replace("-", "_"): v for k, v in d.items()}
        unknown = set(norm) - names
        if unknown:
            raise ValueError(f"unknown config key(s) {sorted(unknown)}; known: {sorted(names)}")
        return cls(**norm)

    def save(self, path: str | os.PathLike) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SearchConfig":
        import yaml

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            d = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"cannot parse config file {p}: {str(e).splitlines()[0]}") from None
        if not isinstance(d, dict):
            raise ValueError(f"config file {p} must hold a mapping of option: value")
        return cls.from_dict(d)

    def with_(self, **changes: Any) -> "SearchConfig":
        return replace(self, **changes)


def worker_id() -> str:
    """``host:pid`` of this process (recorded with every trial)."""
    return f"{socket.gethostname()}:{os.getpid()}"
