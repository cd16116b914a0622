"""Static channel pruning: the baseline per-sample gating has to beat.

A user who wants a cheaper CNN can prune channels once (the same channels for
every image) and run a smaller dense network at oneDNN's full speed. This
module does that with the standard criteria and returns a *physically smaller*
model: a real ``nn.Module`` whose convs, BatchNorms and the layers that read
them have fewer channels (weights sliced), not a mask.

Criteria (``criterion=``):

* ``"bn_gamma"`` (default): network slimming (Liu et al., ICCV 2017), the
  magnitude of the BatchNorm scale after each conv. With ``scope="global"`` one
  threshold over all prunable layers, as in the paper (gammas share one scale
  because BN normalises every channel). :func:`slimming_l1` adds the paper's L1
  sparsity on those gammas during (a phase of) training.
* ``"l1"``: the L1 norm of each filter (Li et al., ICLR 2017). With
  ``scope="global"`` each layer's norms are divided by their layer mean first,
  since raw filter norms scale with fan-in and init and are not comparable
  across layers.

What can be pruned is found by tracing the model (``torch.fx``): a conv's
output channels are prunable when every path from it reaches the input of a
conv (``groups=1``) or, after a ``flatten(1)``, a ``Linear``, through only
channel-wise, zero-preserving layers (BatchNorm, ReLU-like activations,
pooling, dropout). Anything else keeps the conv dense, with the reason in
``plan.skipped``:

* **ResNets**: a block's output channels meet the shortcut in an addition, so
  the last conv of every block, the shortcut convs and the stem are *not
  pruned* (their channel counts are tied across blocks); the convs inside a
  block (basic: conv1; bottleneck: conv1 and conv2) are. The same holds for
  torchvision's ResNets.
* A conv whose output is the model output, that is called twice, that is
  grouped, or that feeds a concatenation, a reshape or an unknown function.

Usage::

    from pydecouple.prune import prune, keep_for_flops, slimming_l1, load_pruned
    small = prune(dense, keep=0.5)                                # global BN-gamma, half the channels
    small = prune(dense, keep=0.5, criterion="l1", scope="layer")  # half of every layer
    keep = keep_for_flops(dense, 0.47, images[:64])               # the keep that gives 0.47 of the FLOPs
    small.prune_plan.widths                                       # {conv name: channels kept}

A pruned model trains with :func:`pydecouple.train.train` like any model.
Saved with ``pydecouple.checkpoint.save(path, small, meta=pruned_meta(small, meta))``,
it is rebuilt by :func:`load_pruned`.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PruneGroup", "PrunePlan", "prunable_groups", "channel_scores", "make_plan", "apply_plan", "prune",
           "resize", "keep_for_flops", "slimming_l1", "recalibrate_bn", "pruned_meta", "load_pruned",
           "parameter_count",
           "CRITERIA", "SCOPES"]

CRITERIA = ("bn_gamma", "l1")
SCOPES = ("global", "layer")

# Channel-wise modules with f(0) = 0 per channel: a channel removed before them
# is a channel of zeros after them, so slicing commutes with them.
_ZERO_PRESERVING_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.ELU, nn.Mish,
                            nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                            nn.Dropout, nn.Dropout2d, nn.Identity)
_ZERO_PRESERVING_FUNCTIONS = {F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.leaky_relu, F.gelu, F.silu,
                              F.hardswish, F.elu, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                              F.adaptive_max_pool2d, F.dropout, F.dropout2d}
_ZERO_PRESERVING_METHODS = {"relu", "relu_", "contiguous", "clone", "detach"}


def _err(arg: str, expected: str, given: Any, exc=ValueError):
    raise exc(f"prune: argument '{arg}' must be {expected}, got {given!r}")


@dataclass
class PruneGroup:
    """One prunable conv and what its output channels reach.

    ``conv``: the producer; ``bn``: the BatchNorm right after it (network
    slimming's gammas), or None; ``channelwise``: every BatchNorm on the way
    (sliced with the conv); ``consumers``: ``(name, k)``: a conv (``k = 0``)
    or a Linear after ``flatten(1)`` reading ``k`` features per channel.
    """

    conv: str
    channels: int
    bn: Optional[str] = None
    channelwise: List[str] = field(default_factory=list)
    consumers: List[Tuple[str, int]] = field(default_factory=list)


@dataclass
class PrunePlan:
    """Which output channels of each prunable conv survive (indices into the original)."""

    kept: Dict[str, List[int]]
    groups: Dict[str, PruneGroup]
    skipped: Dict[str, str]
    criterion: str = ""
    scope: str = ""
    keep: float = 1.0

    @property
    def widths(self) -> Dict[str, int]:
        return {k: len(v) for k, v in self.kept.items()}

    @property
    def kept_fraction(self) -> float:
        """Kept channels over prunable channels."""
        total = sum(g.channels for g in self.groups.values())
        return sum(self.widths.values()) / total if total else 1.0

    def to_dict(self) -> Dict[str, Any]:
        return {"criterion": self.criterion, "scope": self.scope, "keep": self.keep, "widths": self.widths,
                "kept": {k: list(v) for k, v in self.kept.items()},
                "channels": {k: g.channels for k, g in self.groups.items()}, "skipped": dict(self.skipped)}

    def summary(self) -> str:
        lines = [f"pruned ({self.criterion}, {self.scope}, keep {self.keep:.3g}): "
                 f"{self.kept_fraction:.1%} of {sum(g.channels for g in self.groups.values())} prunable channels kept"]
        for k, g in self.groups.items():
            lines.append(f"  {k:<28}{g.channels:>5} -> {len(self.kept[k]):>4}")
        for k, why in self.skipped.items():
            lines.append(f"  {k:<28}not pruned: {why}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- finding what can be pruned


def _check_dense(model: nn.Module, fn: str) -> None:
    from .nn.modules import GatedConv2d

    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: argument 'model' must be an nn.Module, got {type(model).__name__}")
    if any(isinstance(m, GatedConv2d) for m in model.modules()):
        raise ValueError(f"{fn}: argument 'model' must be a dense model, got a decoupled one (it has gated convs); "
                         "prune the dense model it came from")


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.symbolic_trace(model)
    except Exception as e:  # data-dependent control flow and the like
        raise ValueError(f"prune: argument 'model' ({type(model).__name__}) must be traceable by torch.fx to find "
                         f"which channels can be removed; tracing failed: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from e


def _flatten_start(node: fx.Node) -> Optional[int]:
    """start_dim of a flatten node (torch.flatten, Tensor.flatten), else None."""
    if node.op == "call_function" and node.target is torch.flatten:
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    if node.op == "call_method" and node.target == "flatten":
        return node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    return None


def prunable_groups(model: nn.Module) -> Tuple[List[PruneGroup], Dict[str, str]]:
    """Trace ``model`` and return ``(groups, skipped)``: the convs whose output
    channels can be removed (forward order), and ``{conv: reason}`` for the others."""
    _check_dense(model, "prunable_groups")
    gm = _trace(model)
    modules = dict(gm.named_modules())
    calls: Dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1

    def walk(node: fx.Node, flat: bool, g: PruneGroup) -> Optional[str]:
        """Follow every user of ``node``; fill ``g``; return why not, or None."""
        for user in node.users:
            if user.op == "output":
                return "its channels reach the model output"
            if user.op == "call_module":
                name, m = user.target, modules[user.target]
                # A stateless activation or pool may be reused (torchvision's blocks call self.relu
                # twice); a module holding per-channel weights may not: slicing it would cut both uses.
                if calls.get(name, 0) > 1 and isinstance(m, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                    return f"{name} is called more than once (shared weights)"
                if user.args[0] is not node or len(user.args) > 1 or user.kwargs:
                    return f"{name} takes it with other inputs"
                if isinstance(m, nn.Conv2d):
                    if flat:
                        return f"{name} reads it after a flatten"
                    if m.groups != 1:
                        return f"{name} is a grouped conv (groups={m.groups})"
                    g.consumers.append((name, 0))
                    continue
                if isinstance(m, nn.Linear):
                    if not flat:
                        return f"{name} (Linear) reads a 4-D tensor along its last dimension, not channels"
                    if m.in_features % g.channels:
                        return f"{name} has {m.in_features} inputs, not a multiple of {g.channels} channels"
                    g.consumers.append((name, m.in_features // g.channels))
                    continue
                if isinstance(m, nn.BatchNorm2d) and not flat:
                    g.channelwise.append(name)
                elif isinstance(m, nn.Flatten) and not flat:
                    if m.start_dim != 1 or m.end_dim != -1:
                        return f"{name} flattens dims {m.start_dim}..{m.end_dim}, not 1..-1"
                    why = walk(user, True, g)
                    if why:
                        return why
                    continue
                elif not isinstance(m, _ZERO_PRESERVING_MODULES):
                    return f"{name} ({type(m).__name__}) is not known to keep channels apart"
                why = walk(user, flat, g)
                if why:
                    return why
                continue
            start = _flatten_start(user)
            if start is not None:
                if flat or start != 1 or (len(user.args) > 2 or "end_dim" in user.kwargs):
                    return f"{user.name}: only flatten(x, 1) is understood"
                why = walk(user, True, g)
                if why:
                    return why
                continue
            others = [a for a in list(user.args[1:]) + list(user.kwargs.values()) if isinstance(a, fx.Node)]
            ok = ((user.op == "call_function" and user.target in _ZERO_PRESERVING_FUNCTIONS)
                  or (user.op == "call_method" and user.target in _ZERO_PRESERVING_METHODS))
            if not ok or others or user.args[0] is not node:
                what = getattr(user.target, "__name__", str(user.target))
                if user.target in (operator.add, torch.add, "add", "add_", operator.iadd):
                    return f"it meets another tensor in an addition ({user.name}: a residual connection)"
                return f"{user.name} ({what}) is not known to keep channels apart"
            why = walk(user, flat, g)
            if why:
                return why
        return None

    groups: List[PruneGroup] = []
    skipped: Dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.Conv2d):
            continue
        name, conv = node.target, modules[node.target]
        if calls[name] > 1:
            skipped[name] = "called more than once (shared weights)"
            continue
        if conv.groups != 1:
            skipped[name] = f"grouped conv (groups={conv.groups}): its outputs are tied to its inputs"
            continue
        g = PruneGroup(conv=name, channels=conv.out_channels)
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and isinstance(modules[users[0].target], nn.BatchNorm2d):
            g.bn = users[0].target
        why = walk(node, False, g)
        if why is None and not g.consumers:
            why = "no conv or linear reads its channels"
        if why:
            skipped[name] = why
        else:
            groups.append(g)
    return groups, skipped


# ----------------------------------------------------------------------------- scores and plans


@torch.no_grad()
def channel_scores(model: nn.Module, criterion: str = "bn_gamma",
                   groups: Optional[Sequence[PruneGroup]] = None) -> Dict[str, torch.Tensor]:
    """Per prunable conv, one importance score per output channel (higher: keep).

    ``"bn_gamma"``: ``|gamma|`` of the BN right after the conv; ``"l1"``: the
    L1 norm of each filter. Float64 CPU tensors.
    """
    if criterion not in CRITERIA:
        _err("criterion", f"one of {CRITERIA}", criterion)
    if groups is None:
        groups, _ = prunable_groups(model)
    mods = dict(model.named_modules())
    out: Dict[str, torch.Tensor] = {}
    for g in groups:
        if criterion == "bn_gamma":
            if g.bn is None:
                raise ValueError(f"prune: criterion 'bn_gamma' needs a BatchNorm right after every prunable conv; "
                                 f"{g.conv} has none (use criterion='l1')")
            bn = mods[g.bn]
            if bn.weight is None:
                raise ValueError(f"prune: criterion 'bn_gamma' needs affine BatchNorms; {g.bn} has affine=False "
                                 f"(use criterion='l1')")
            out[g.conv] = bn.weight.detach().abs().double().cpu()
        else:
            w = mods[g.conv].weight.detach()
            out[g.conv] = w.abs().flatten(1).sum(1).double().cpu()
    return out


def _round_up(n: int, multiple: int, cap: int) -> int:
    return min(cap, -(-n // multiple) * multiple)


def make_plan(model: nn.Module, keep: Union[float, Dict[str, float]], criterion: str = "bn_gamma",
              scope: str = "global", *, min_channels: int = 1, min_fraction: float = 0.0,
              round_to: int = 1) -> PrunePlan:
    """Decide which channels to keep.

    Args:
        model: a dense model (not modified).
        keep: the fraction of prunable channels to keep, in (0, 1]; with
            ``scope="layer"`` of every layer; or ``{conv name: fraction}`` per layer
            (layers not named keep everything).
        criterion: ``"bn_gamma"`` (network slimming) or ``"l1"`` (filter norm).
        scope: ``"global"`` (one ranking over all prunable layers) or ``"layer"``.
        min_channels: no layer keeps fewer (a global threshold can empty a layer).
        min_fraction: no layer keeps less than this fraction of its channels (global scope).
        round_to: kept counts rounded up to a multiple of this (SIMD-friendly widths).
    """
    if criterion not in CRITERIA:
        _err("criterion", f"one of {CRITERIA}", criterion)
    if scope not in SCOPES:
        _err("scope", f"one of {SCOPES}", scope)
    if isinstance(min_channels, bool) or not isinstance(min_channels, int) or min_channels < 1:
        _err("min_channels", "an int >= 1", min_channels)
    if isinstance(min_fraction, bool) or not isinstance(min_fraction, (int, float)) or not 0 <= min_fraction <= 1:
        _err("min_fraction", "a fraction in [0, 1]", min_fraction)
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        _err("round_to", "an int >= 1", round_to)
    groups, skipped = prunable_groups(model)
    if not groups:
        raise ValueError(f"prune: argument 'model' ({type(model).__name__}) has no prunable conv; reasons: "
                         + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    by_name = {g.conv: g for g in groups}
    if isinstance(keep, dict):
        for k, v in keep.items():
            if k not in by_name:
                _err("keep", f"a dict over prunable convs {sorted(by_name)}", k, KeyError)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                _err(f"keep[{k!r}]", "a fraction in (0, 1]", v)
        fractions = {g.conv: float(keep.get(g.conv, 1.0)) for g in groups}
        scope_used = "layer"
        keep_value = float(sum(fractions[g.conv] * g.channels for g in groups) / sum(g.channels for g in groups))
    else:
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
            _err("keep", "a fraction in (0, 1] (of the prunable channels kept)", keep)
        fractions = {g.conv: float(keep) for g in groups}
        scope_used, keep_value = scope, float(keep)
    scores = channel_scores(model, criterion, groups)

    counts: Dict[str, int] = {}
    if scope_used == "layer":
        for g in groups:
            counts[g.conv] = max(min_channels, round(fractions[g.conv] * g.channels))
    else:
        s = {k: (v / v.mean().clamp_min(1e-12) if criterion == "l1" else v) for k, v in scores.items()}
        allv = torch.cat([s[g.conv] for g in groups])
        total = round(keep_value * len(allv))
        # The total-th largest score is the threshold; ties broken by a stable sort of (score, layer order).
        order = torch.argsort(allv, descending=True, stable=True)
        chosen = torch.zeros(len(allv), dtype=torch.bool)
        chosen[order[:total]] = True
        i = 0
        for g in groups:
            counts[g.conv] = max(min_channels, math.ceil(min_fraction * g.channels), int(chosen[i:i + g.channels].sum()))
            i += g.channels
    kept: Dict[str, List[int]] = {}
    for g in groups:
        n = _round_up(min(counts[g.conv], g.channels), round_to, g.channels)
        idx = torch.argsort(scores[g.conv], descending=True, stable=True)[:n]
        kept[g.conv] = sorted(int(i) for i in idx)
    return PrunePlan(kept, by_name, skipped, criterion, scope_used, keep_value)


# ----------------------------------------------------------------------------- slicing


def _slice_param(mod: nn.Module, name: str, idx: torch.Tensor, dim: int) -> None:
    p = getattr(mod, name)
    if p is None:
        return
    new = p.detach().index_select(dim, idx.to(p.device)).clone()
    if isinstance(p, nn.Parameter):
        setattr(mod, name, nn.Parameter(new, requires_grad=p.requires_grad))
    else:
        setattr(mod, name, new)  # a registered buffer stays registered


@torch.no_grad()
def apply_plan(model: nn.Module, plan: PrunePlan, inplace: bool = False) -> nn.Module:
    """The model with only ``plan.kept`` channels: weights sliced, shapes changed.
    Returns a copy unless ``inplace``; the result carries ``.prune_plan``."""
    _check_dense(model, "apply_plan")
    if not isinstance(plan, PrunePlan):
        _err("plan", "a PrunePlan (from make_plan)", type(plan).__name__, TypeError)
    net = model if inplace else copy.deepcopy(model)
    mods = dict(net.named_modules())
    for name, kept in plan.kept.items():
        g = plan.groups[name]
        conv = mods.get(name)
        if not isinstance(conv, nn.Conv2d) or conv.out_channels != g.channels:
            raise ValueError(f"apply_plan: argument 'plan' was made for another model: {name} is "
                             f"{type(conv).__name__ if conv is not None else 'missing'}"
                             f"{' with ' + str(conv.out_channels) + ' channels' if isinstance(conv, nn.Conv2d) else ''}, "
                             f"expected a conv with {g.channels}")
        for cname, k in g.consumers:  # a plan names modules: make sure they are the same wiring
            c = mods.get(cname)
            width = getattr(c, "in_features", None) if k else getattr(c, "in_channels", None)
            if width != g.channels * max(k, 1) or not isinstance(c, nn.Linear if k else nn.Conv2d):
                raise ValueError(f"apply_plan: argument 'plan' was made for another model: {name}'s channels "
                                 f"should reach {cname} ({'Linear' if k else 'Conv2d'} with {g.channels * max(k, 1)} "
                                 f"inputs), got {type(c).__name__ if c is not None else 'nothing'} with {width}")
        for bn_name in g.channelwise:
            if getattr(mods.get(bn_name), "num_features", None) != g.channels:
                raise ValueError(f"apply_plan: argument 'plan' was made for another model: {bn_name} should be "
                                 f"a BatchNorm over {g.channels} channels")
        idx = torch.tensor(kept, dtype=torch.long)
        if len(idx) == 0 or int(idx.max()) >= g.channels or len(set(kept)) != len(kept):
            raise ValueError(f"apply_plan: argument 'plan' keeps invalid channels of {name}: {kept[:8]}...")
        _slice_param(conv, "weight", idx, 0)
        _slice_param(conv, "bias", idx, 0)
        conv.out_channels = len(idx)
        for bn_name in g.channelwise:
            bn = mods[bn_name]
            for attr in ("weight", "bias", "running_mean", "running_var"):
                _slice_param(bn, attr, idx, 0)
            bn.num_features = len(idx)
        for cname, k in g.consumers:
            c = mods[cname]
            if k == 0:
                _slice_param(c, "weight", idx, 1)
                c.in_channels = len(idx)
            else:  # flatten(1) of (C, H, W) is channel-major: channel i owns features [i k, (i+1) k)
                cols = (idx[:, None] * k + torch.arange(k)[None, :]).flatten()
                _slice_param(c, "weight", cols, 1)
                c.in_features = len(cols)
    net.prune_plan = plan
    return net


def prune(model: nn.Module, keep: Union[float, Dict[str, float]] = 0.5, criterion: str = "bn_gamma",
          scope: str = "global", *, min_channels: int = 1, min_fraction: float = 0.0, round_to: int = 1,
          inplace: bool = False) -> nn.Module:
    """A physically smaller copy of ``model`` (see :func:`make_plan` for the
    arguments). ``result.prune_plan`` says what was kept and what was not pruned, and why."""
    plan = make_plan(model, keep, criterion, scope, min_channels=min_channels, min_fraction=min_fraction,
                     round_to=round_to)
    return apply_plan(model, plan, inplace=inplace)


def resize(model: nn.Module, widths: Dict[str, int], inplace: bool = False) -> nn.Module:
    """``model`` with the given channel counts (the first channels kept): the
    skeleton a pruned state_dict loads into."""
    groups, skipped = prunable_groups(model)
    by = {g.conv: g for g in groups}
    kept = {}
    for k, n in widths.items():
        if k not in by:
            raise ValueError(f"resize: argument 'widths' names {k!r}, which is not a prunable conv of this model "
                             f"(prunable: {sorted(by)}{'; ' + k + ': ' + skipped[k] if k in skipped else ''})")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= by[k].channels:
            raise ValueError(f"resize: argument 'widths[{k!r}]' must be an int in [1, {by[k].channels}], got {n!r}")
        kept[k] = list(range(n))
    return apply_plan(model, PrunePlan(kept, by, skipped, "resize", "layer", 1.0), inplace=inplace)


# ----------------------------------------------------------------------------- FLOPs targets


def _macs(model: nn.Module, x: torch.Tensor) -> float:
    from .flops import FlopsCounter

    was = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopsCounter(model) as fc:
            model(x)
    finally:
        model.train(was)
    return fc.report().total


def keep_for_flops(model: nn.Module, target: float, x: torch.Tensor, criterion: str = "bn_gamma",
                   scope: str = "global", *, min_channels: int = 1, min_fraction: float = 0.0, round_to: int = 1,
                   tol: float = 0.005) -> float:
    """The ``keep`` whose pruned model has ``target`` x the FLOPs (MACs) of ``model``
    on inputs like ``x`` (bisection; the FLOPs only fall as keep falls)."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        _err("target", "a FLOPs ratio in (0, 1]", target)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        _err("x", "a 4-D batch of example inputs (N, C, H, W)", type(x).__name__ if not isinstance(x, torch.Tensor)
             else f"shape {tuple(x.shape)}", TypeError)
    x = x[:2]
    dense = _macs(model, x)
    lo, hi = 1e-3, 1.0
    best = hi
    for _ in range(30):
        mid = (lo + hi) / 2
        r = _macs(prune(model, mid, criterion, scope, min_channels=min_channels, min_fraction=min_fraction,
                        round_to=round_to), x) / dense
        if abs(r - target) <= tol:
            return mid
        if r > target:
            hi = mid
        else:
            lo = mid
        best = mid
    return best


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- network slimming's sparsity


