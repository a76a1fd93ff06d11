"""Model zoo: small-input CNNs, torchvision classifiers adapted to any input, user factories.

Names resolve in this order: ``torchvision:NAME``, the small-input zoo (``lenet5``,
``resnet20``, ``vgg_small``, ``mobilenet_v2``...), ``package.module:factory`` (the user's own),
then torchvision's classification models (``resnet18``, ``mobilenet_v3_small``...), whose stem
and classifier are adapted to ``in_channels`` and ``num_classes``; a torchvision model may start
from pretrained weights (a local file, or ``DEFAULT`` through torchvision's download).

Example:
    >>> m = build_model("resnet20", in_channels=1, num_classes=10)
    >>> sum(p.numel() for p in m.parameters()) > 200_000
    True
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..compressors.registry import Registry, did_you_mean

ZOO: Registry[Callable[..., nn.Module]] = Registry("model")
#: ``torchvision:mobilenet_v3_small`` names torchvision's model explicitly (a zoo name may shadow it).
TORCHVISION_PREFIX = "torchvision:"


# --- LeNet-5 -----------------------------------------------------------------------------
class LeNet5(nn.Module):
    """LeNet-5 (LeCun 1998) with ReLU and max-pooling, for 28x28 (or 32x32) inputs."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d((5, 5))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(inplace=True),
            nn.Linear(120, 84), nn.ReLU(inplace=True), nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


# --- ResNet-20 (He et al. 2016, CIFAR variant) -------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    def __init__(self, depth: int = 20, in_channels: int = 3, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"`(depth - 2) % 6 == 0` must hold, but got depth={depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (j == 0 and i > 0) else 1))
                cin = cout
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --- VGG-small (the CIFAR VGG used in quantization papers, LQ-Nets) ----------------------
class VGGSmall(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        cfg = [width, width, "M", 2 * width, 2 * width, "M", 4 * width, 4 * width, "M"]
        layers: list[nn.Module] = []
        cin = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(cin, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                cin = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


# --- MobileNetV2 for small inputs ---------------------------------------------------------
def _mobilenet_v2_small(in_channels: int, num_classes: int, width_mult: float = 1.0) -> nn.Module:
    """torchvision's MobileNetV2 for 28-32 px inputs: the 64-channel stage keeps stride 1.

    With ImageNet strides a 28x28 input shrinks to 1x1 before the last stages; keeping the
    64-channel stage at stride 1 leaves 2x2 there (better accuracy) at +50% MACs (~9M).
    """
    from torchvision.models import MobileNetV2

    # (expansion t, channels c, repeats n, stride s)
    setting = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 1],
               [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]
    m = MobileNetV2(num_classes=num_classes, width_mult=width_mult, inverted_residual_setting=setting)
    stem = m.features[0][0]
    m.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, 2, 1, bias=False)
    return m


ZOO.add("lenet5", lambda in_channels, num_classes: LeNet5(in_channels, num_classes), summary="LeNet-5, 61k params")
ZOO.add("resnet20", lambda in_channels, num_classes: ResNetCifar(20, in_channels, num_classes),
        summary="ResNet-20 (CIFAR), 0.27M params")
ZOO.add("resnet32", lambda in_channels, num_classes: ResNetCifar(32, in_channels, num_classes),
        summary="ResNet-32 (CIFAR), 0.46M params")
ZOO.add("resnet56", lambda in_channels, num_classes: ResNetCifar(56, in_channels, num_classes),
        summary="ResNet-56 (CIFAR), 0.85M params")
ZOO.add("vgg_small", lambda in_channels, num_classes: VGGSmall(in_channels, num_classes),
        summary="VGG-small (6 conv), 1.15M params")
ZOO.add("mobilenet_v2", lambda in_channels, num_classes: _mobilenet_v2_small(in_channels, num_classes),
        summary="MobileNetV2 (small-input strides), 2.2M params, 8.9 MB fp32")
ZOO.add("mobilenet_v2_050", lambda in_channels, num_classes: _mobilenet_v2_small(in_channels, num_classes, 0.5),
        summary="MobileNetV2 x0.5 with small-input strides")


def _torchvision_names() -> list[str]:
    from torchvision import models  # heavy (1.7 s): only torchvision names need it
    return list(models.list_models(module=models))


def _adapt_torchvision(m: nn.Module, in_channels: int, num_classes: int, *, keep_stem: bool = False) -> nn.Module:
    """Replace the first conv (input channels) and the last linear (classes) of a torchvision model.

    With ``keep_stem`` (pretrained weights) the new first conv starts from the old one's filters
    averaged over its input channels (exact for a grey image the old conv saw as R = G = B).
    """
    first = next((mod for mod in m.modules() if isinstance(mod, nn.Conv2d)), None)
    if first is not None and first.in_channels != in_channels:
        for name, mod in m.named_modules():
            if mod is first:
                parent = m.get_submodule(name.rpartition(".")[0]) if "." in name else m
                stem = nn.Conv2d(in_channels, first.out_channels, first.kernel_size, first.stride, first.padding,
                                 first.dilation, 1, first.bias is not None)
                if keep_stem:
                    with torch.no_grad():
                        stem.weight.copy_(first.weight.sum(1, keepdim=True).expand_as(stem.weight) / in_channels)
                        if first.bias is not None:
                            stem.bias.copy_(first.bias)
                setattr(parent, name.rpartition(".")[2], stem)
                break
    last_name, last = None, None
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Linear):
            last_name, last = name, mod
    if last is not None and last.out_features != num_classes:
        parent = m.get_submodule(last_name.rpartition(".")[0]) if "." in last_name else m
        setattr(parent, last_name.rpartition(".")[2], nn.Linear(last.in_features, num_classes, last.bias is not None))
    return m


