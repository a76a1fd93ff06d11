"""Dependency-aware structured channel pruning on top of Torch-Pruning.

Channels that must be removed together (residual adds, depthwise convs, concatenations,
flatten -> linear) form a *channel group* (Torch-Pruning's dependency graph finds them).
A group is named after its *root*: the first conv/linear whose output channels it holds.
The group's prune ratio is the ``prune_ratio`` of an explicit FQN entry of any member in
the policy (first member in group order) or else the root's ``for_layer`` value, and the
number of channels kept is :func:`kept_channels` — the exact rule the size model uses.

Example:
    >>> from squeezer.evaluators.models import build_model
    >>> m = build_model("resnet20", in_channels=1, num_classes=10)
    >>> g = channel_groups(m, (1, 28, 28))
    >>> g.out_segments["layer1.0.conv2"] == g.out_segments["layer1.1.conv2"]   # coupled by adds
    True
"""

from __future__ import annotations

import functools
import gc
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Sequence

import torch
import torch_pruning as tp
from torch import nn

from .criteria import PRUNING_CRITERIA, PruneContext, normalize_group_scores
from .layers import classifier_name, tensor_graph
from .policy import Policy

Segment = tuple[str | None, int, int]  # (group id or None if never pruned, channels, group size)


@dataclass
class ChannelGroups:
    """For every conv/linear: which channel groups its output and input channels belong to.

    ``out_segments[fqn]`` / ``in_segments[fqn]`` are lists of ``(group, n, group_size)``: ``n``
    of this layer's channels (features) belong to ``group`` (``None`` = never pruned), whose
    own channel count is ``group_size`` (``n`` differs from it after a flatten).
    """

    out_segments: dict[str, list[Segment]] = field(default_factory=dict)
    in_segments: dict[str, list[Segment]] = field(default_factory=dict)
    members: dict[str, list[str]] = field(default_factory=dict)  # group id -> out-channel member FQNs
    sizes: dict[str, int] = field(default_factory=dict)          # group id -> channels
    outputs: list[str] = field(default_factory=list)             # output layers (never pruned)

    def group_ratio(self, group: str, policy: Policy) -> float:
        for m in self.members.get(group, ()):
            if m in policy.layers:
                return policy.layers[m].prune_ratio
        return policy.for_layer(group).prune_ratio

    def kept(self, segments: Sequence[Segment], policy: Policy, round_to: int | None = None) -> int:
        """Channels of ``segments`` that ``policy`` keeps (a group keeps ``n * k // size`` of its ``n``)."""
        return self.kept_counter(policy, round_to)(segments)

    def kept_counter(self, policy: Policy, round_to: int | None = None) -> Callable[[Sequence[Segment]], int]:
        """:meth:`kept` under one policy, each group's count computed once (a cost model asks per op).

        Example:
            >>> cg = ChannelGroups(members={"conv": ["conv"]}, sizes={"conv": 16})
            >>> kept = cg.kept_counter(Policy().with_layer("conv", prune_ratio=0.5))
            >>> kept([("conv", 16, 16)]), kept([("conv", 32, 16), (None, 3, 3)])   # a flatten: 2 per channel
            (8, 19)
        """
        round_to = round_to or policy.pruning.round_to
        by_group: dict[str, int] = {}

        def kept(segments: Sequence[Segment]) -> int:
            total = 0
            for g, n, size in segments:
                if g is None:
                    total += n
                    continue
                k = by_group.get(g)
                if k is None:
                    k = by_group[g] = kept_channels(size, self.group_ratio(g, policy), round_to)
                total += n * k // size
            return total

        return kept

    def unpruned(self) -> dict[str, str]:
        """The conv/linear layers whose output channels no policy can prune, and why."""
        return {fqn: "output layer: its channels are the model's outputs" if fqn in self.outputs else
                "in no channel group: Torch-Pruning found no consistent way to remove its channels"
                for fqn, segs in self.out_segments.items() if all(g is None for g, _, _ in segs)}

    def to_dict(self) -> dict[str, Any]:
        return {"out_segments": self.out_segments, "in_segments": self.in_segments,
                "members": self.members, "sizes": self.sizes}


