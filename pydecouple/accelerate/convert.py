"""``accelerate(model)``: convert a decoupled (or dense) model into its
inference modules.

Which BatchNorm folds into which conv comes from the model itself, never from
attribute names or registration order alone: a gated conv folds the
:class:`~pydecouple.nn.GatedBatchNorm2d` that ``decouple`` paired with it (from
the traced forward), a dense conv the BatchNorm2d the traced forward shows
reading its output and nothing else (:mod:`pydecouple.nn.graph`); inside an
``nn.Sequential`` (whose forward is its order) the next child. A folded BN
becomes ``nn.Identity`` wherever it sits.

Structure is kept: ``nn.Sequential`` chains become :class:`AccelSequential`
(ReLU fused, masks chained), this library's residual blocks
:class:`AccelResidual`, and any other module a shallow copy with its children
converted, running its own forward. Convs there run one by one: no ReLU fused
into the kernel and no in-mask; :class:`AccelerateSummary` names each such
module.
"""

from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Set, Tuple

import torch
import torch.nn as nn

from .. import _backend, isa
from ..nn.gate import ArchitectureControl
from ..nn.graph import ZERO_PRESERVING, trace_dataflow
from ..nn.modules import BasicBlock, Bottleneck, GatedBatchNorm2d, GatedConv2d
from .modules import AccelConv, AccelEntry, AccelResidual, AccelSequential, accel_layers, link_gate_means

__all__ = ["AccelerateSummary", "accelerate"]

log = logging.getLogger(__name__)

# Blocks whose forward this module knows (conv1-bn1-relu-conv2-bn2(-relu-conv3-bn3) + shortcut, relu).
_RESIDUAL_FORWARDS = {BasicBlock.forward, Bottleneck.forward}


@dataclass
class AccelerateSummary:
    """What :func:`accelerate` did, kept as ``accel.accelerate_summary`` and logged.

    ``own_forward``: (module name, what it costs) for each module that runs its
    own forward with gated convs inside, so that its convs run one by one, with
    no ReLU fused into the kernel and no in-mask. ``kept``: (name, why) for
    convs and BNs kept as they are. ``notes``: anything else.
    """

    convs: int = 0
    gated: int = 0
    fused_relu: int = 0
    chained: int = 0
    own_forward: List[Tuple[str, str]] = field(default_factory=list)
    kept: List[Tuple[str, str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"accelerate: {self.convs} convs folded ({self.gated} gated), ReLU fused into {self.fused_relu}, "
                 f"{self.chained} reading an in-mask"]
        lines += [f"  own forward: {n}: {why}" for n, why in self.own_forward]
        lines += [f"  kept as is: {n} ({why})" for n, why in self.kept]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _is_bn(m) -> bool:
    return isinstance(m, nn.BatchNorm2d)


def _mask_after_bn(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d]) -> bool:
    """Whether ``bn(conv(x))`` of a gated conv is masked *after* the BN, so that
    folding plus the kernel's masked epilogue is exact. In eval the gated conv's
    own output is masked; a following :class:`GatedBatchNorm2d` of that conv masks
    again after BN. A plain BN after a gated conv would add its shift to the
    deselected channels: not foldable (the pair is kept as is)."""
    if not isinstance(conv, GatedConv2d) or bn is None:
        return True
    return isinstance(bn, GatedBatchNorm2d) and getattr(bn, "gated_conv", None) is conv


def _foldable(conv: nn.Module) -> bool:
    return isinstance(conv, nn.Conv2d) and conv.padding_mode == "zeros" and type(conv) in (nn.Conv2d, GatedConv2d)


def _plain_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


