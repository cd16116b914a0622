"""Accelerated inference: a decoupled model that runs only its paths.

``accelerate(model)`` turns a (trained) decoupled model into an inference-only
module computing the same function as the model's eval forward (masked dense
computation), but where every gated conv runs the gated kernel, so a sample
skips the filters its gate deselects and the input channels that arrive as
zeros:

* BatchNorm is folded into the conv before it (eval statistics): ``W' = W * s``,
  ``b' = (b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)``, computed
  in float64 and rounded once.
* Each gated conv computes its mask from its own input with its ACM, exactly as
  :class:`~pydecouple.nn.ArchitectureControl` does in eval (``logits > 0``).
* The conv runs with its own out-mask and, where the decoupled model chains one
  (``conv.in_mask_source``), the upstream layer's mask as in-mask.
* Bias, ReLU and mask are one fused epilogue (``relu=True``) where the block
  allows: VGG conv-BN-ReLU, the first (and for bottlenecks the second) conv of
  a residual block. The last conv of a residual block is folded conv + BN +
  mask without ReLU (the mask comes before the residual add); then the add and
  the ReLU. Shortcut channels are dense unless the shortcut is gated.
* Ungated convs are plain folded convs (PyTorch's ``F.conv2d``); pooling, the
  head and anything not recognised are kept as they are.

Masks travel as values (``(x, mask)`` pairs inside :class:`AccelSequential`),
never through hooks or module state, so the forward has no host
synchronisation on CUDA and traces with ``torch.compile(fullgraph=True)``.

Which implementation runs a gated conv (one function, :func:`gated_conv_infer`):
float32 CPU tensors go straight to the compiled kernel
``torch.ops.pydecouple.gated_conv2d_cpu`` (about 10 us of overhead instead of
the public op's Python dispatch), except where gating cannot pay
(:func:`pydecouple._backend.gating_pays`: nearly every channel kept), where
dense ``F.conv2d`` + ReLU + mask runs, so a model whose gates are all on is not
slower than its dense twin. That check reads two mask sums on the host, so it is
skipped while ``torch.compile`` traces (the kernel always runs there) and never
made on other devices. Everything else (CUDA, other dtypes, a backend forced
with ``PYDECOUPLE_BACKEND``) goes through :func:`pydecouple.ops.gated_conv2d`.

``profile(accel_model, x)`` times every layer's gate, conv and the rest.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import _backend
from .nn.gate import ArchitectureControl
from .nn.modules import GatedBatchNorm2d, GatedConv2d

__all__ = [
    "accelerate", "AccelConv", "AccelGate", "AccelSequential", "AccelResidual", "gated_conv_infer",
    "fold_bn", "profile", "LayerProfile", "ModelProfile", "accel_layers",
]

_ZERO_PRESERVING = (nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                    nn.Dropout, nn.Dropout2d, nn.Identity)


# ----------------------------------------------------------------------------- the one backend choice


def _cpu_kernel_usable() -> bool:
    return _backend.extension_available() and hasattr(torch.ops.pydecouple, "gated_conv2d_cpu")


def gated_conv_infer(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     out_mask: Optional[torch.Tensor], in_mask: Optional[torch.Tensor],
                     stride: List[int], pad4: List[int], dilation: List[int], groups: int, relu: bool,
                     use_kernel: bool = True, kept: Optional[float] = None) -> torch.Tensor:
    """``mask_out * act(conv(x * in_mask) + bias)``, by the cheapest route.

    The one place that chooses the implementation of an accelerated layer:

    * float32 CPU tensors with the extension built: the compiled kernel
      ``torch.ops.pydecouple.gated_conv2d_cpu`` directly, unless gating cannot
      pay (``kept = f_in * f_out`` above
      :func:`pydecouple._backend.gating_threshold`, the rule of
      :func:`pydecouple._backend.gating_pays`), where dense ``F.conv2d`` + ReLU +
      mask runs. ``kept`` may be given (the caller knows its masks' counts);
      else ``gating_pays`` computes it. Under ``torch.compile`` the host-side
      check is skipped and the kernel always runs.
    * anything else (CUDA, other dtypes, ``PYDECOUPLE_BACKEND`` set): the
      registered op behind :func:`pydecouple.ops.gated_conv2d`, whose
      dispatcher picks Triton / CUDA / reference without host synchronisation.

    ``use_kernel=False``: dense conv + mask always (the benchmark's "masked
    dense"). ``x``'s channels that ``in_mask`` turns off must already be zero
    (in an accelerated model they are: the producer's output is masked), so the
    dense route does not apply the in-mask.
    """
    if x.device.type == "cpu" and x.dtype == torch.float32 and _KERNEL_OK and _FORCED is None:
        if use_kernel:
            if torch.compiler.is_compiling():
                pays = True
            elif kept is not None:
                pays = _backend.kernel_pays(kept, x.shape[0], x.shape[2] * x.shape[3])
            else:
                pays = _backend.gating_pays(x, weight, out_mask, in_mask, groups)
            if pays:
                return torch.ops.pydecouple.gated_conv2d_cpu(x, weight, bias, out_mask, in_mask, stride, pad4,
                                                             dilation, groups, relu)
        return _dense_masked(x, weight, bias, out_mask, stride, pad4, dilation, groups, relu)
    if not use_kernel:
        return _dense_masked(x, weight, bias, out_mask, stride, pad4, dilation, groups, relu)
    from . import ops  # noqa: F401  (registers the op)

    return torch.ops.pydecouple.gated_conv2d(x, weight, bias, out_mask, in_mask, stride, pad4, dilation, groups, relu)


def _dense_masked(x, weight, bias, out_mask, stride, pad4, dilation, groups, relu):
    # x's channels that the in-mask turns off are already zero here (see above).
    return _backend.run_dense(x, weight, bias, out_mask, None, stride, pad4, dilation, groups, relu)


def _refresh_backend_state() -> None:
    """Read the environment once per :func:`accelerate` (and at import)."""
    global _KERNEL_OK, _FORCED
    _KERNEL_OK = _cpu_kernel_usable()
    _FORCED = _backend.requested()


_KERNEL_OK = False
_FORCED: Optional[str] = None
try:
    _refresh_backend_state()
except ValueError:  # a bad PYDECOUPLE_BACKEND must not break `import pydecouple`; accelerate() reports it
    pass

# Set by profile(): {id(layer): [(gate_s, conv_s, mask, in_mask) per call]}.
_PROFILE: Optional[Dict[int, list]] = None


def _count(mask: torch.Tensor) -> int:
    """Kept channels of a CPU bool mask (numpy: a third of ``int(mask.sum())``'s overhead)."""
    return int(np.count_nonzero(mask.numpy()))


# ----------------------------------------------------------------------------- BN folding


@torch.no_grad()
def fold_bn(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Weight and bias of ``bn(conv(x))`` as one conv (BN's running statistics).

    Computed in float64 and rounded once to the conv's dtype.
    """
    w = conv.weight.detach()
    b = conv.bias.detach() if conv.bias is not None else None
    if bn is None:
        return w.clone(), (b.clone() if b is not None else None)
    if not bn.track_running_stats or bn.running_mean is None:
        raise ValueError("accelerate: a BatchNorm2d without running statistics cannot be folded "
                         "(track_running_stats=False): its eval output depends on the batch")
    dt = w.dtype
    var = bn.running_var.double()
    mean = bn.running_mean.double()
    gamma = bn.weight.detach().double() if bn.affine else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.affine else torch.zeros_like(var)
    s = gamma / torch.sqrt(var + bn.eps)
    w2 = (w.double() * s.view(-1, 1, 1, 1)).to(dt)
    b0 = b.double() if b is not None else torch.zeros_like(mean)
    b2 = ((b0 - mean) * s + beta).to(dt)
    return w2.contiguous(), b2.contiguous()


# ----------------------------------------------------------------------------- modules


class AccelGate(nn.Module):
    """An ACM at inference: ``mask = fc2(relu(fc1(GAP(x)))) > 0`` (bool (N, Cout)).

    The same operations, in the same order, as ``ArchitectureControl.logits``,
    so masks are bit-identical to the decoupled model's for identical inputs.
    An eval-mode logit BatchNorm (``logit_norm=True``) is folded into fc2 in
    float64 (a mask can then differ only where a logit is within float32
    rounding of 0). An ACM of any other structure runs its own ``logits``.
    ``force_open``: every gate on (the ACM is not evaluated).
    """

    def __init__(self, acm: ArchitectureControl) -> None:
        super().__init__()
        self.out_channels = acm.out_channels
        self.force_open = bool(acm.force_open)
        norm = getattr(acm, "norm", None)
        children = {n for n, _ in acm.named_children()} - {"norm"}
        known = children <= {"fc1", "fc2"} and isinstance(getattr(acm, "fc1", None), nn.Linear) \
            and isinstance(getattr(acm, "fc2", None), nn.Linear) \
            and (norm is None or (isinstance(norm, nn.BatchNorm1d) and norm.track_running_stats
                                  and norm.running_mean is not None))
        self.acm: Optional[nn.Module] = None
        if not known:
            self.acm = copy.deepcopy(acm).eval()
            for p in self.acm.parameters():
                p.requires_grad_(False)
            return
        w1, b1 = acm.fc1.weight.detach().clone(), acm.fc1.bias.detach().clone()
        w2, b2 = acm.fc2.weight.detach().clone(), acm.fc2.bias.detach().clone()
        if norm is not None:
            var, mean = norm.running_var.double(), norm.running_mean.double()
            gamma = norm.weight.detach().double() if norm.affine else torch.ones_like(var)
            beta = norm.bias.detach().double() if norm.affine else torch.zeros_like(var)
            s = gamma / torch.sqrt(var + norm.eps)
            b2 = ((b2.double() - mean) * s + beta).to(b2.dtype)
            w2 = (w2.double() * s[:, None]).to(w2.dtype)
        self.w1 = nn.Parameter(w1, requires_grad=False)
        self.b1 = nn.Parameter(b1, requires_grad=False)
        self.w2 = nn.Parameter(w2.contiguous(), requires_grad=False)
        self.b2 = nn.Parameter(b2.contiguous(), requires_grad=False)

    def extra_repr(self) -> str:
        if self.force_open:
            return f"{self.out_channels} gates forced open"
        if self.acm is not None:
            return f"{self.out_channels} gates, the ACM's own logits"
        return f"{self.w1.shape[1]} -> {self.w1.shape[0]} -> {self.out_channels}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.force_open:
            return torch.ones(x.shape[0], self.out_channels, dtype=torch.bool, device=x.device)
        if self.acm is not None:
            return self.acm.logits(x) > 0
        z = x.mean(dim=(2, 3))
        return F.linear(F.relu(F.linear(z, self.w1, self.b1)), self.w2, self.b2) > 0


class AccelConv(nn.Module):
    """A folded conv (+BN) layer, gated or dense, with fused bias/ReLU/mask.

    ``run(x, in_mask, in_frac) -> (y, mask, frac)``: ``mask`` is this layer's
    out-mask when it is gated (the in-mask of a chained consumer), else None;
    ``frac`` its kept fraction where it was counted (eager CPU), else None.
    ``in_mask`` is used only if the decoupled model chained this conv to the
    layer that produced it (``uses_in_mask``). ``forward(x)`` returns ``y``
    only (for use outside an :class:`AccelSequential`).
    """

    def __init__(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], relu: bool, gated: bool,
                 uses_in_mask: bool, name: str = "") -> None:
        super().__init__()
        w, b = fold_bn(conv, bn)
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = nn.Parameter(b, requires_grad=False) if b is not None else None
        self.stride = [int(s) for s in conv.stride]
        self.dilation = [int(d) for d in conv.dilation]
        self.groups = int(conv.groups)
        pad = conv.padding
        if isinstance(pad, str):
            kh, kw = conv.kernel_size
            if pad == "valid":
                pad4 = [0, 0, 0, 0]
            else:
                th, tw = self.dilation[0] * (kh - 1), self.dilation[1] * (kw - 1)
                pad4 = [th // 2, th - th // 2, tw // 2, tw - tw // 2]
        else:
            pad4 = [int(pad[0]), int(pad[0]), int(pad[1]), int(pad[1])]
        self.pad4 = pad4
        self.relu = bool(relu)
        self.gate = AccelGate(conv.gate) if gated else None
        self.uses_in_mask = bool(uses_in_mask and gated)
        self.use_kernel = True
        self.name = name
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)

    def extra_repr(self) -> str:
        kind = "gated" if self.gate is not None else "dense"
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={tuple(self.stride)}, "
                f"padding={tuple(self.pad4)}, {kind}, relu={self.relu}, in_mask={self.uses_in_mask}")

    def _conv(self, x: torch.Tensor, mask: Optional[torch.Tensor], in_mask: Optional[torch.Tensor],
              in_frac: Optional[float]) -> Tuple[torch.Tensor, Optional[float]]:
        if mask is None:  # dense layer: PyTorch's conv (oneDNN on CPU)
            return _dense_masked(x, self.weight, self.bias, None, self.stride, self.pad4, self.dilation, self.groups,
                                 self.relu), None
        if not self.uses_in_mask:
            in_mask = in_frac = None
        frac = kept = None
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            # The kept fractions for the dense-or-gated rule: one count per mask
            # (a consumer reuses its producer's), on the host (CPU tensors only).
            frac = _count(mask) / mask.numel()
            kept = frac
            if in_mask is not None:
                kept *= in_frac if in_frac is not None else _count(in_mask) / in_mask.numel()
        # An all-on out-mask need not be applied (the dense route then skips the multiply).
        out_mask = None if frac == 1.0 else mask
        y = gated_conv_infer(x, self.weight, self.bias, out_mask, in_mask, self.stride, self.pad4, self.dilation,
                             self.groups, self.relu, self.use_kernel, kept)
        return y, frac

    def run(self, x: torch.Tensor, in_mask: Optional[torch.Tensor] = None, in_frac: Optional[float] = None
            ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[float]]:
        """``(y, mask, kept fraction of mask or None)`` for input ``x`` and the
        upstream mask (used only if this layer is chained to it)."""
        if _PROFILE is not None:
            return self._run_profiled(x, in_mask, in_frac)
        mask = self.gate(x) if self.gate is not None else None
        y, frac = self._conv(x, mask, in_mask, in_frac)
        return y, mask, frac

    def _run_profiled(self, x, in_mask, in_frac):
        t0 = time.perf_counter()
        mask = self.gate(x) if self.gate is not None else None
        t1 = time.perf_counter()
        y, frac = self._conv(x, mask, in_mask, in_frac)
        t2 = time.perf_counter()
        # Only the clock readings here; kept fractions are computed after the timed runs.
        _PROFILE.setdefault(id(self), []).append((t1 - t0, t2 - t1, mask, in_mask if self.uses_in_mask else None))
        return y, mask, frac

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[0]


class AccelSequential(nn.Module):
    """A chain of stages through which masks travel as values.

    ``kinds[i]``: ``"conv"`` (an :class:`AccelConv`: consumes and produces a
    mask), ``"pass"`` (zero-preserving: the mask goes through), ``"seq"`` (a
    nested :class:`AccelSequential`), or ``"other"`` (the mask stops).
    """

    def __init__(self, stages: Sequence[nn.Module], kinds: Sequence[str]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.kinds = list(kinds)

    def run(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, frac: Optional[float] = None
            ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[float]]:
        for kind, stage in zip(self.kinds, self.stages):
            if kind == "conv" or kind == "seq":
                x, mask, frac = stage.run(x, mask, frac)
            elif kind == "pass":
                x = stage(x)
            else:
                x = stage(x)
                mask = frac = None
        return x, mask, frac

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[0]

    def __getitem__(self, i: int) -> nn.Module:
        return self.stages[i]

    def __len__(self) -> int:
        return len(self.stages)


class AccelResidual(nn.Module):
    """A residual block (basic or bottleneck): conv1 (-> conv2) fused with ReLU,
    the last conv + BN + mask without ReLU, then ``relu(out + shortcut)``."""

    def __init__(self, convs: Sequence[AccelConv], downsample: Optional[nn.Module]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.downsample = downsample

    def run(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, frac: Optional[float] = None
            ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[float]]:
        return self.forward(x), None, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, m, f = x, None, None
        for conv in self.convs:
            out, m, f = conv.run(out, m, f)
        if self.downsample is None:
            identity = x
        elif isinstance(self.downsample, (AccelConv, AccelSequential)):
            identity = self.downsample.run(x)[0]
        else:
            identity = self.downsample(x)
        return torch.relu_(out.add_(identity))


# ----------------------------------------------------------------------------- conversion


def _is_residual(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("conv1", "bn1", "conv2", "bn2")) and isinstance(getattr(m, "conv1"), nn.Conv2d)


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


class _Converter:
    def __init__(self, root: nn.Module) -> None:
        self.names = {m: n for n, m in root.named_modules()}

    def conv(self, conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], relu: bool, src: Optional[nn.Module]
             ) -> Tuple[AccelConv, Optional[nn.Module]]:
        gated = isinstance(conv, GatedConv2d)
        uses_in = gated and conv.in_mask_source is not None and conv.in_mask_source is src
        a = AccelConv(conv, bn, relu, gated, uses_in, self.names.get(conv, ""))
        return a, (conv if gated else None)

    def sequential(self, seq: nn.Sequential, src: Optional[nn.Module] = None
                   ) -> Tuple[AccelSequential, Optional[nn.Module]]:
        children = list(seq)
        stages, kinds = [], []
        i = 0
        while i < len(children):
            c = children[i]
            if _foldable(c):
                bn = children[i + 1] if i + 1 < len(children) and _is_bn(children[i + 1]) \
                    and children[i + 1].num_features == c.out_channels else None
                j = i + 1 + (bn is not None)
                relu = j < len(children) and type(children[j]) is nn.ReLU
                if _mask_after_bn(c, bn):
                    a, src = self.conv(c, bn, relu, src)
                    stages.append(a)
                    kinds.append("conv")
                    i = j + (1 if relu else 0)
                    continue
            if isinstance(c, nn.Sequential):
                sub, src = self.sequential(c, src)
                stages.append(sub)
                kinds.append("seq")
            elif _is_residual(c):
                stages.append(self.residual(c))
                kinds.append("other")
                src = None
            elif isinstance(c, _ZERO_PRESERVING):
                stages.append(copy.deepcopy(c))
                kinds.append("pass")
            else:
                stages.append(self.generic(c))
                kinds.append("other")
                src = None
            i += 1
        return AccelSequential(stages, kinds), src

    def residual(self, block: nn.Module) -> nn.Module:
        pairs = []
        for i in (1, 2, 3):
            conv, bn = getattr(block, f"conv{i}", None), getattr(block, f"bn{i}", None)
            if conv is None:
                break
            pairs.append((conv, bn))
        ok = all(_foldable(c) and _is_bn(b) and _mask_after_bn(c, b) for c, b in pairs)
        ds = getattr(block, "downsample", None)
        if not ok or type(block).forward not in _RESIDUAL_FORWARDS:
            return self.children_of(block)
        convs, src = [], None
        for k, (conv, bn) in enumerate(pairs):
            a, src = self.conv(conv, bn, k < len(pairs) - 1, src)
            convs.append(a)
        if ds is None:
            accel_ds = None
        elif isinstance(ds, nn.Sequential):
            accel_ds, _ = self.sequential(ds, None)
        else:
            accel_ds = self.generic(ds)
        return AccelResidual(convs, accel_ds)

    def generic(self, module: nn.Module) -> nn.Module:
        """Convert the children of an unrecognised module in place (on a copy):
        sequentials and residual blocks are replaced; a conv followed (in
        registration order) by its BN is folded and the BN becomes Identity."""
        if isinstance(module, nn.Sequential):
            return self.sequential(module)[0]
        if _is_residual(module):
            return self.residual(module)
        return self.children_of(module)

    def children_of(self, module: nn.Module) -> nn.Module:
        """A shallow copy of ``module`` whose children are converted."""
        if isinstance(module, ArchitectureControl) or not list(module.children()):
            return copy.deepcopy(module)
        new = copy.copy(module)
        new._modules = dict(module._modules)
        new._parameters = dict(module._parameters)
        new._buffers = dict(module._buffers)
        children = list(module.named_children())
        skip = set()
        for i, (name, child) in enumerate(children):
            if name in skip:
                continue
            if _foldable(child):
                nxt = children[i + 1][1] if i + 1 < len(children) else None
                bn = nxt if _is_bn(nxt) and nxt.num_features == child.out_channels else None
                if _mask_after_bn(child, bn):
                    a, _ = self.conv(child, bn, False, None)
                    new._modules[name] = a
                    if bn is not None:
                        new._modules[children[i + 1][0]] = nn.Identity()
                        skip.add(children[i + 1][0])
                    continue
            new._modules[name] = self.generic(child)
        return new


def _residual_forwards():
    from .nn.modules import BasicBlock, Bottleneck

    return {BasicBlock.forward, Bottleneck.forward}


_RESIDUAL_FORWARDS = _residual_forwards()


def accelerate(model: nn.Module, *, use_kernel: bool = True) -> nn.Module:
    """An inference module computing ``model``'s eval function with gated kernels.

    Args:
        model: a decoupled model (``pydecouple.nn.decouple`` / ``models.build(...,
            decoupled=True)``) or a dense one (then: BN folded, plain convs).
            Not modified.
        use_kernel: False keeps the folding and the gates but runs every conv
            dense and multiplies by the mask (the "masked dense" comparison).

    Returns:
        A new ``nn.Module`` in eval mode whose parameters do not require grad.
        Its logits equal ``model.eval()(x)`` within float32 rounding. Gates
        forced open on the model (``set_gates_open``) stay open. Forward hooks
        of ``model`` are not carried over (the decoupled model's mask-chain
        hooks are not needed: masks travel as values). The backend choice reads
        ``PYDECOUPLE_BACKEND`` here, once.

    Recognised: ``nn.Sequential`` conv(-BN)(-ReLU) chains (VGG), residual blocks
    with the ``conv1, bn1, conv2, bn2[, conv3, bn3], downsample`` layout of
    :mod:`pydecouple.nn.modules` (basic and bottleneck), a conv followed by its
    BN among a module's children (a ResNet stem). Anything else is kept as is
    (deep-copied, in eval mode) and breaks the mask chain there.
    """
    _refresh_backend_state()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            accel = _Converter(model).generic(model)
    finally:
        model.train(was_training)
    accel.eval()
    for p in accel.parameters():
        p.requires_grad_(False)
    for m in accel.modules():
        if isinstance(m, AccelConv):
            m.use_kernel = use_kernel
    # Hooks of the decoupled model (its MaskChain) are not needed: masks travel as values.
    for m in accel.modules():
        m._forward_hooks = type(m._forward_hooks)()
        m._forward_pre_hooks = type(m._forward_pre_hooks)()
    object.__setattr__(accel, "_pydecouple_accelerated", True)
    return accel


def accel_layers(accel: nn.Module) -> List[Tuple[str, AccelConv]]:
    """Every :class:`AccelConv` of an accelerated model, in registration (forward) order."""
    return [(n, m) for n, m in accel.named_modules() if isinstance(m, AccelConv)]


# ----------------------------------------------------------------------------- profile


@dataclass
class LayerProfile:
    name: str
    gated: bool
    kept: float  # mean kept fraction f_in * f_out (1 for dense layers)
    gate_s: float  # per forward
    conv_s: float  # per forward (backend choice, kernel or dense conv, epilogue)


@dataclass
class ModelProfile:
    layers: List[LayerProfile] = field(default_factory=list)
    total_s: float = 0.0  # per forward, with the timers on
    batch: int = 0

    @property
    def gate_s(self) -> float:
        return sum(lay.gate_s for lay in self.layers)

    @property
    def conv_s(self) -> float:
        return sum(lay.conv_s for lay in self.layers)

    @property
    def other_s(self) -> float:
        """Everything outside the convs and gates: normalisation, pooling,
        residual adds and ReLUs, the head, Python between layers."""
        return max(self.total_s - self.gate_s - self.conv_s, 0.0)

    def rows(self) -> List[Dict[str, object]]:
        out = [dict(layer=lay.name, gated=lay.gated, kept=round(lay.kept, 3), gate_us=lay.gate_s * 1e6,
                    conv_us=lay.conv_s * 1e6, other_us=0.0) for lay in self.layers]
        out.append(dict(layer="(other)", gated=False, kept=1.0, gate_us=0.0, conv_us=0.0, other_us=self.other_s * 1e6))
        out.append(dict(layer="total", gated=False, kept=1.0, gate_us=self.gate_s * 1e6, conv_us=self.conv_s * 1e6,
                        other_us=self.other_s * 1e6))
        return out

    def table(self) -> str:
        lines = [f"{'layer':<24}{'gated':>6}{'kept':>7}{'gate us':>10}{'conv us':>10}{'other us':>10}"]
        for r in self.rows():
            lines.append(f"{r['layer']:<24}{'yes' if r['gated'] else '':>6}{r['kept']:>7.2f}{r['gate_us']:>10.1f}"
                         f"{r['conv_us']:>10.1f}{r['other_us']:>10.1f}")
        t = self.total_s or 1.0
        lines.append(f"shares of {self.total_s * 1e6:.0f} us: conv {100 * self.conv_s / t:.0f}%, "
                     f"gate {100 * self.gate_s / t:.0f}%, other {100 * self.other_s / t:.0f}%")
        return "\n".join(lines)


@torch.no_grad()
def profile(accel: nn.Module, x: torch.Tensor, repeats: int = 20, warmup: int = 3) -> ModelProfile:
    """Where an accelerated model's forward spends its time, per layer.

    Times each :class:`AccelConv`'s gate (GAP + ACM MLP + compare) and conv
    (kept-fraction count, backend choice, kernel or dense conv, fused epilogue)
    with the wall clock around each call, and the whole forward. Each figure is
    the median over ``repeats`` forwards (robust to a loaded machine); ``other``
    (pooling, residual adds, the head, Python between layers) is the median
    total minus the per-layer medians. Eager only (not under torch.compile); on
    CUDA the timers would need synchronisation, so this is a CPU tool.
    """
    global _PROFILE
    for _ in range(warmup):
        accel(x)
    totals = []
    recs: List[Dict[int, list]] = []
    try:
        for _ in range(repeats):
            _PROFILE = {}
            t0 = time.perf_counter()
            accel(x)
            totals.append(time.perf_counter() - t0)
            recs.append(_PROFILE)
    finally:
        _PROFILE = None
    prof = ModelProfile(total_s=statistics.median(totals), batch=int(x.shape[0]))
    for name, m in accel_layers(accel):
        calls = [r[id(m)] for r in recs if id(m) in r]
        if not calls:
            continue
        gate_s = statistics.median(sum(c[0] for c in per) for per in calls)
        conv_s = statistics.median(sum(c[1] for c in per) for per in calls)
        kept = []
        for _, _, mask, in_mask in calls[-1]:
            if mask is None:
                kept.append(1.0)
                continue
            fin = in_mask.float().mean(dim=1) if in_mask is not None else 1.0
            kept.append(float((fin * mask.float().mean(dim=1)).mean()))
        prof.layers.append(LayerProfile(m.name or name, m.gate is not None, sum(kept) / len(kept), gate_s, conv_s))
    return prof