def kept_channels(channels: int, ratio: float, round_to: int | None = None) -> int:
    """Channels kept when pruning ``ratio`` of ``channels``: ``floor(C * (1 - r))``, at least 1.

    With ``round_to``, the kept count is rounded up to a multiple of it (never above ``C``).
    """
    if ratio <= 0:
        return channels
    k = max(1, int(math.floor(channels * (1.0 - ratio) + 1e-9)))
    if round_to and round_to > 1:
        k = min(channels, int(math.ceil(k / round_to) * round_to))
    return k


def _example(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    p = next(model.parameters(), None)
    return torch.zeros(1, *input_shape, device=p.device if p is not None else "cpu")


def build_graph(model: nn.Module, input_shape: Sequence[int]):
    """Torch-Pruning's dependency graph of ``model``'s :func:`~.layers.tensor_graph` (eval mode)."""
    was_training = model.training
    graph = tensor_graph(model).eval()
    try:
        dg = tp.DependencyGraph().build_dependency(graph, example_inputs=_example(model, input_shape))
    finally:
        model.train(was_training)
    return dg


def output_layers(model: nn.Module, graph: Any) -> list[str]:
    """Conv/linear layers whose output channels are the model's outputs (no layer with weights
    follows them): a classifier, a segmentation head's class maps, a detection head's box and
    class convs. They are never pruned.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
        >>> output_layers(m, build_graph(m, (1, 8, 8)))
        ['2']
    """
    names = {m: n for n, m in model.named_modules()}
    return [names[mod] for mod, node in graph.module2node.items()
            if isinstance(mod, (nn.Conv2d, nn.Linear)) and mod in names and not _feeds_weights(node)]


def _feeds_weights(node: Any) -> bool:
    """Whether a layer with weights consumes ``node``'s output (through weightless ops)."""
    seen, todo = set(), list(node.outputs)
    while todo:
        n = todo.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n.module, nn.Module) and next(n.module.parameters(recurse=False), None) is not None:
            return True
        todo.extend(n.outputs)
    return False


def _ignored(model: nn.Module, ignored: Iterable[str] | None, outputs: list[str]) -> list[nn.Module]:
    names = set(ignored or ()) | set(outputs)
    last = classifier_name(model)
    if last is not None:
        names.add(last)
    mods = dict(model.named_modules())
    return [mods[n] for n in names if n in mods]


#: Most channel indices Torch-Pruning's search for one group may map (see GroupingError): 4x the
#: most a torchvision classifier needs (densenet201: 532,224; vgg: 150,528), ~250 MB of indices.
GROUP_INDEX_LIMIT = 1 << 21
#: Most seconds :func:`channel_groups` may search (see GroupingError): ~5x the slowest torchvision
#: classifier (densenet201: 16-25 s on a shared 2-core machine).
GROUP_SECONDS_LIMIT = 120.0


class GroupingError(RuntimeError):
    """Torch-Pruning cannot group a model's channels within the limits.

    Its group search maps channel indices through every reshape on the way, and keeps them;
    the reshapes of window attention multiply them at each pass (swin_t at 64 px: 2, 64, 2048,
    65536, 2**21, ... indices, 11 GB before the kernel killed it) or pass ~100,000 of them
    hundreds of times (maxvit_t: 3.4 GB after a minute). So the search stops when the indices
    mapped for one group would exceed ``GROUP_INDEX_LIMIT`` (checked before a step allocates
    them) or it runs past ``GROUP_SECONDS_LIMIT`` seconds.
    """