class _Handles(list):
    def remove(self) -> None:
        for h in self:
            h.remove()
        self.clear()


def slimming_l1(model: nn.Module, strength: float) -> _Handles:
    """Network slimming's L1 sparsity on the BN gammas of prunable convs:
    adds ``strength * sign(gamma)`` to each such gamma's gradient (the
    subgradient of ``strength * sum |gamma|``, as the paper's code does), so
    any trainer applies it. Returns handles; ``.remove()`` stops it."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or strength < 0:
        _err("strength", "a number >= 0 (the L1 weight on BN gammas, e.g. 1e-4)", strength)
    groups, _ = prunable_groups(model)
    mods = dict(model.named_modules())
    handles = _Handles()
    for g in groups:
        if g.bn is None or mods[g.bn].weight is None:
            continue
        gamma = mods[g.bn].weight
        handles.append(gamma.register_hook(lambda grad, p=gamma: grad + strength * torch.sign(p.detach())))
    if not handles:
        raise ValueError("slimming_l1: argument 'model' has no prunable conv followed by an affine BatchNorm")
    return handles


# ----------------------------------------------------------------------------- BN statistics


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor, batch_size: int = 256, include_gates: bool = False,
                   progress: bool = False) -> nn.Module:
    """Re-estimate every BatchNorm's running statistics on ``images`` with the
    rest of the model in eval mode, in place; returns ``model`` in eval mode.

    Why: a pruned model's BNs hold the statistics of channels it no longer
    sums; a decoupled model's were collected under training gates (noisy,
    half of them soft), while at inference its gates are hard. Either way the
    eval-time inputs of a BN differ from what its statistics describe. The new
    statistics are exact averages over ``images`` (momentum None). The BNs that
    normalise gate logits inside ACMs are left alone unless ``include_gates``
    (they set the gates' thresholds, hence the FLOPs).
    """
    from .nn.gate import ArchitectureControl

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or len(images) == 0:
        _err("images", "a non-empty 4-D batch (N, C, H, W)", type(images).__name__ if not isinstance(images, torch.Tensor)
             else f"shape {tuple(images.shape)}", TypeError)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        _err("batch_size", "an int >= 2 (batch statistics)", batch_size)
    gate_bns = set()
    if not include_gates:
        gate_bns = {id(b) for m in model.modules() if isinstance(m, ArchitectureControl) for b in m.modules()}
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats and id(m) not in gate_bns]
    if not bns:
        _err("model", "a model with BatchNorm layers that track running statistics", type(model).__name__)
    model.eval()
    # A gated conv in eval runs the sparse op, whose deselected filters come out as zeros
    # before its BN: statistics taken there would mix those zeros in. Training normalises the
    # dense conv output and gates after BN, so recalibrate with the dense conv (same outputs
    # after the gate, the statistics training meant).
    from .nn.modules import GatedConv2d

    sparse = [(m, m.use_sparse_op) for m in model.modules() if isinstance(m, GatedConv2d)]
    for m, _ in sparse:
        m.use_sparse_op = False
    momenta = [b.momentum for b in bns]
    for b in bns:
        b.reset_running_stats()
        b.momentum = None  # cumulative average: every batch counts alike
        b.train()
    device = next(model.parameters()).device
    starts = range(0, len(images) - 1, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="recalibrate BN", leave=False)
    try:
        for i in starts:
            xb = images[i:i + batch_size]
            if len(xb) >= 2:
                model(xb.to(device))
    finally:
        for b, mom in zip(bns, momenta):
            b.momentum = mom
            b.eval()
        for m, flag in sparse:
            m.use_sparse_op = flag
    return model


# ----------------------------------------------------------------------------- checkpoints


def pruned_meta(model: nn.Module, meta: Dict[str, Any]) -> Dict[str, Any]:
    """``meta`` (the unpruned model's: arch, num_classes, in_channels, ...) plus
    the pruned widths, for :func:`pydecouple.checkpoint.save`."""
    plan = getattr(model, "prune_plan", None)
    if plan is None:
        _err("model", "a model returned by prune()/apply_plan() (it carries .prune_plan)", type(model).__name__)
    out = dict(meta)
    out["prune"] = plan.to_dict()
    return out


def load_pruned(path, map_location: str = "cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild a pruned model saved with :func:`pruned_meta`: the zoo model its
    meta names, resized to the saved widths, then its weights. Returns ``(model in eval mode, meta)``."""
    from . import checkpoint as ckpt

    blob = ckpt.load(path, map_location)
    meta = blob["meta"]
    if "prune" not in meta:
        raise ckpt.CheckpointError(f"{path}: not a pruned-model checkpoint (its meta has no 'prune' entry); "
                                   "use pydecouple.checkpoint.load_model")
    model = resize(ckpt.build_from_meta(meta), {k: int(v) for k, v in meta["prune"]["widths"].items()}, inplace=True)
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        raise ckpt.CheckpointError(f"{path}: weights do not fit the pruned model its meta describes: "
                                   f"{str(e).splitlines()[0]}") from e
    plan = model.prune_plan
    plan.criterion, plan.scope, plan.keep = meta["prune"].get("criterion", ""), meta["prune"].get("scope", ""), \
        float(meta["prune"].get("keep", 1.0))
    return model.to(map_location).eval(), meta