class _Converter:
    def __init__(self, root: nn.Module) -> None:
        self.names = {m: n for n, m in root.named_modules()}
        self.summary = AccelerateSummary()
        modules = dict(root.named_modules())
        # conv -> the BN folded into it; each such BN becomes Identity where it is met.
        self.bn_of: Dict[nn.Module, nn.Module] = {}
        for m in root.modules():
            conv = getattr(m, "gated_conv", None) if isinstance(m, GatedBatchNorm2d) else None
            if conv is not None and _foldable(conv):
                self.bn_of[conv] = m
        flow = trace_dataflow(root)
        if flow.traced:
            for c, b in flow.bn_of.items():
                conv, bn = modules[c], modules[b]
                if _foldable(conv) and not isinstance(conv, GatedConv2d) and type(bn) is nn.BatchNorm2d:
                    self.bn_of[conv] = bn
        else:
            self.summary.notes.append(f"could not trace the forward with torch.fx ({flow.reason}): dense convs "
                                      f"outside nn.Sequential keep their BN unfolded")
        self.folded: Set[int] = {id(bn) for bn in self.bn_of.values()}

    def conv(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], relu: bool, src: Optional[nn.Module]
             ) -> Tuple[AccelConv, Optional[nn.Module]]:
        gated = isinstance(conv, GatedConv2d)
        uses_in = gated and conv.in_mask_source is not None and conv.in_mask_source is src
        a = AccelConv(conv, bn, relu, gated, uses_in, self.names.get(conv, ""))
        s = self.summary
        s.convs += 1
        s.gated += gated
        s.fused_relu += bool(relu)
        s.chained += a.uses_in_mask
        return a, (conv if gated else None)

    def sequential(self, seq: nn.Sequential, src: Optional[nn.Module] = None
                   ) -> Tuple[AccelSequential, Optional[nn.Module]]:
        children = list(seq)
        stages, kinds = [], []
        i = 0
        while i < len(children):
            c = children[i]
            if _foldable(c):
                nxt = children[i + 1] if i + 1 < len(children) else None
                bn = self.bn_of.get(c)
                if bn is None and not isinstance(c, GatedConv2d) and _is_bn(nxt) \
                        and not isinstance(nxt, GatedBatchNorm2d) and nxt.num_features == c.out_channels:
                    bn = nxt  # a Sequential's forward is its order: the next child reads this conv's output alone
                adjacent = bn is not None and bn is nxt
                j = i + 1 + adjacent
                # ReLU is fused only where it directly follows (in the Sequential) what the conv folds.
                relu = (adjacent or bn is None) and j < len(children) and type(children[j]) is nn.ReLU
                if _mask_after_bn(c, bn):
                    a, src = self.conv(c, bn, relu, src)
                    if bn is not None and not adjacent:
                        self.folded.add(id(bn))
                    stages.append(a)
                    kinds.append("conv")
                    i = j + (1 if relu else 0)
                    continue
            if id(c) in self.folded:
                stages.append(nn.Identity())
                kinds.append("pass")
            elif _plain_sequential(c):
                sub, src = self.sequential(c, src)
                stages.append(sub)
                kinds.append("seq")
            elif self.recognised_residual(c):
                stages.append(self.residual(c))
                kinds.append("block")
                src = None
            elif isinstance(c, ZERO_PRESERVING):
                stages.append(copy.deepcopy(c))
                kinds.append("pass")
            else:
                stages.append(self.generic(c))
                kinds.append("other")
                src = None
            i += 1
        return AccelSequential(stages, kinds), src

    def _residual_pairs(self, block: nn.Module) -> List[Tuple[nn.Module, nn.Module]]:
        pairs = []
        for i in (1, 2, 3):
            conv, bn = getattr(block, f"conv{i}", None), getattr(block, f"bn{i}", None)
            if conv is None:
                break
            pairs.append((conv, bn))
        return pairs

    def recognised_residual(self, block: nn.Module) -> bool:
        """One of this library's blocks (its forward is known), whose conv/BN
        pairs are the ones the forward computes."""
        if type(block).forward not in _RESIDUAL_FORWARDS:
            return False
        pairs = self._residual_pairs(block)
        return bool(pairs) and all(_foldable(c) and _is_bn(b) and self.bn_of.get(c) is b and _mask_after_bn(c, b)
                                   for c, b in pairs)

    def residual(self, block: nn.Module) -> nn.Module:
        pairs = self._residual_pairs(block)
        convs, src = [], None
        for k, (conv, bn) in enumerate(pairs):
            a, src = self.conv(conv, bn, k < len(pairs) - 1, src)
            convs.append(a)
        ds = getattr(block, "downsample", None)
        if ds is None:
            accel_ds = None
        elif _plain_sequential(ds):
            accel_ds, _ = self.sequential(ds, None)
        else:
            accel_ds = self.generic(ds)
        return AccelResidual(convs, accel_ds)

    def generic(self, module: nn.Module) -> nn.Module:
        """Convert an unrecognised module: sequentials and residual blocks are
        replaced; anything else is copied with its children converted."""
        if id(module) in self.folded:
            return nn.Identity()
        if _plain_sequential(module):
            return self.sequential(module)[0]
        if self.recognised_residual(module):
            return self.residual(module)
        return self.children_of(module)

    def children_of(self, module: nn.Module) -> nn.Module:
        """A shallow copy of ``module`` whose children are converted; it runs
        its own forward, so its convs run one by one (no ReLU fused, no in-mask)."""
        if isinstance(module, ArchitectureControl) or not list(module.children()):
            return copy.deepcopy(module)
        new = copy.copy(module)
        new._modules = dict(module._modules)
        new._parameters = dict(module._parameters)
        new._buffers = dict(module._buffers)
        alone = []
        for name, child in module.named_children():
            if id(child) in self.folded:
                new._modules[name] = nn.Identity()
            elif _foldable(child) and _mask_after_bn(child, self.bn_of.get(child)):
                new._modules[name], _ = self.conv(child, self.bn_of.get(child), False, None)
                if isinstance(child, GatedConv2d):
                    alone.append(child)
            else:
                if _foldable(child):  # a gated conv whose output a plain BN reads: the pair stays as it is
                    self.summary.kept.append((self.names.get(child, name), "gated conv followed by a BN that is not "
                                              "its GatedBatchNorm2d: BN would shift its deselected channels"))
                new._modules[name] = self.generic(child)
        if alone:
            lost = [self.names.get(c, "") for c in alone if c.in_mask_source is not None]
            why = (f"{type(module).__name__} runs its own forward, so its gated convs "
                   f"({', '.join(self.names.get(c, '') for c in alone)}) run one by one: ReLU is not fused into the "
                   f"kernel, and no in-mask is passed"
                   + (f" (decouple chained {', '.join(lost)}: those read every input channel here)" if lost else "")
                   + ". Same function, less skipping; an nn.Sequential or this library's BasicBlock/Bottleneck "
                     "keeps both.")
            self.summary.own_forward.append((self.names.get(module, ""), why))
        return new