class _Budget:
    """The limits of one group search, checked at every index mapping Torch-Pruning applies."""

    def __init__(self, max_indices: int, seconds: float) -> None:
        self.max_indices = max_indices
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.group_indices = 0   # mapped so far for the group being found

    def next_group(self) -> None:
        self.check_time()
        self.group_indices = 0

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise GroupingError(f"`finding channel groups takes <= {self.seconds:g} s` must hold, but it took longer")

    def map(self, mapping: Callable[[list], list], idxs: list) -> list:
        # a forward flatten turns each index into `_stride` indices: check before they are allocated
        grow = 1 if getattr(mapping, "reverse", True) else getattr(mapping, "_stride", 1)
        self.group_indices += len(idxs) * grow
        if self.group_indices > self.max_indices:
            raise GroupingError(f"`finding a channel group maps <= {self.max_indices:,} indices` must hold, "
                                f"but it would map {self.group_indices:,} (reshapes Torch-Pruning cannot follow)")
        self.check_time()
        return mapping(idxs)


class _BoundedMappings(list):
    """One dependency's index mappings (Torch-Pruning iterates them in its group search), each
    call checked by a :class:`_Budget`; ``plain()`` gives the list back."""

    def __init__(self, mappings: list, budget: _Budget) -> None:
        super().__init__(mappings)
        self.budget = budget

    def __iter__(self):
        for m in super().__iter__():
            yield None if m is None else functools.partial(self.budget.map, m)

    def plain(self) -> list:
        return list(super().__iter__())


def _bound(graph: Any, budget: _Budget | None) -> None:
    """Check every index mapping of ``graph`` against ``budget`` (``None``: stop checking)."""
    for node in graph.module2node.values():
        for dep in node.dependencies:
            m = dep.index_mapping
            dep.index_mapping = m.plain() if isinstance(m, _BoundedMappings) else m
            if budget is not None:
                dep.index_mapping = _BoundedMappings(dep.index_mapping, budget)


def channel_groups(model: nn.Module, input_shape: Sequence[int], *, ignored: Iterable[str] | None = None,
                   graph: Any = None, max_indices: int = GROUP_INDEX_LIMIT,
                   seconds: float = GROUP_SECONDS_LIMIT) -> ChannelGroups:
    """Find the channel groups of ``model`` (see :class:`ChannelGroups`).

    Raises:
        GroupingError: the search would carry more than ``max_indices`` channel indices in one
            step or take more than ``seconds`` (models whose reshapes Torch-Pruning cannot follow).
    """
    budget = _Budget(max_indices, seconds)
    dg = graph if graph is not None else build_graph(model, input_shape)
    _bound(dg, budget)
    error: Exception | None = None
    try:
        cg = _collect_groups(model, dg, ignored, budget)
    except Exception as e:  # noqa: BLE001 - raised again below, without the frames that hold the graph
        error = e.with_traceback(None)
    finally:
        _bound(dg, None)
    if graph is None:
        # Torch-Pruning's graph is cyclic and holds the autograd graph of its example forward,
        # saved activations included (80-140 MB for resnet50 / vit_b_16 at 224 px): free it now,
        # not whenever the collector next runs
        del dg
        gc.collect()
    if error is not None:
        raise error
    return cg


