"""What a model's forward does with its convs and BNs, read from a torch.fx trace.

``decouple`` and ``accelerate`` need two facts that attribute names and
registration order do not give (a pre-activation block registers ``bn1``
before ``conv1`` and normalises its *input* with it):

* which BatchNorm normalises a conv's output: the BN is the only reader of
  that output, and has the conv's width (:attr:`Dataflow.bn_of`);
* which module's output reaches a conv through zero-preserving operations
  only (ReLU, pooling, dropout, identity): if that module's output is masked,
  the conv's input channels are zero where the mask is off, so the mask can
  be the conv's in-mask (:attr:`Dataflow.upstream`).

Both are read from the graph ``torch.fx`` traces symbolically, with convs,
BNs and gates as leaves. A model whose forward cannot be traced (data-dependent
control flow, say) gets ``traced=False`` and the reason; callers then fall back
to rules that do not need the trace and say so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .gate import ArchitectureControl

__all__ = ["Dataflow", "ZERO_PRESERVING", "trace_dataflow"]

# Modules that map a channel that is all zero to zero (per sample): a mask that
# zeroes channels upstream still holds after them.
ZERO_PRESERVING = (nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                   nn.Dropout, nn.Dropout2d, nn.Identity)
_ZERO_PRESERVING_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.max_pool2d, F.avg_pool2d,
                              F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout, F.dropout2d,
                              torch.max_pool2d}
_ZERO_PRESERVING_METHODS = {"relu", "relu_", "contiguous"}


@dataclass
class Dataflow:
    """Facts about a model's forward, by qualified module name.

    ``bn_of``: conv -> the BatchNorm2d that alone reads its output and has its
    width. ``upstream``: conv -> the module whose output reaches the conv's
    input through zero-preserving operations only (None where anything else
    does: an addition, a concatenation, the model's input). ``calls``: how
    often the forward calls each module (a module called twice is paired with
    nothing and chained to nothing).
    """

    traced: bool
    reason: str = ""
    bn_of: Dict[str, str] = field(default_factory=dict)
    upstream: Dict[str, Optional[str]] = field(default_factory=dict)
    calls: Dict[str, int] = field(default_factory=dict)


class _Tracer(torch.fx.Tracer):
    """Convs, BNs and gates are leaves (their own forwards are what they are,
    and a gated conv's has Python control flow); containers are traced into."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm, ArchitectureControl)):
            return True
        return super().is_leaf_module(m, qualname)


def _zero_preserving(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), ZERO_PRESERVING)
    if node.op == "call_function":
        return node.target in _ZERO_PRESERVING_FUNCTIONS
    if node.op == "call_method":
        return node.target in _ZERO_PRESERVING_METHODS
    return False


def _source(node: torch.fx.Node, modules: Dict[str, nn.Module]) -> Optional[str]:
    """The module whose output ``node`` is, through zero-preserving operations."""
    while _zero_preserving(node, modules):
        arg = node.args[0] if node.args else node.kwargs.get("input")
        if not isinstance(arg, torch.fx.Node):
            return None
        node = arg
    return node.target if node.op == "call_module" else None


def trace_dataflow(model: nn.Module) -> Dataflow:
    """Trace ``model``'s forward symbolically (nothing is computed) and read
    the conv/BN pairs and zero-preserving paths from it."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # fx raises many types (TraceError, TypeError, NotImplementedError, ...)
        return Dataflow(False, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
    modules = dict(model.named_modules())
    flow = Dataflow(True)
    for node in graph.nodes:
        if node.op == "call_module":
            flow.calls[node.target] = flow.calls.get(node.target, 0) + 1
    for node in graph.nodes:
        if node.op != "call_module" or flow.calls[node.target] != 1:
            continue
        mod = modules.get(node.target)
        if not isinstance(mod, nn.Conv2d):
            continue
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and flow.calls[users[0].target] == 1:
            bn = modules.get(users[0].target)
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.num_features == mod.out_channels \
                    and users[0].args and users[0].args[0] is node:
                flow.bn_of[node.target] = users[0].target
        arg = node.args[0] if node.args else node.kwargs.get("input")
        flow.upstream[node.target] = _source(arg, modules) if isinstance(arg, torch.fx.Node) else None
    return flow