def known_models() -> list[str]:
    return ZOO.names() + [n for n in _torchvision_names() if n not in ZOO]


def build_model(name: str, *, in_channels: int = 3, num_classes: int = 10, weights: str | None = None) -> nn.Module:
    """Build a model by name (zoo, ``pkg.mod:factory``, or torchvision: ``resnet18`` or
    ``torchvision:resnet18``), untrained unless ``weights`` are given for a torchvision model:
    a local state-dict file, or a torchvision weights name (``DEFAULT``, downloaded by
    torchvision), loaded before the stem and head are fitted to ``in_channels`` and ``num_classes``.

    Raises:
        ValueError: unknown name (message lists close matches), a factory that fails, weights
            for a model that is not torchvision's, or weights that do not fit the model.
    """
    tv_name = name.removeprefix(TORCHVISION_PREFIX)
    if name.startswith(TORCHVISION_PREFIX) or (name not in ZOO and ":" not in name):
        if tv_name in _torchvision_names():
            m = _torchvision(tv_name, weights)
            return _adapt_torchvision(m, in_channels, num_classes, keep_stem=weights is not None)
        raise ValueError(did_you_mean(tv_name, known_models(), "model", shown=ZOO.names(),
                                      more=", any torchvision classification model, or package.module:factory"))
    if weights is not None:
        raise ValueError(f"--weights applies to torchvision models, not {name}; load trained weights with --checkpoint")
    if name in ZOO:
        return ZOO.get(name)(in_channels, num_classes)
    mod_name, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load model factory {name!r}: {e}") from None
    try:
        return factory(in_channels=in_channels, num_classes=num_classes)
    except TypeError:
        model = factory()
        return _adapt_torchvision(model, in_channels, num_classes)


def _torchvision(name: str, weights: str | None) -> nn.Module:
    """torchvision's ``name`` with ``weights``: None, a local file, or a weights name to download."""
    from torchvision import models  # heavy (1.7 s): only torchvision models need it

    if weights is None or Path(weights).is_file():
        m = models.get_model(name, weights=None)
        if weights is not None:
            load_weights_(m, weights, what=f"torchvision model {name}")
        return m
    if not weights.replace("_", "").isalnum() or weights != weights.upper():
        raise ValueError(f"weights file {weights} does not exist (give a state-dict file or a torchvision weights "
                         "name such as DEFAULT)")
    try:
        return models.get_model(name, weights=weights)
    except (KeyError, ValueError) as e:
        raise ValueError(f"torchvision has no weights {weights!r} for {name}: {str(e).splitlines()[0]}") from None
    except OSError as e:  # URLError, no network, no disk
        raise ValueError(f"cannot download torchvision's {weights} weights for {name} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:80]}); pass a local state-dict file: --weights PATH") from None


def load_weights_(model: nn.Module, path: str | os.PathLike, *, what: str = "the model") -> None:
    """Load a state-dict file (bare, or under ``state_dict`` / ``model``) into ``model``, all keys
    and shapes matching (else a one-line ``ValueError`` saying what differs).

    Example:
        >>> import tempfile
        >>> p = tempfile.mktemp(suffix=".pt")
        >>> torch.save({"weight": torch.zeros(3, 2), "bias": torch.zeros(3)}, p)
        >>> m = nn.Linear(2, 3); load_weights_(m, p); int(torch.count_nonzero(m.weight))
        0
        >>> load_weights_(nn.Linear(2, 4), p)
        Traceback (most recent call last):
        ...
        ValueError: weights file ... does not match the model: 2 tensors of another shape (weight: file (3, 2), model (4, 2))
    """
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickled objects, not a torch file, unreadable
        raise ValueError(f"cannot read weights file {path} as a state dict ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:100]})") from None
    sd = next((blob[k] for k in ("state_dict", "model") if isinstance(blob, dict) and isinstance(blob.get(k), dict)),
              blob)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"weights file {path} holds no state dict (a mapping of names to tensors)")
    problems = _mismatch(model.state_dict(), sd)
    if problems:
        raise ValueError(f"weights file {path} does not match {what}: {'; '.join(problems)}")
    model.load_state_dict(sd)


def _mismatch(own: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]) -> list[str]:
    """What keeps state dict ``sd`` from loading into a model whose state dict is ``own``, in words."""
    def some(keys: list[str]) -> str:
        return ", ".join(keys[:2]) + (", ..." if len(keys) > 2 else "")

    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({some(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({some(unexpected)})")
    if shapes:
        k = shapes[0]
        problems.append(f"{len(shapes)} tensors of another shape ({k}: file {tuple(sd[k].shape)}, "
                        f"model {tuple(own[k].shape)})")
    return problems