def _collect_groups(model: nn.Module, dg: Any, ignored: Iterable[str] | None, budget: _Budget) -> ChannelGroups:
    names = {m: n for n, m in model.named_modules()}
    cg = ChannelGroups(outputs=output_layers(model, dg))
    compressible = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    for group in dg.get_all_groups(ignored_layers=_ignored(model, ignored, cg.outputs),
                                   root_module_types=(nn.Conv2d, nn.Linear)):
        budget.next_group()
        root = group[0].dep.target.module
        gid = names[root]
        size = len(group[0].idxs)
        cg.sizes[gid] = size
        cg.members[gid] = []
        for item in group:
            mod = item.dep.target.module
            if not isinstance(mod, (nn.Conv2d, nn.Linear)) or mod not in names:
                continue
            fqn = names[mod]
            is_out = dg.is_out_channel_pruning_fn(item.dep.handler)
            is_dw = isinstance(mod, nn.Conv2d) and mod.groups > 1 and mod.groups == mod.in_channels
            if is_out:
                cg.out_segments.setdefault(fqn, []).append((gid, len(item.idxs), size))
                cg.members[gid].append(fqn)
                if is_dw:  # a depthwise conv's inputs are its outputs' channels
                    cg.in_segments.setdefault(fqn, []).append((gid, len(item.idxs), size))
            else:
                if is_dw and fqn in cg.in_segments:
                    continue
                cg.in_segments.setdefault(fqn, []).append((gid, len(item.idxs), size))
    for fqn, m in compressible.items():
        n_out = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        n_in = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
        for segs, n in ((cg.out_segments.setdefault(fqn, []), n_out), (cg.in_segments.setdefault(fqn, []), n_in)):
            rest = n - sum(s[1] for s in segs)
            if rest > 0:
                segs.append((None, rest, rest))
    return cg


class PruneResult(dict):
    """``{group id: channels kept}`` plus each group's original size (``.sizes``).

    Use :meth:`resolved_policy` to turn data-driven or globally allocated counts into a policy
    with explicit per-group ``prune_ratio`` (what the size model and replay need).
    """

    def __init__(self, kept: dict[str, int], sizes: dict[str, int]) -> None:
        super().__init__(kept)
        self.sizes = dict(sizes)

    def ratios(self) -> dict[str, float]:
        return {g: (self.sizes[g] - k) / self.sizes[g] for g, k in self.items()}

    def resolved_policy(self, policy: Policy) -> Policy:
        return resolve_pruned_policy(policy, self, self.sizes)


def resolve_pruned_policy(policy: Policy, kept: dict[str, int], sizes: dict[str, int]) -> Policy:
    """``policy`` with an explicit ``prune_ratio`` on every group root and no ``global_ratio``.

    The ratio ``(C - k) / C`` reproduces ``k`` exactly through :func:`kept_channels` (with or
    without ``round_to``, since a global allocation already rounds ``k``), so cost models and
    a replay on a fresh model (``apply_policy_`` then ``load_state_dict``) see the same shapes.

    Example:
        >>> p = resolve_pruned_policy(Policy(), {"conv": 5}, {"conv": 16})
        >>> kept_channels(16, p.layers["conv"].prune_ratio)
        5
    """

    out = replace(policy, pruning=replace(policy.pruning, global_ratio=None))
    for gid, k in kept.items():
        size = sizes[gid]
        ratio = (size - k) / size if k < size else 0.0
        out = out.with_layer(gid, prune_ratio=ratio)
    return out


def _allocate_global(scores: dict[str, torch.Tensor], sizes: dict[str, int], ratio: float,
                     pools: dict[str, str], round_to: int | None) -> dict[str, int]:
    """Per-group kept counts from one global rate: drop the lowest-scoring channels of each pool.

    Scores must already be comparable across groups (normalised). Each pool (e.g. conv vs
    fully-connected groups) loses ``floor(ratio * its channels)``; every group keeps >= 1.
    """
    kept = {g: sizes[g] for g in scores}
    by_pool: dict[str, list[str]] = {}
    for g in scores:
        by_pool.setdefault(pools.get(g, ""), []).append(g)
    for groups in by_pool.values():
        total = sum(sizes[g] for g in groups)
        n_drop = int(math.floor(total * ratio + 1e-9))
        flat = torch.cat([scores[g] for g in groups])
        owner = [g for g in groups for _ in range(sizes[g])]
        for i in torch.argsort(flat, stable=True).tolist():
            if n_drop <= 0:
                break
            g = owner[i]
            if kept[g] > 1:
                kept[g] -= 1
                n_drop -= 1
    if round_to and round_to > 1:
        kept = {g: min(sizes[g], int(math.ceil(k / round_to) * round_to)) for g, k in kept.items()}
    return kept


