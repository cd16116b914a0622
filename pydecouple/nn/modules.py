"""Gated modules: a conv that predicts its own per-sample filter mask, the BN
that applies it, and the blocks they make.

How a mask reaches the layers (the contract ``pydecouple.accelerate`` codes against)
----------------------------------------------------------------------------------

* Each :class:`GatedConv2d` owns an ACM, ``conv.gate``
  (:class:`~pydecouple.nn.ArchitectureControl`), which predicts the gate from
  the conv's *input*. Every forward stores ``conv.gate.last_gate`` (N, Cout
  float), ``conv.gate.last_mask`` (N, Cout bool) and ``conv.last_in_mask``
  (the in-mask used, or None).
* Where the conv is followed by a BatchNorm (conv-BN-ReLU chains, ResNet
  blocks), the mask is *applied* by the :class:`GatedBatchNorm2d` that follows
  (``bn.gated_conv`` is the conv): ``out = BN(conv(x)) * gate``. For a binary or
  non-negative gate, ``ReLU(BN(.)) * m == ReLU(BN(.) * m)``, so this is the paper's
  ``m * ReLU(BN(conv(X)))`` for VGG blocks and "m2 after BN, before the
  residual add" for ResNet blocks, with the dense model's code unchanged.
  A conv without a following BN applies the gate itself (``conv.apply_gate``).
* In-masks are passed explicitly: ``decouple`` sets ``conv.in_mask_source``, the
  upstream :class:`GatedConv2d` whose masked output reaches this conv's input
  through zero-preserving operations only (ReLU, pooling, dropout; read from
  the traced forward, :mod:`pydecouple.nn.graph`), or None. A :class:`MaskChain`,
  shared by all gated convs of a decoupled model, holds the masks of the
  current forward: a forward pre-hook on the model's root opens it, each gated
  conv stores its eval mask there, its consumer reads it, and a forward hook
  clears it. A gated conv called outside the root's forward finds no mask and
  uses ``in_mask=None``, which is still exact (the skipped channels are zero
  anyway); the in-mask only saves work.
* Eval: ``gated_conv2d(x, weight, bias, out_mask=gate.last_mask,
  in_mask=<upstream mask>)``; the BN then runs on that and multiplies by the mask
  again (BN would turn the zeroed channels into its bias). After BN folding,
  conv + BN + ReLU + mask is ``gated_conv2d(..., relu=True)`` exactly.
* Training: dense PyTorch ops, multiplied by the SemHash gate (gradients reach
  the ACM through the straight-through estimator).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn

from .gate import ArchitectureControl

__all__ = [
    "MaskChain", "GatedConv2d", "GatedBatchNorm2d", "ConvBNReLU", "GatedConvBNReLU",
    "BasicBlock", "Bottleneck", "GatedBasicBlock", "GatedBottleneck", "attach_chain",
]


class MaskChain:
    """The masks of the current forward of one decoupled model, by producer."""

    def __init__(self) -> None:
        self.active = False
        self.masks: Dict[int, torch.Tensor] = {}

    def begin(self) -> None:
        self.masks = {}
        self.active = True

    def end(self) -> None:
        self.masks = {}
        self.active = False

    def put(self, producer: nn.Module, mask: torch.Tensor) -> None:
        if self.active:
            self.masks[id(producer)] = mask

    def get(self, producer: Optional[nn.Module], batch: int) -> Optional[torch.Tensor]:
        if producer is None or not self.active:
            return None
        m = self.masks.get(id(producer))
        if m is None or m.shape[0] != batch:
            return None
        return m

    def __deepcopy__(self, memo):  # the masks of a forward are never copied
        return MaskChain()


def _chain_begin_hook(module: nn.Module, args) -> None:
    module._pydecouple_chain.begin()


def _chain_end_hook(module: nn.Module, args, output) -> None:
    module._pydecouple_chain.end()


def attach_chain(root: nn.Module) -> MaskChain:
    """Give ``root`` and all its gated convs one shared :class:`MaskChain`."""
    chain = MaskChain()
    object.__setattr__(root, "_pydecouple_chain", chain)
    root.register_forward_pre_hook(_chain_begin_hook)
    root.register_forward_hook(_chain_end_hook)
    for m in root.modules():
        if isinstance(m, GatedConv2d):
            object.__setattr__(m, "_chain", chain)
    return chain


class GatedConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose filters are chosen per sample by an ACM (``self.gate``).

    Same parameters and ``state_dict`` keys as ``nn.Conv2d``, plus ``gate.*``.
    ``apply_gate``: multiply the output by the gate here (True when no BN
    follows; a following :class:`GatedBatchNorm2d` applies it otherwise).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 apply_gate: bool = True, gate: Optional[ArchitectureControl] = None, **gate_kwargs) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode)
        self.gate = gate if gate is not None else ArchitectureControl(in_channels, out_channels, **gate_kwargs)
        self.apply_gate = apply_gate
        self.use_sparse_op = True
        object.__setattr__(self, "in_mask_source", None)
        object.__setattr__(self, "_chain", MaskChain())
        self.last_in_mask: Optional[torch.Tensor] = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, *, apply_gate: bool = True, **gate_kwargs) -> "GatedConv2d":
        """A gated conv sharing ``conv``'s parameters (no copy)."""
        g = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode, apply_gate=apply_gate, **gate_kwargs)
        g.weight = conv.weight
        g.bias = conv.bias
        g.gate.to(device=conv.weight.device)
        return g

    def set_in_mask_source(self, src: Optional["GatedConv2d"]) -> None:
        object.__setattr__(self, "in_mask_source", src)

    @property
    def last_mask(self) -> Optional[torch.Tensor]:
        return self.gate.last_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate(x)
        in_mask = self._chain.get(self.in_mask_source, x.shape[0])
        self.last_in_mask = in_mask
        if self.training or not self.use_sparse_op or self.padding_mode != "zeros" or self.gate.force_open:
            out = self._conv_forward(x, self.weight, self.bias)
            if self.apply_gate:
                if self.training or self.gate.record_pooled:
                    self.gate.last_pooled = out.mean(dim=(2, 3))
                out = out * g[:, :, None, None]
        else:
            from ..ops import gated_conv2d

            out = gated_conv2d(x, self.weight, self.bias, out_mask=self.gate.last_mask, in_mask=in_mask,
                               stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)
        self._chain.put(self, self.gate.last_mask)
        return out


class GatedBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that multiplies its output by its conv's gate.

    ``gated_conv``: the :class:`GatedConv2d` whose output it normalises (a plain
    reference, not a submodule). Also records ``gate.last_pooled``, the spatial
    mean of the unmasked output (N, C), for the KL loss.
    """

    def set_conv(self, conv: GatedConv2d) -> None:
        object.__setattr__(self, "gated_conv", conv)
        conv.apply_gate = False

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, conv: GatedConv2d) -> "GatedBatchNorm2d":
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        if bn.affine:
            new.weight, new.bias = bn.weight, bn.bias
        if bn.track_running_stats:
            new.running_mean, new.running_var, new.num_batches_tracked = bn.running_mean, bn.running_var, bn.num_batches_tracked
        new.train(bn.training)
        new.set_conv(conv)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        conv = getattr(self, "gated_conv", None)
        if conv is None:
            return out
        gate = conv.gate
        g = gate.last_gate
        if g is None or g.shape[0] != x.shape[0]:
            raise RuntimeError(self._not_run_message())
        if self.training or gate.record_pooled:
            gate.last_pooled = out.mean(dim=(2, 3))
        return out * g[:, :, None, None].to(out.dtype)

    def _not_run_message(self) -> str:
        bn, conv, traced = getattr(self, "_pydecouple_names", ("this GatedBatchNorm2d", "its conv", True))
        why = ("decouple paired them by registration order (the forward could not be traced), but the forward "
               "calls the BN first" if not traced else "the BN must run after its conv in every forward")
        return (f"GatedBatchNorm2d '{bn}' applies the gate of conv '{conv}', which has not run before it in this "
                f"forward (no gate for this batch): {why}. Keep that conv dense with "
                f"decouple(..., exclude=['{conv}']), or make the forward traceable by torch.fx so that decouple "
                f"pairs each BN with the conv whose output it normalises.")


class ConvBNReLU(nn.Sequential):
    """Dense conv(3x3, no bias) - BN - ReLU, the VGG block (children 0, 1, 2)."""

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, padding: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, kernel_size, stride, padding, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class GatedConvBNReLU(nn.Sequential):
    """Gated conv-BN-ReLU block: ``m * ReLU(BN(conv(X)))``, m predicted from X.

    Same ``state_dict`` keys as :class:`ConvBNReLU` (plus ``0.gate.*``). The ACM
    is also reachable as ``block.gate``.
    """

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, stride: int = 1, padding: int = 1,
                 **gate_kwargs) -> None:
        conv = GatedConv2d(cin, cout, kernel_size, stride, padding, bias=False, **gate_kwargs)
        bn = GatedBatchNorm2d(cout)
        bn.set_conv(conv)
        super().__init__(conv, bn, nn.ReLU(inplace=True))

    @property
    def gate(self) -> ArchitectureControl:
        return self[0].gate


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


def _downsample(cin: int, cout: int, stride: int) -> Optional[nn.Module]:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Dense ResNet basic block, torchvision's names (conv1, bn1, relu, conv2, bn2, downsample)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(cin, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))  # gated: m2 applied here, before the residual add
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """Dense ResNet bottleneck block (1x1, 3x3, 1x1), torchvision's names."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


