"""``decouple(model)``: rewrite a CNN into its decoupled (gated) form, in place
or on a copy, keeping every weight.

Rules:

* Every ``nn.Conv2d`` becomes a :class:`GatedConv2d` sharing its parameters
  (same ``state_dict`` keys, plus ``<conv>.gate.*``), except: the network's first
  conv (METHOD.md), the 1x1 convs of residual shortcuts (``downsample`` /
  ``shortcut`` containers) unless ``gate_downsample=True``, names matched by
  ``exclude``, and convs whose ``padding_mode`` is not ``"zeros"``.
* A conv followed, among its parent's children, by a ``BatchNorm2d`` of the same
  width gets a :class:`GatedBatchNorm2d` that applies the mask after BN (see
  :mod:`pydecouple.nn.modules`); otherwise the conv applies it itself.
* In-masks: consecutive gated layers in an ``nn.Sequential`` linked only by
  zero-preserving modules (ReLU, pooling, dropout) are chained, and so are
  conv1 -> conv2 (-> conv3) inside residual blocks (any module with attributes
  ``conv1, bn1, conv2, bn2``: ours and torchvision's ``BasicBlock``/``Bottleneck``).

Registration order is assumed to be forward order for "a BN follows its conv",
which holds for ``nn.Sequential`` chains and torchvision-style blocks.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Tuple

import torch.nn as nn

from .gate import ArchitectureControl, gate_modules
from .modules import GatedBatchNorm2d, GatedConv2d, _gate_residual_block, attach_chain

__all__ = ["decouple", "DecoupleSummary", "is_decoupled", "set_gates_open"]

log = logging.getLogger(__name__)

_ZERO_PRESERVING = (nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                    nn.Dropout, nn.Dropout2d, nn.Identity)


@dataclass
class DecoupleSummary:
    gated: List[str] = field(default_factory=list)
    dense: List[Tuple[str, str]] = field(default_factory=list)  # (name, reason)
    chained: List[Tuple[str, str]] = field(default_factory=list)  # (consumer, producer)
    params_added: int = 0
    params_dense: int = 0

    def __str__(self) -> str:
        lines = [f"decouple: {len(self.gated)} conv layers gated, {len(self.dense)} kept dense; "
                 f"{self.params_added:,} parameters added to {self.params_dense:,} "
                 f"(+{100.0 * self.params_added / max(self.params_dense, 1):.1f}%)"]
        lines += [f"  dense: {n} ({why})" for n, why in self.dense]
        return "\n".join(lines)


def is_decoupled(model: nn.Module) -> bool:
    return any(isinstance(m, ArchitectureControl) for m in model.modules())


def set_gates_open(model: nn.Module, value: bool = True) -> None:
    """Force every gate of ``model`` on (the dense model's function), or release them."""
    for _, g in gate_modules(model):
        g.force_open = value


def _is_residual(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("conv1", "bn1", "conv2", "bn2")) and isinstance(getattr(m, "conv1"), nn.Conv2d)


def _link(module: nn.Module, src: Optional[GatedConv2d], summary: DecoupleSummary, names: dict) -> Optional[GatedConv2d]:
    """Set in-mask sources inside ``module`` given the producer whose mask zeroes
    its input (``src``); return the producer whose mask zeroes its output."""
    if isinstance(module, GatedBatchNorm2d):
        return getattr(module, "gated_conv", None)
    if isinstance(module, GatedConv2d):
        if src is not None and src.out_channels == module.in_channels and module.groups == 1:
            module.set_in_mask_source(src)
            summary.chained.append((names[module], names[src]))
        return module if module.apply_gate else None
    if isinstance(module, _ZERO_PRESERVING):
        return src
    if isinstance(module, nn.Sequential):
        for child in module:
            src = _link(child, src, summary, names)
        return src
    if _is_residual(module):
        for child in module.children():
            if not isinstance(child, (GatedConv2d, GatedBatchNorm2d)):
                _link(child, None, summary, names)
        for a, b in (("conv1", "conv2"), ("conv2", "conv3")):
            pa, cb = getattr(module, a, None), getattr(module, b, None)
            if isinstance(cb, GatedConv2d) and cb.in_mask_source is not None and pa is not None:
                summary.chained.append((names[cb], names[cb.in_mask_source]))
        return None
    for child in module.children():
        _link(child, None, summary, names)
    return None


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
            basic/bottleneck blocks (torchvision-style definitions included).
        inplace: modify ``model`` itself instead of a deep copy.
        gate_first: gate the network's first conv too (METHOD.md: never).
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
    """
    if is_decoupled(model):
        raise ValueError("decouple: the model already has gate modules (ArchitectureControl); decouple it once")
    if not inplace:
        model = copy.deepcopy(model)
    n_dense = sum(p.numel() for p in model.parameters())
    summary = DecoupleSummary(params_dense=n_dense)
    exclude = list(exclude)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("decouple: the model has no nn.Conv2d layer to gate")
    first = convs[0][0]

    def reason_dense(name: str, conv: nn.Conv2d) -> Optional[str]:
        if name == first and not gate_first:
            return "first conv of the network (METHOD.md)"
        parts = name.split(".")
        if not gate_downsample and any(p in ("downsample", "shortcut") for p in parts[:-1]):
            return "residual shortcut (gate_downsample=False)"
        if any(fnmatch.fnmatch(name, pat) for pat in exclude):
            return "excluded"
        if conv.padding_mode != "zeros":
            return f"padding_mode={conv.padding_mode!r}"
        return None

    # Residual blocks first, so their internal chains are set; then every other conv.
    handled = set()
    for name, m in list(model.named_modules()):
        if _is_residual(m):
            prefix = f"{name}." if name else ""
            block_convs = [f"{prefix}conv{i}" for i in (1, 2, 3) if isinstance(getattr(m, f"conv{i}", None), nn.Conv2d)]
            if any(reason_dense(c, getattr(m, c.rsplit(".", 1)[-1])) for c in block_convs):
                continue  # leave it to the generic pass
            _gate_residual_block(m, gate_downsample, **gate_kwargs)
            handled.update(block_convs)
            if gate_downsample and isinstance(getattr(m, "downsample", None), nn.Sequential):
                handled.add(f"{prefix}downsample.0")

    for parent_name, parent in list(model.named_modules()):
        children = list(parent.named_children())
        for i, (cname, child) in enumerate(children):
            full = f"{parent_name}.{cname}" if parent_name else cname
            if not isinstance(child, nn.Conv2d) or isinstance(child, GatedConv2d) or full in handled:
                continue
            why = reason_dense(full, child)
            if why:
                summary.dense.append((full, why))
                continue
            g = GatedConv2d.from_conv(child, **gate_kwargs)
            setattr(parent, cname, g)
            if i + 1 < len(children):
                nname, nxt = children[i + 1]
                if type(nxt) is nn.BatchNorm2d and nxt.num_features == child.out_channels:
                    setattr(parent, nname, GatedBatchNorm2d.from_bn(nxt, g))

    names = {m: n for n, m in model.named_modules()}
    for n, m in model.named_modules():
        if isinstance(m, GatedConv2d):
            summary.gated.append(n)
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and not isinstance(m, GatedConv2d) and n not in {d for d, _ in summary.dense}:
            summary.dense.append((n, reason_dense(n, m) or "not gated"))
    _link(model, None, summary, names)
    attach_chain(model)
    summary.params_added = sum(p.numel() for p in model.parameters()) - n_dense
    object.__setattr__(model, "decouple_summary", summary)
    log.info("%s", summary)
    if verbose:
        print(summary)
    return model