def prune_(model: nn.Module, policy: Policy, input_shape: Sequence[int], *,
           data: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
           ignored: Iterable[str] | None = None) -> PruneResult:
    """Remove channels in place as ``policy`` says; returns ``{group id: channels kept}``.

    Groups are pruned with the policy's criterion (``policy.pruning.criterion``). Without
    ``policy.pruning.global_ratio`` the count kept per group is :func:`kept_channels` of the
    group ratio, so the size model can predict it. With it, channels of all groups are ranked
    together (scores normalised per group; the criterion may define ``global_scores(gid, s)``
    and ``pool(gid)`` to change that, e.g. hardware-balanced pruning) and the per-group counts
    follow; per-layer ``prune_ratio`` values are then ignored. The returned
    :class:`PruneResult` turns the counts into an explicit policy (``resolved_policy``).
    All scores are computed on the unpruned model, so the group order does not matter.
    """
    cg = channel_groups(model, input_shape, ignored=ignored)
    global_ratio = policy.pruning.global_ratio
    targets = {g: cg.group_ratio(g, policy) for g in cg.sizes}
    if global_ratio is None and not any(r > 0 for r in targets.values()):
        return PruneResult({g: cg.sizes[g] for g in cg.sizes}, cg.sizes)
    if global_ratio is not None and global_ratio <= 0:
        return PruneResult({g: cg.sizes[g] for g in cg.sizes}, cg.sizes)
    ctx = PruneContext(model=model, data=data, config=policy.pruning, input_shape=tuple(input_shape),
                       groups=cg)
    importance = PRUNING_CRITERIA.get(policy.pruning.criterion)(ctx)
    prepare = getattr(importance, "prepare", None)
    if prepare is not None:  # criteria that need gradients/activations gather them first
        prepare(ctx)
    dg = build_graph(model, input_shape)
    mods = dict(model.named_modules())

    def group_of(gid: str):
        root = mods[gid]
        handler = dg.get_pruner_of_module(root).prune_out_channels
        return dg.get_pruning_group(root, handler, idxs=list(range(cg.sizes[gid])))

    wanted = list(cg.sizes) if global_ratio is not None else [
        g for g in cg.sizes if kept_channels(cg.sizes[g], targets[g], policy.pruning.round_to) < cg.sizes[g]]
    scores: dict[str, torch.Tensor] = {}
    for gid in wanted:
        group = group_of(gid)
        with torch.no_grad():
            s = importance(group)
        if s is None:  # e.g. BN-scale criterion on a group without BN: fall back to L1
            s = PRUNING_CRITERIA.get("l1")(ctx)(group)
        scores[gid] = torch.nan_to_num(s.detach().float().cpu(), nan=0.0)

    if global_ratio is not None:
        to_global = getattr(importance, "global_scores", None)
        pool = getattr(importance, "pool", None)
        comparable = {g: (to_global(g, s) if to_global is not None else normalize_group_scores(s))
                      for g, s in scores.items()}
        kept = _allocate_global(comparable, cg.sizes, global_ratio,
                                {g: pool(g) for g in scores} if pool is not None else {},
                                policy.pruning.round_to)
    else:
        kept = {g: kept_channels(cg.sizes[g], targets[g], policy.pruning.round_to) for g in cg.sizes}

    dropped: dict[str, list[int]] = {}
    for gid, k in kept.items():
        size = cg.sizes[gid]
        if k >= size:
            continue
        drop = sorted(torch.argsort(scores[gid], stable=True)[: size - k].tolist())
        dropped[gid] = drop
        group_of(gid).prune(idxs=drop)
    after = getattr(importance, "after_prune", None)
    if after is not None and dropped:  # e.g. LASSO: least-squares reconstruction of the next layers
        after(ctx, dropped)
    return PruneResult(kept, cg.sizes)