def accelerate(model: nn.Module, *, use_kernel: bool = True, verbose: bool = False,
               dtype: Optional[torch.dtype] = None, channels_last: bool = False, executor: str = "eager",
               tune: Optional[torch.Tensor] = None) -> nn.Module:
    """An inference module computing ``model``'s eval function with gated kernels.

    Args:
        model: a decoupled model (``pydecouple.nn.decouple`` / ``models.build(...,
            decoupled=True)``) or a dense one (then: BN folded, plain convs).
            Not modified.
        use_kernel: False keeps the folding and the gates but runs every conv
            dense and multiplies by the mask (the "masked dense" comparison).
        verbose: print the summary (it is always logged and kept as
            ``accel.accelerate_summary``).
        dtype: run in this dtype (``torch.bfloat16``: the CPU kernel's
            bfloat16 path, float32 accumulation). Weights are rounded once
            from the folded float32 values; the gates' MLPs stay float32 and
            read the mean of their input in float32, so a mask differs from
            the float32 model's only where a logit lies within the rounding
            of the activations from 0. Inputs are cast on entry and the
            logits returned in the input's dtype.
        channels_last: run in channels_last memory format (inputs converted
            on entry), oneDNN's fast layout for bfloat16.
        executor: ``"eager"`` (the modules run in Python) or ``"trace"``
            (each input signature is traced once with ``torch.jit.trace`` and
            replayed: no Python between layers; 1.2-1.6x faster at batch 1 on
            small networks, see :class:`~.modules.AccelEntry` for when it
            falls back to eager). Eager is the default because
            ``torch.jit.trace`` is deprecated in torch 2.13.
        tune: an example batch (N, C, H, W): each gated layer's
            dense-or-kernel crossover is measured on this machine for inputs
            of its size and batch, or read from the per-machine cache
            (:func:`~pydecouple.accelerate.tuning.tune`, which also tunes
            several batch sizes). Without it, a rule fitted on one CPU
            (:func:`pydecouple._backend.gating_threshold`) decides.

    Returns:
        A new ``nn.Module`` in eval mode whose parameters do not require grad.
        Its logits equal ``model.eval()(x)`` within float32 rounding. Gates
        forced open on the model (``set_gates_open``) stay open. Forward hooks
        of ``model`` are not carried over (the decoupled model's mask-chain
        hooks are not needed: masks travel as values). A backend pinned with
        ``PYDECOUPLE_BACKEND`` is read here, once, and pinned on every layer.

    Converted: ``nn.Sequential`` conv(-BN)(-ReLU) chains (VGG), this library's
    residual blocks (basic and bottleneck), and any conv with the BN its
    forward feeds (read from the traced forward: post- and pre-activation
    blocks alike). Modules with a forward of their own (a user's residual
    block) keep it: their convs are folded and gated, but run without ReLU
    fusion or in-masks; ``accel.accelerate_summary`` names them, and the log
    says so. ``torch.jit.script`` is not supported (an error says so); use
    ``torch.jit.trace``, ``torch.export`` or ``torch.compile``.
    """
    if executor not in AccelEntry.EXECUTORS:
        raise ValueError(f"accelerate: argument 'executor' must be one of {AccelEntry.EXECUTORS}, got {executor!r}")
    pinned = "dense" if not use_kernel else (_backend.requested() or _backend.AUTO)
    for p in model.parameters():
        if not p.is_cpu:
            # Ask the dispatcher now what it can run on this device (imports
            # included), so that a torch.compile trace of the forward meets
            # cached answers only.
            _backend.explain(p)
        break
    if dtype == torch.bfloat16 and all(p.is_cpu for p in model.parameters()) and not isa.has_bfloat16_dot():
        warnings.warn("accelerate(dtype=torch.bfloat16): this CPU has no bfloat16 dot product (neither AVX512_BF16 "
                      f"nor AMX; features: {','.join(isa.cpu_info()['features']) or 'none'}), so bfloat16 is widened "
                      "to float32 in every conv, dense ones included, and runs slower than float32 here: leave "
                      "dtype=None for speed", stacklevel=2)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            conv = _Converter(model)
            accel = conv.generic(model)
    finally:
        model.train(was_training)
    accel.eval()
    for p in accel.parameters():
        p.requires_grad_(False)
    for _, m in accel_layers(accel):
        m.backend = pinned
    # A gated layer whose output the next gated layer reads hands it its channel means.
    link_gate_means(accel)
    # Hooks of the decoupled model (its MaskChain) are not needed: masks travel as values.
    for m in accel.modules():
        m._forward_hooks = type(m._forward_hooks)()
        m._forward_pre_hooks = type(m._forward_pre_hooks)()
    summary = conv.summary
    if dtype is not None or channels_last or executor != "eager":
        accel = AccelEntry(accel, dtype, channels_last, executor)
    object.__setattr__(accel, "accelerate_summary", summary)
    log.info("%s", summary)
    for name, why in summary.own_forward:
        log.warning("accelerate: %s: %s", name or type(model).__name__, why)
    if verbose:
        print(summary)
    if tune is not None:
        from .tuning import tune as tune_layers

        report = tune_layers(accel, tune)
        if verbose:
            print(report.table())
    return accel
