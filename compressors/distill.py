"""Knowledge distillation losses, selected by ``DistillConfig.method``.

A method is ``factory(config, student, teacher) -> Distiller``; a distiller's
``loss(student_logits, teacher_logits, targets) -> Tensor`` is the whole training loss.
Feature-based methods (FitNets hints, attention transfer) register forward hooks on the
``hint_layers`` of both models in ``__init__`` and read the captured features in ``loss``.

Example:
    >>> import torch
    >>> from squeezer.compressors.policy import DistillConfig
    >>> d = DISTILLATION.get("hinton")(DistillConfig(temperature=4, alpha=0.5), None, None)
    >>> float(d.loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1]))) > 0
    True
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .policy import DistillConfig
from .registry import Registry

log = logging.getLogger("squeezer")


class Distiller:
    """Base: plain cross-entropy (no teacher)."""

    def __init__(self, config: DistillConfig | None, student: nn.Module | None, teacher: nn.Module | None) -> None:
        self.config = config
        self.student = student
        self.teacher = teacher

    def loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
             targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(student_logits, targets)

    def close(self) -> None:
        """Remove hooks (feature-based methods)."""


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al. 2015: KL(teacher_T || student_T) * T^2."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1),
                    reduction="batchmean") * (t * t)


class HintonDistiller(Distiller):
    """Soft targets: ``alpha * KD + (1 - alpha) * CE``."""

    def loss(self, student_logits, teacher_logits, targets):
        ce = F.cross_entropy(student_logits, targets)
        if teacher_logits is None or self.config is None:
            return ce
        a = self.config.alpha
        return a * soft_target_loss(student_logits, teacher_logits, self.config.temperature) + (1 - a) * ce


def logit_maps(output: Any) -> list[torch.Tensor] | None:
    """The class scores in a model's output: the output if it is one ``[N, C, ...]`` float tensor
    (C > 1), else a dict's such tensors (a segmentation model's ``{"out": ...}``); None if there
    are none (a detector's losses or boxes).

    Example:
        >>> [tuple(t.shape) for t in logit_maps({"out": torch.zeros(2, 3, 4, 4)})], logit_maps([{"boxes": 0}])
        ([(2, 3, 4, 4)], None)
    """
    leaves = list(output.values()) if isinstance(output, dict) else [output]
    maps = [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 2
            and t.shape[1] > 1]
    return maps or None


def elementwise_soft_target_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft targets at every output element: KL(teacher_T || student_T) over dimension 1 (classes)
    at each position of ``[N, C, ...]`` maps, averaged over the batch and positions, x T^2 (on
    ``[N, C]`` logits it is :func:`soft_target_loss`)."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, dim=1), F.softmax(teacher / t, dim=1), reduction="sum")
    return kl * (t * t) / (student.numel() // student.shape[1])


class UserLossDistiller:
    """A user's loss ``loss_fn(model, batch, teacher)`` with soft targets from ``teacher`` at every
    output element: ``(1 - alpha) * loss + alpha * KD`` (:func:`elementwise_soft_target_loss`).

    The student's output is the one the user's loss computed (a forward hook keeps it); the
    teacher runs on the batch's inputs. Where the student's training output holds no class
    scores (:func:`logit_maps`: a detector returns its losses) or the teacher's do not match
    them, soft targets are switched off, once, with a warning, and the user's loss alone trains.
    """

    def __init__(self, config: DistillConfig | None, student: nn.Module, teacher: nn.Module | None,
                 loss_fn: Callable[[nn.Module, Any, Any], torch.Tensor]) -> None:
        self.config, self.student, self.teacher, self.loss_fn = config, student, teacher, loss_fn
        self.active = config is not None and teacher is not None
        self._output: Any = None
        self._hook = student.register_forward_hook(self._keep) if self.active else None

    def _keep(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self._output = output

    def loss(self, batch: Any) -> torch.Tensor:
        self._output = None
        user = self.loss_fn(self.student, batch, self.teacher)
        if not self.active:
            return user
        student = logit_maps(self._output)
        with torch.no_grad():
            teacher = logit_maps(self.teacher(batch[0])) if student else None
        pairs = [(s, t) for s, t in zip(student or [], teacher or []) if s.shape == t.shape]
        if not pairs:
            what = type(self._output).__name__
            log.warning("distillation off: the model's training output (%s) holds no class scores matching the "
                        "teacher's; the loss alone trains", what)
            self.close()
            return user
        a, temp = self.config.alpha, self.config.temperature
        kd = sum(elementwise_soft_target_loss(s, t, temp) for s, t in pairs) / len(pairs)
        return (1 - a) * user + a * kd

    def close(self) -> None:
        self.active = False
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


#: Distillation methods by name.
DISTILLATION: Registry[Callable[[DistillConfig, Any, Any], Distiller]] = Registry("distillation method")
DISTILLATION.add("hinton", HintonDistiller, summary="soft targets with temperature (Hinton et al. 2015)")


def make_distiller(config: DistillConfig | None, student: nn.Module, teacher: nn.Module | None) -> Distiller:
    if config is None or teacher is None:
        return Distiller(None, student, None)
    return DISTILLATION.get(config.method)(config, student, teacher)


# --- feature-based methods (FitNets hints, attention transfer) ------------------------------

class _FeatureDistiller(HintonDistiller):
    """Captures the outputs of ``hint_layers`` in both models with forward hooks.

    Without ``hint_layers`` the top-level children of the student that also exist in the
    teacher and output 4-D feature maps are used (``default_layers`` picks among them).
    The feature term is added to the Hinton loss (``alpha`` weighs soft targets as usual;
    ``alpha=0`` leaves cross-entropy plus the feature term).
    """

    def __init__(self, config: DistillConfig | None, student: nn.Module | None, teacher: nn.Module | None) -> None:
        super().__init__(config, student, teacher)
        self._hooks: list[Any] = []
        self.s_feats: dict[str, torch.Tensor] = {}
        self.t_feats: dict[str, torch.Tensor] = {}
        if student is None or teacher is None:
            self.layers: list[str] = []
            return
        names = list(config.hint_layers) if config is not None and config.hint_layers else None
        s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
        if names is None:
            names = [n for n, _ in student.named_children() if n in t_mods]
            self._auto = True
        else:
            missing = [n for n in names if n not in s_mods or n not in t_mods]
            if missing:
                raise ValueError(f"hint layer(s) {missing} not found in both student and teacher; "
                                 f"top-level modules: {[n for n, _ in student.named_children()]}")
            self._auto = False
        self.layers = names
        for n in names:
            self._hooks.append(s_mods[n].register_forward_hook(self._store(self.s_feats, n)))
            self._hooks.append(t_mods[n].register_forward_hook(self._store(self.t_feats, n)))

    @staticmethod
    def _store(into: dict[str, torch.Tensor], name: str):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor):
                into[name] = output
        return hook

    def pairs(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        out = [(n, self.s_feats[n], self.t_feats[n]) for n in self.layers
               if n in self.s_feats and n in self.t_feats and self.s_feats[n].dim() == 4 and self.t_feats[n].dim() == 4]
        return self.default_layers(out) if self._auto else out

    def default_layers(self, pairs):
        return pairs

    def feature_loss(self, pairs) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, student_logits, teacher_logits, targets):
        base = super().loss(student_logits, teacher_logits, targets)
        if teacher_logits is None or self.config is None:
            return base
        pairs = self.pairs()
        self.s_feats.clear()
        self.t_feats.clear()
        if not pairs:
            return base
        return base + self.config.hint_weight * self.feature_loss(pairs)

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


class FitNetsDistiller(_FeatureDistiller):
    """FitNets hints (Romero et al. 2015): MSE between a regressed student feature and the teacher's.

    A 1x1 conv regressor maps the student's channels to the teacher's (needed when pruning
    changed the channel count; initialised by least squares on the first batch). Its parameters are
    trained by the distiller's own SGD optimizer, stepped at the next ``loss`` call from the
    gradients the training loop's ``backward`` left, so any training loop trains it; they
    are exposed by :meth:`parameters`. Default hint: the last feature map before the head.
    """

    def __init__(self, config, student, teacher, *, lr: float = 0.01) -> None:
        super().__init__(config, student, teacher)
        self.regressors = nn.ModuleDict()
        self.lr = lr
        self._opt: torch.optim.Optimizer | None = None

    def default_layers(self, pairs):
        return pairs[-1:]

    def parameters(self):
        return self.regressors.parameters()

    def _regressor(self, name: str, s: torch.Tensor, t: torch.Tensor) -> nn.Module:
        key = name.replace(".", "_")
        if key not in self.regressors:
            reg = nn.Conv2d(s.shape[1], t.shape[1], 1, bias=False).to(s.device)
            with torch.no_grad():  # start from the least-squares map on this batch, not noise
                tt = t if t.shape[-2:] == s.shape[-2:] else F.adaptive_avg_pool2d(t, s.shape[-2:])
                a = s.detach().movedim(1, -1).reshape(-1, s.shape[1]).double()
                b = tt.detach().movedim(1, -1).reshape(-1, t.shape[1]).double()
                ridge = 1e-3 * (a * a).sum(0).mean().clamp_min(1e-12) * torch.eye(a.shape[1], dtype=a.dtype)
                w = torch.linalg.solve(a.T @ a + ridge, a.T @ b)  # [Cs, Ct]
                reg.weight.copy_(w.T.float()[:, :, None, None])
            self.regressors[key] = reg
            self._opt = torch.optim.SGD(self.regressors.parameters(), lr=self.lr, momentum=0.9)
        return self.regressors[key]

    def feature_loss(self, pairs) -> torch.Tensor:
        if self._opt is not None and any(p.grad is not None for p in self.regressors.parameters()):
            self._opt.step()  # gradients from the previous backward
            self._opt.zero_grad(set_to_none=True)
        total = 0.0
        for name, s, t in pairs:
            r = self._regressor(name, s, t)(s)
            if r.shape[-2:] != t.shape[-2:]:
                r = F.adaptive_avg_pool2d(r, t.shape[-2:])
            t = t.detach()
            # Relative error: raw MSE scales with the teacher's activations and would swamp CE.
            total = total + F.mse_loss(r, t) / t.pow(2).mean().clamp_min(1e-8)
        return total


def attention_map(f: torch.Tensor) -> torch.Tensor:
    """Zagoruyko & Komodakis: channel-mean of squared activations, flattened and L2-normalised."""
    return F.normalize(f.pow(2).mean(1).flatten(1), dim=1)


class AttentionDistiller(_FeatureDistiller):
    """Attention transfer (Zagoruyko & Komodakis 2017): match normalised spatial attention maps.

    ``hint_weight * mean_batch ||Q_s - Q_t||^2`` summed over hint layers, with ``Q`` the
    L2-normalised map; the paper's ``beta/2 * mean((Q_s - Q_t)^2)`` with beta = 1000 on 32x32
    maps is about this, and this form does not depend on the map size. Channel counts may
    differ. Default hints: every top-level stage.
    """

    def feature_loss(self, pairs) -> torch.Tensor:
        total = 0.0
        for _, s, t in pairs:
            if s.shape[-2:] != t.shape[-2:]:
                s = F.adaptive_avg_pool2d(s, t.shape[-2:])
            total = total + (attention_map(s) - attention_map(t.detach())).pow(2).sum(1).mean()
        return total


DISTILLATION.add("fitnets", FitNetsDistiller, summary="FitNets hints with a trained 1x1 regressor (Romero et al. 2015)")
DISTILLATION.add("attention", AttentionDistiller, summary="attention transfer of spatial maps (Zagoruyko & Komodakis 2017)")
