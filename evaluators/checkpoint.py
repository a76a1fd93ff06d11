"""Saving and loading base and compressed models as plain tensors (``weights_only=True``).

A checkpoint is a dict of tensors and plain Python values::

    {"format": "squeezer.model/1", "model": "resnet20", "in_channels": 1, "num_classes": 10,
     "input_shape": [1, 28, 28], "policy": {...squeezer.policy/1...} or None,
     "normalization": {"mean": [...], "std": [...]}, "meta": {...}, "state_dict": {...}}

A compressed model is rebuilt by building the architecture, replaying the policy's
structure with :func:`compressors.apply.apply_policy_` (pruning, decomposition, masks and
quantizers: shapes depend only on the policy) and loading the state dict.

Example:
    >>> import tempfile, torch
    >>> from squeezer.evaluators.models import build_model
    >>> m = build_model("lenet5", in_channels=1, num_classes=10)
    >>> p = tempfile.mktemp(suffix=".pt")
    >>> _ = save_checkpoint(p, m, model_name="lenet5", input_shape=(1, 28, 28), num_classes=10)
    >>> m2 = load_checkpoint(p).model
    >>> torch.equal(m2.features[0].weight, m.features[0].weight)
    True
"""

from __future__ import annotations

import copy
import errno
import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..compressors.apply import apply_policy_
from ..compressors.policy import Policy
from .models import build_model

FORMAT = "squeezer.model/1"
#: Model names of this form (``object:ResNetLike``) stand for a model a user passed as an
#: object: the file holds its weights, the architecture must be passed again.
OBJECT_PREFIX = "object:"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or of an unknown format."""


@dataclass
class Loaded:
    model: nn.Module
    model_name: str
    input_shape: tuple[int, int, int]
    num_classes: int | None
    policy: Policy | None
    normalization: dict[str, list[float]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, model_name: str,
                    input_shape: Sequence[int], num_classes: int | None, policy: Policy | None = None,
                    normalization: dict[str, Sequence[float]] | None = None,
                    meta: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": FORMAT, "model": model_name, "in_channels": int(input_shape[0]),
            "num_classes": None if num_classes is None else int(num_classes), "input_shape": [int(s) for s in input_shape],
            "policy": None if policy is None else policy.to_dict(),
            "normalization": {k: [float(v) for v in vs] for k, vs in (normalization or {}).items()},
            "meta": dict(meta or {}),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    blob["weights_sha1"] = weights_sha1(blob["state_dict"])
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    try:
        torch.save(blob, tmp)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
        raise disk_error(e, path) from None
    os.replace(tmp, path)  # atomic: a kill never leaves half a checkpoint
    return path


def disk_error(e: Exception, path: Path) -> Exception:
    """``e`` as an ``OSError`` naming ``path`` when the disk is full (torch reports it as a
    ``RuntimeError``: "file write failed"), else ``e`` itself."""
    full = getattr(e, "errno", None) == errno.ENOSPC or "write failed" in str(e) or "No space left" in str(e)
    if full:
        return OSError(errno.ENOSPC, "No space left on device", str(path))
    return e


def weights_sha1(state_dict: dict[str, torch.Tensor]) -> str:
    """A fingerprint of a model's weights: a checkpoint carries it, and a file whose weights no
    longer match it is corrupt; a resumed run checks the model object passed again with it."""
    h = hashlib.sha1()
    for k, v in sorted(state_dict.items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _read(path: Path) -> Any:
    """``torch.load(weights_only=True)`` with one-line errors."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the error below says it all
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is one clear error
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "Weights only load failed" in why:
            why = "it holds Python objects, not only tensors (refused without running them: squeezer loads weights only)"
        raise CheckpointError(f"cannot read checkpoint {path}: {why}") from None


def load_checkpoint(path: str | os.PathLike, *, architecture: nn.Module | None = None) -> Loaded:
    """Rebuild the model a checkpoint holds: its architecture (by name, or a copy of
    ``architecture``: the uncompressed model object a run was made from), the policy replayed,
    the weights loaded."""
    path = Path(path)
    blob = _read(path)
    if not isinstance(blob, dict) or "state_dict" not in blob:
        # A bare state dict (e.g. torch.save(model.state_dict())) has no architecture name.
        raise CheckpointError(f"{path} is not a squeezer checkpoint (expected format {FORMAT!r});"
                              " save with squeezer or pass --model with a bare state dict")
    if blob.get("format") != FORMAT:
        raise CheckpointError(f"unsupported checkpoint format {blob.get('format')!r} in {path}; expected {FORMAT!r}")
    if blob.get("weights_sha1") and blob["weights_sha1"] != weights_sha1(blob["state_dict"]):
        raise CheckpointError(f"{path} is corrupt: its weights do not match their checksum")
    shape = tuple(blob["input_shape"])
    if architecture is not None:
        model = copy.deepcopy(architecture)
    elif str(blob["model"]).startswith(OBJECT_PREFIX):
        raise CheckpointError(f"{path} holds a model that was passed as a Python object ({blob['model']}); "
                              "pass that model again to rebuild it (architecture=...)")
    else:
        model = build_model(blob["model"], in_channels=blob["in_channels"], num_classes=blob["num_classes"])
    policy = Policy.from_dict(blob["policy"]) if blob.get("policy") else None
    if policy is not None:
        apply_policy_(model, policy, shape)
    missing, unexpected = model.load_state_dict(blob["state_dict"], strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match model {blob['model']!r} with its policy: "
                              f"missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}")
    model.eval()
    return Loaded(model, blob["model"], shape, blob["num_classes"], policy, blob.get("normalization", {}),
                  blob.get("meta", {}))


def load_state_dict_into(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a user checkpoint: a squeezer checkpoint or a bare ``state_dict`` for ``model``."""
    path = Path(path)
    blob = _read(path)
    sd = blob["state_dict"] if isinstance(blob, dict) and "state_dict" in blob else blob
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path} holds no state dict")
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {str(e).splitlines()[0]}") from None
