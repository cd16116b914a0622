"""``decouple(model)``: rewrite a CNN into its decoupled (gated) form, in place
or on a copy, keeping every weight.

Rules:

* Every ``nn.Conv2d`` becomes a :class:`GatedConv2d` sharing its parameters
  (same ``state_dict`` keys, plus ``<conv>.gate.*``), except: the network's first
  conv (never, in the paper), the 1x1 convs of residual shortcuts (``downsample`` /
  ``shortcut`` containers) unless ``gate_downsample=True``, names matched by
  ``exclude``, and convs whose ``padding_mode`` is not ``"zeros"``.
* A conv whose function is not ``nn.Conv2d``'s (a subclass with its own
  ``forward``, forward hooks, parametrizations, state of its own) is refused
  with an error naming it: a gated conv computes ``F.conv2d`` with the conv's
  weight, and would silently drop that function. ``exclude`` keeps it dense,
  forward and all.
* Which BatchNorm normalises which conv's output, and which conv's input is a
  gated layer's masked output (through ReLU, pooling, dropout only), is read
  from the forward, traced with ``torch.fx`` (:mod:`pydecouple.nn.graph`), not
  from attribute names: pre-activation blocks (BN before conv) pair each BN
  with the conv it actually follows. A conv whose output a
  ``BatchNorm2d`` alone reads gets a :class:`GatedBatchNorm2d` that applies
  the mask after BN (see :mod:`pydecouple.nn.modules`); otherwise the conv
  applies it itself. Consumers of a gated layer's masked output are chained
  to it (``in_mask_source``).
* A model ``torch.fx`` cannot trace (data-dependent control flow, say) is
  converted by registration order instead: a conv followed, among its
  parent's children, by a ``BatchNorm2d`` of its width is paired with it, and
  in-masks are chained inside ``nn.Sequential`` only. A warning and the
  summary say so; a BN so paired that the forward runs before its conv raises
  a clear error at the first forward.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import warnings
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

import torch.nn as nn

from .gate import ArchitectureControl, gate_modules
from .graph import ZERO_PRESERVING, Dataflow, trace_dataflow
from .modules import GatedBatchNorm2d, GatedConv2d, attach_chain

__all__ = ["decouple", "DecoupleSummary", "is_decoupled", "set_gates_open"]

log = logging.getLogger(__name__)


@dataclass
class DecoupleSummary:
    gated: List[str] = field(default_factory=list)
    dense: List[Tuple[str, str]] = field(default_factory=list)  # (name, reason)
    chained: List[Tuple[str, str]] = field(default_factory=list)  # (consumer, producer)
    params_added: int = 0
    params_dense: int = 0
    notes: List[str] = field(default_factory=list)  # what could not be done as usual, and the consequence

    def __str__(self) -> str:
        lines = [f"decouple: {len(self.gated)} conv layers gated, {len(self.dense)} kept dense; "
                 f"{self.params_added:,} parameters added to {self.params_dense:,} "
                 f"(+{100.0 * self.params_added / max(self.params_dense, 1):.1f}%)"]
        lines += [f"  dense: {n} ({why})" for n, why in self.dense]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def is_decoupled(model: nn.Module) -> bool:
    return any(isinstance(m, ArchitectureControl) for m in model.modules())


def set_gates_open(model: nn.Module, value: bool = True) -> None:
    """Force every gate of ``model`` on (the dense model's function), or release them."""
    for _, g in gate_modules(model):
        g.force_open = value


def conv_function_of_its_own(conv: nn.Conv2d) -> Optional[str]:
    """Why ``conv`` computes something other than ``nn.Conv2d``'s function of
    its weight (None if it does not): what a gated conv, which runs
    ``F.conv2d`` on ``conv.weight``, would lose."""
    cls = type(conv)
    for attr in ("forward", "_conv_forward"):
        if getattr(cls, attr) is not getattr(nn.Conv2d, attr):
            return f"is a {cls.__name__}, an nn.Conv2d subclass with its own {attr}"
    if conv._forward_hooks or conv._forward_pre_hooks:
        return "has forward hooks (torch.nn.utils.weight_norm, say)"
    extra = [n for n, _ in conv.named_parameters(recurse=False) if n not in ("weight", "bias")]
    extra += [n for n, _ in conv.named_buffers(recurse=False)] + [n for n, _ in conv.named_children()]
    if extra:
        return f"is a {cls.__name__} with state of its own ({', '.join(extra)}; parametrizations, say)"
    return None


def _registration_order_flow(model: nn.Module, reason: str) -> Dataflow:
    """The pairs and chains that hold without a trace: a conv followed, among
    its parent's children, by a BN of its width (what the forward does in
    conv-BN-ReLU chains and torchvision-style blocks, not in pre-activation
    ones); zero-preserving paths only inside nn.Sequential, whose forward is
    its order."""
    flow = Dataflow(False, reason)
    for parent_name, parent in model.named_modules():
        prefix = f"{parent_name}." if parent_name else ""
        children = list(parent.named_children())
        for (cname, child), (nname, nxt) in zip(children, children[1:]):
            if isinstance(child, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d) \
                    and nxt.num_features == child.out_channels:
                flow.bn_of[prefix + cname] = prefix + nname

    def walk(module: nn.Module, name: str, src: Optional[str]) -> Optional[str]:
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
            if isinstance(module, nn.Conv2d):
                flow.upstream[name] = src
            return name
        if isinstance(module, ZERO_PRESERVING):
            return src
        prefix = f"{name}." if name else ""
        sequential = isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward
        for cname, child in module.named_children():
            out = walk(child, prefix + cname, src if sequential else None)
            src = out if sequential else None
        return src if sequential else None

    walk(model, "", None)
    return flow


def decouple(
    model: nn.Module,
    *,
    inplace: bool = False,
    gate_first: bool = False,
    gate_downsample: bool = False,
    exclude: Iterable[str] = (),
    verbose: bool = False,
    **gate_kwargs,
) -> nn.Module:
    """Return the decoupled form of ``model``: its conv layers gated by ACMs.

    Args:
        model: any ``nn.Module`` built from conv(-BN-ReLU) chains and residual
            blocks, post- or pre-activation (torchvision-style definitions
            included), whose convs compute ``nn.Conv2d``'s function.
        inplace: modify ``model`` itself instead of a deep copy.
        gate_first: gate the network's first conv too (the paper: never).
        gate_downsample: gate residual shortcut convs (``downsample``/``shortcut``).
        exclude: glob patterns of conv names to keep dense.
        verbose: print the summary (it is always logged and kept as
            ``model.decouple_summary``).
        **gate_kwargs: passed to every :class:`ArchitectureControl` (reduction,
            min_hidden, noise_std, init, bias_init, w2_std).

    Returns:
        The decoupled model. ``model.state_dict()`` of the dense model loads into
        it with ``strict=False`` and only ``*.gate.*`` keys missing; with
        :func:`set_gates_open` its outputs equal the dense model's.

    Raises:
        ValueError: the model is already decoupled, has no conv, or has a conv
            to gate whose function is not nn.Conv2d's (see the module's rules);
            nothing is modified then, even with ``inplace=True``.
    """
    if is_decoupled(model):
        raise ValueError("decouple: the model already has gate modules (ArchitectureControl); decouple it once")
    exclude = list(exclude)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("decouple: the model has no nn.Conv2d layer to gate")
    first = convs[0][0]

    def reason_dense(name: str, conv: nn.Conv2d) -> Optional[str]:
        if name == first and not gate_first:
            return "first conv of the network (never gated, as in the paper)"
        parts = name.split(".")
        if not gate_downsample and any(p in ("downsample", "shortcut") for p in parts[:-1]):
            return "residual shortcut (gate_downsample=False)"
        if any(fnmatch.fnmatch(name, pat) for pat in exclude):
            return "excluded"
        if conv.padding_mode != "zeros":
            return f"padding_mode={conv.padding_mode!r}"
        return None

    # Every refusal before any change (inplace=True included).
    dense = {n: reason_dense(n, m) for n, m in convs if reason_dense(n, m)}
    own = [(n, conv_function_of_its_own(m)) for n, m in convs if n not in dense and conv_function_of_its_own(m)]
    if own:
        listed = "; ".join(f"conv '{n}' {why}" for n, why in own)
        names = ", ".join(repr(n) for n, _ in own)
        raise ValueError(f"decouple: {listed}. A gated conv computes F.conv2d with the conv's weight and would lose "
                         f"that function. Keep such convs dense with decouple(..., exclude=[{names}]), or make "
                         f"them plain nn.Conv2d.")

    flow = trace_dataflow(model)
    if not flow.traced:
        flow = _registration_order_flow(model, flow.reason)
    if not inplace:
        model = copy.deepcopy(model)
    n_dense = sum(p.numel() for p in model.parameters())
    summary = DecoupleSummary(params_dense=n_dense)
    modules = dict(model.named_modules())

    def replace(name: str, new: nn.Module) -> None:
        parent, _, attr = name.rpartition(".")
        setattr(modules[parent] if parent else model, attr, new)
        modules[name] = new

    gated: Dict[str, GatedConv2d] = {}
    bn_conv: Dict[str, str] = {}  # GatedBatchNorm2d name -> its conv's name
    for name, conv in convs:
        if name in dense:
            summary.dense.append((name, dense[name]))
            continue
        g = GatedConv2d.from_conv(modules[name], **gate_kwargs)
        replace(name, g)
        gated[name] = g
        summary.gated.append(name)
        bn_name = flow.bn_of.get(name)
        if bn_name is not None and type(modules[bn_name]) is nn.BatchNorm2d:
            bn = GatedBatchNorm2d.from_bn(modules[bn_name], g)
            object.__setattr__(bn, "_pydecouple_names", (bn_name, name, flow.traced))
            replace(bn_name, bn)
            bn_conv[bn_name] = name

    # In-masks: a gated conv whose input is, through zero-preserving operations
    # only, the masked output of another gated layer reads that layer's mask.
    for name, g in gated.items():
        up = flow.upstream.get(name)
        src_name = bn_conv.get(up) if up in bn_conv else (up if up in gated and gated[up].apply_gate else None)
        src = gated.get(src_name) if src_name is not None else None
        if src is not None and src is not g and src.out_channels == g.in_channels and g.groups == 1 \
                and flow.calls.get(src_name, 1) == 1:
            g.set_in_mask_source(src)
            summary.chained.append((name, src_name))

    if not flow.traced:
        msg = (f"could not trace the forward with torch.fx ({flow.reason}): BatchNorms were paired with the conv "
               f"registered just before them and in-masks chained inside nn.Sequential only. If a BN so paired "
               f"runs before its conv (a pre-activation block), the first forward raises an error naming both; "
               f"then keep that conv dense with exclude=[...] or make the forward traceable.")
        summary.notes.append(msg)
        warnings.warn(f"decouple: {msg}", stacklevel=2)
    attach_chain(model)
    summary.params_added = sum(p.numel() for p in model.parameters()) - n_dense
    object.__setattr__(model, "decouple_summary", summary)
    log.info("%s", summary)
    if verbose:
        print(summary)
    return model
