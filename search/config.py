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

import yaml

from ..compressors.registry import did_you_mean
from ..evaluators.images import NORMALIZE
from .budget import parse_positive, parse_size

#: CLI spellings of config fields (``--tolerance`` is ``tolerance_pp``, ...), accepted by
#: :meth:`SearchConfig.from_dict` and the Python API.
ALIASES = {"tolerance": "tolerance_pp", "sensitivity_threshold": "sensitivity_threshold_pp",
           "finalist_margin": "finalist_margin_pp"}


@dataclass(frozen=True)
class SearchConfig:
    model: str = "mobilenet_v2"
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    checkpoint: str | None = None
    # Pretrained weights for a torchvision --model (a local state-dict file, or DEFAULT:
    # torchvision's own download), loaded before the head is fitted to the data's classes.
    weights: str | None = None
    # Image folders: the side in pixels (224 unless given), loader processes (None: 2 for a
    # streamed image folder, 0 for a Dataset passed from Python), and the input normalisation
    # (auto: imagenet with --weights, else the dataset's own mean and std).
    image_size: int | None = None
    loader_workers: int | None = None
    normalize: str = "auto"
    target: str = "arm"
    budget: str = "2MB"
    max_latency_ms: float | None = None
    max_energy_mj: float | None = None
    trials: int = 10
    timeout: float | None = None          # seconds of search (the final fine-tune is extra)
    run: str | None = None
    seed: int = 0
    storage: str | None = None
    sampler: str = "tpe"
    backend: str = "optuna"
    # Work per stage (defaults keep the main job near 15 min on 2 CPU cores).
    base_epochs: float = 1.5
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
    # Structured pruning ratios a channel group may take (the same for every group and for
    # the grid of uniform policies); 0 (no pruning) is always one of them.
    prune_choices: str = "0,0.25,0.5,0.75"
    distill: bool = True
    threads: int | None = None
    # Multi-fidelity: validation accuracy at these fine-tune steps ("20,40"); a trial below
    # the best 1/prune_eta of those at least as fast (on the target) that reached a rung stops
    # there (asynchronous successive halving per latency class: a faster, less accurate trial
    # is not judged against slower ones).
    rungs: str | None = None
    prune_eta: int = 3
    rung_min_trials: int = 3
    rung_val_size: int = 1000
    rung_latency_class: bool = True   # False: plain successive halving over all trials at a rung
    # The chosen trial: the fastest feasible one whose validation accuracy is within this many
    # points of the base model's (of the best feasible trial's, if lower; 0 = no loss allowed).
    tolerance_pp: float = 0.5
    # Finalists (search/finalists.py): the chosen trial and up to finalists - 1 faster ones of the
    # front within finalist_margin_pp of the best short score are fine-tuned for finalist_epochs
    # (None: final_epochs, and the chosen finalist's model is the final model) and the rule above
    # is applied to those scores (finalists = 1: the short scores decide).
    finalists: int = 3
    finalist_epochs: float | None = None
    finalist_margin_pp: float = 5.0
    # Sensitivity first: per-layer probes narrow the space (drop choices losing > threshold).
    sensitivity: bool = True
    sensitivity_threshold_pp: float = 10.0
    # Each probe re-estimates BatchNorm statistics on this many training images first (one
    # batch; adaptive BN; 0 = measure with the base model's statistics).
    sensitivity_bn_images: int = 512
    # Latency seeds: from the sensitivity-guided seed, cut latency (least loss per ms) to these
    # fractions of its latency, one seed each ("none": no latency seeds).
    latency_seeds: str | None = "0.75,0.6,0.45"
    # Distributed: --backend ray with this many workers (one trial each) on --address.
    workers: int = 1
    address: str | None = None

    def __post_init__(self) -> None:
        parse_size(self.budget, "budget")  # raises ValueError with a clear message
        _check_whole(self, "trials", 1)
        for name in ("max_latency_ms", "max_energy_mj", "timeout"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, parse_positive(v, name.replace("_", "-")))
        for name in ("base_epochs", "final_epochs", "finalist_epochs", "finalist_margin_pp"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"`{name} >= 0` must hold, but got {name}={getattr(self, name)}")
        _check_whole(self, "finalists", 1)
        if self.trial_steps < 1:
            raise ValueError(f"`trial_steps >= 1` must hold, but got trial_steps={self.trial_steps}")
        if self.rungs is not None:
            object.__setattr__(self, "rungs", _parse_rungs(self.rungs, self.trial_steps))
        if not isinstance(self.tolerance_pp, (int, float)) or not 0 <= self.tolerance_pp <= 100:
            raise ValueError(f"`0 <= tolerance <= 100` (accuracy points) must hold, but got {self.tolerance_pp!r}")
        if self.latency_seeds is not None:
            object.__setattr__(self, "latency_seeds", _parse_fractions(self.latency_seeds))
        object.__setattr__(self, "prune_choices", _parse_prune_choices(self.prune_choices))
        _check_whole(self, "sensitivity_bn_images", 0)
        if self.prune_eta < 2:
            raise ValueError(f"`prune_eta >= 2` must hold, but got prune_eta={self.prune_eta}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"`workers >= 1` must hold, but got workers={self.workers!r}")
        if self.backend not in ("optuna", "ray"):
            raise ValueError(did_you_mean(self.backend, ["optuna", "ray"], "backend"))
        self._check_data_options()

    def _check_data_options(self) -> None:
        for name, low in (("image_size", 8), ("loader_workers", 0), ("batch_size", 1)):
            v = getattr(self, name)
            if (v is not None or name == "batch_size") and (not isinstance(v, int) or isinstance(v, bool) or v < low):
                raise ValueError(f"`{name} >= {low}` must hold, but got {name}={v!r}")
        if self.normalize not in ("auto", *NORMALIZE):
            raise ValueError(did_you_mean(str(self.normalize), ["auto", *NORMALIZE], "normalization"))
        if self.weights and self.checkpoint:
            raise ValueError("give --weights (pretrained weights to train the base from) or --checkpoint (the trained "
                             "base model), not both")

    def workers_for(self, streamed_folder: bool) -> int:
        """Loader processes: ``loader_workers``, else 2 for a streamed image folder and 0 otherwise
        (a small in-memory Dataset is faster read in this process)."""
        if self.loader_workers is not None:
            return self.loader_workers
        return 2 if streamed_folder else 0

    @property
    def normalization(self) -> str:
        """``normalize`` with ``auto`` resolved: ``imagenet`` for pretrained ``weights``, else ``dataset``."""
        if self.normalize != "auto":
            return self.normalize
        return "imagenet" if self.weights else "dataset"

    @property
    def finalist_fine_tune_epochs(self) -> float:
        return finalist_fine_tune_epochs(self.finalist_epochs, self.final_epochs)

    @property
    def rung_steps(self) -> tuple[int, ...]:
        """Fine-tune steps at which a trial reports validation accuracy (may stop there)."""
        return tuple(int(s) for s in self.rungs.split(",")) if self.rungs else ()

    @property
    def prune_ratio_choices(self) -> tuple[float, ...]:
        """``prune_choices`` as numbers, ascending (0 first)."""
        return tuple(float(c) for c in self.prune_choices.split(","))

    @property
    def latency_seed_fractions(self) -> tuple[float, ...]:
        """``latency_seeds`` as numbers, largest first (empty: no latency seeds)."""
        return tuple(float(f) for f in self.latency_seeds.split(",")) if self.latency_seeds else ()

    @property
    def budget_bytes(self) -> int:
        return parse_size(self.budget)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SearchConfig":
        names = {f.name for f in fields(cls)}
        norm = {ALIASES.get(k, k): v for k, v in ((str(k).replace("-", "_"), v) for k, v in d.items())}
        unknown = set(norm) - names
        if unknown:
            raise ValueError(f"unknown config key(s) {sorted(unknown)}; known: {sorted(names)}")
        return cls(**norm)

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SearchConfig":
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


def finalist_fine_tune_epochs(finalist_epochs: float | None, final_epochs: float) -> float:
    """Epochs of each finalist's fine-tune (the final fine-tune's unless set); also for a run's
    ``config.yaml`` read as a mapping (the report)."""
    return final_epochs if finalist_epochs is None else finalist_epochs


def _check_whole(cfg: "SearchConfig", name: str, minimum: int) -> None:
    v = getattr(cfg, name)
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
        raise ValueError(f"`{name} >= {minimum}` must hold, but got {name}={v!r}")


def _numbers(text: Any, kind: type, malformed: str) -> list:
    """``"a,b"`` or a list -> numbers of ``kind``; ``ValueError(malformed)`` if one is not."""
    parts = [str(p) for p in text] if isinstance(text, (list, tuple)) else \
        [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        return [kind(p) for p in parts]
    except ValueError:
        raise ValueError(malformed) from None


def _parse_rungs(text: Any, trial_steps: int) -> str | None:
    """``"20,40"`` (or a list) -> canonical ``"20,40"``: increasing steps in ``[1, trial_steps)``."""
    steps = _numbers(text, int, f"malformed rungs {text!r}; expected increasing fine-tune steps such as 20,40")
    if not steps:
        return None
    if any(b <= a for a, b in zip(steps, steps[1:])) or steps[0] < 1 or steps[-1] >= trial_steps:
        raise ValueError(f"`0 < rung steps increasing < trial_steps={trial_steps}` must hold, but got rungs={text!r}")
    return ",".join(str(s) for s in steps)


def _parse_prune_choices(text: Any) -> str:
    """``"0,0.25,0.5"`` (or a list) -> canonical ``"0,0.25,0.5"``: ratios in [0, 1), ascending,
    0 added if missing (a group can always stay whole)."""
    vals = _numbers(text, float, f"malformed prune choices {text!r}; expected ratios such as 0,0.25,0.5,0.75")
    if any(not 0 <= v < 1 for v in vals):
        raise ValueError(f"`0 <= prune choice < 1` must hold, but got prune_choices={text!r}")
    return ",".join(f"{v:g}" for v in sorted(set(vals) | {0.0}))


def _parse_fractions(text: Any) -> str | None:
    """``"0.75,0.6"`` (or a list) -> canonical ``"0.75,0.6"``: fractions in (0, 1), largest first."""
    if str(text).strip().lower() in ("none", "off"):
        return None
    vals = _numbers(text, float, f"malformed latency seeds {text!r}; expected fractions such as 0.75,0.6")
    if not vals:
        return None
    if any(not 0 < v < 1 for v in vals):
        raise ValueError(f"`0 < latency seed fraction < 1` must hold, but got latency_seeds={text!r}")
    return ",".join(f"{v:g}" for v in sorted(set(vals), reverse=True))


def worker_id() -> str:
    """``host:pid`` of this process (recorded with every trial)."""
    return f"{socket.gethostname()}:{os.getpid()}"