def _gate_residual_block(block: nn.Module, gate_downsample: bool, **gate_kwargs) -> None:
    """Swap a residual block's conv/BN pairs for gated ones, in place, and chain
    the in-masks inside it (conv1 -> conv2 -> conv3)."""
    prev = None
    for i in (1, 2, 3):
        conv, bn = getattr(block, f"conv{i}", None), getattr(block, f"bn{i}", None)
        if conv is None:
            break
        g = GatedConv2d.from_conv(conv, **gate_kwargs)
        setattr(block, f"conv{i}", g)
        setattr(block, f"bn{i}", GatedBatchNorm2d.from_bn(bn, g))
        g.set_in_mask_source(prev)
        prev = g
    ds = getattr(block, "downsample", None)
    if gate_downsample and isinstance(ds, nn.Sequential) and len(ds) >= 2 and isinstance(ds[0], nn.Conv2d):
        g = GatedConv2d.from_conv(ds[0], **gate_kwargs)
        ds[0] = g
        ds[1] = GatedBatchNorm2d.from_bn(ds[1], g)


class GatedBasicBlock(BasicBlock):
    """Basic block with m1 after conv1-BN(-ReLU) and m2 after conv2-BN, before
    the residual add (as in the paper). ``gate_downsample`` also gates the 1x1 shortcut.
    ACMs: ``conv1.gate``, ``conv2.gate``; ``block.gate`` is the last one (m2)."""

    def __init__(self, cin: int, planes: int, stride: int = 1, gate_downsample: bool = False, **gate_kwargs) -> None:
        super().__init__(cin, planes, stride)
        _gate_residual_block(self, gate_downsample, **gate_kwargs)

    @property
    def gate(self) -> ArchitectureControl:
        return self.conv2.gate


class GatedBottleneck(Bottleneck):
    """Bottleneck with a gate after each conv-BN (the last before the residual add)."""

    def __init__(self, cin: int, planes: int, stride: int = 1, gate_downsample: bool = False, **gate_kwargs) -> None:
        super().__init__(cin, planes, stride)
        _gate_residual_block(self, gate_downsample, **gate_kwargs)

    @property
    def gate(self) -> ArchitectureControl:
        return self.conv3.gate
