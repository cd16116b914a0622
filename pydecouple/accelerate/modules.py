"""The inference modules of an accelerated model.

Masks travel as values (``(x, mask, kept fraction, channel means)`` through
:meth:`AccelConv.run`, :class:`AccelSequential` and :class:`AccelResidual`),
never through hooks or module state, so the forward has no host
synchronisation on CUDA and traces with ``torch.compile(fullgraph=True)``,
``torch.export`` and ``torch.jit.trace``. Every conv, gated or dense, runs
through the one dispatcher, :func:`pydecouple._backend.run`.

Observers (the profiler, FLOPs counting) attach a ``probe`` to each
:class:`AccelConv` with :func:`probing`; a layer without one pays one
attribute test.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _backend
from ..geometry import conv_padding4
from ..nn.gate import ArchitectureControl
from .fold import fold_bn, fold_bn_into

__all__ = ["AccelConv", "AccelEntry", "AccelGate", "AccelResidual", "AccelSequential", "Probe", "accel_layers",
           "link_gate_means", "probing"]

# What travels between stages: (x, mask, kept fraction, channel means), each but x optional.
Flow = Tuple[torch.Tensor, Optional[torch.Tensor], Optional[float], Optional[torch.Tensor]]

# probe(layer, x, mask, in_mask, y, gate_seconds, conv_seconds), called after each run of a layer.
Probe = Callable[["AccelConv", torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor, float,
                  float], None]

_NO_SCRIPT = ("torch.jit.script is not supported for accelerated models: their forward passes masks between "
              "layers as Python values and chooses a kernel per call on the host. Use torch.jit.trace, "
              "torch.export or torch.compile, which are tested (tests/test_user_models.py, test_accelerate.py).")


class _NoScript:
    """``torch.jit.script`` calls ``__prepare_scriptable__`` on every submodule
    before compiling: the one place to refuse with a message that says why,
    instead of TorchScript's internal errors."""

    def __prepare_scriptable__(self):
        raise RuntimeError(_NO_SCRIPT)


class AccelGate(_NoScript, nn.Module):
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
            w2, b2 = fold_bn_into(w2, b2, norm)
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

    def macs(self) -> int:
        """Multiply-adds per sample of the gate's MLP (0 when forced open or
        when the ACM's own module runs: its Linear layers are counted there)."""
        return 0 if self.force_open or self.acm is not None else self.w1.numel() + self.w2.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.force_open:
            return torch.ones(x.shape[0], self.out_channels, dtype=torch.bool, device=x.device)
        if self.acm is not None:
            return self.acm.logits(x) > 0
        # In float32 whatever x's dtype (the fused layer does the same in C++).
        z = x.mean(dim=(2, 3), dtype=torch.float32)
        return F.linear(F.relu(F.linear(z, self.w1, self.b1)), self.w2, self.b2) > 0


class AccelConv(_NoScript, nn.Module):
    """A folded conv (+BN) layer, gated or dense, with fused bias/ReLU/mask.

    ``run(x, in_mask, in_frac, x_means=...) -> (y, mask, frac, y_means)``:
    ``mask`` is this layer's out-mask when it is gated (the in-mask of a
    chained consumer), else None; ``frac`` its kept fraction where it was
    counted (eager CPU), else None. ``in_mask`` is used only if the decoupled
    model chained this conv to the layer that produced it
    (``uses_in_mask``). ``x_means``: x's channel means, where the layer that
    wrote x computed them (its gate then does not read x); ``y_means``: y's,
    where ``emit_means`` asks for them (:func:`link_gate_means` sets it on a
    layer whose consumer is a gated layer) and the fused layer ran, else
    None. ``forward(x)`` returns ``y`` only (for use outside an
    :class:`AccelSequential`).

    ``backend``: what the dispatcher is told (``'auto'``, or the backend
    :func:`~pydecouple.accelerate.accelerate` pinned: ``'dense'`` for
    ``use_kernel=False``, or ``PYDECOUPLE_BACKEND``'s at conversion).
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
        self.pad4 = list(conv_padding4(conv.padding, conv.kernel_size, self.dilation))
        self.relu = bool(relu)
        self.gate = AccelGate(conv.gate) if gated else None
        self.uses_in_mask = bool(uses_in_mask and gated)
        self.emit_means = False
        # Measured dense-or-kernel crossovers (tuning.tune): (H, W) -> [(batch,
        # dense_above)] sorted by batch; empty: the dispatcher's rule decides.
        self.crossovers: Dict[Tuple[int, int], List[Tuple[int, float]]] = {}
        self._crossover_of: Dict[Tuple[int, int, int], Optional[float]] = {}  # memo per (N, H, W)
        self.backend = _backend.AUTO
        self.probe: Optional[Probe] = None
        self.name = name
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size = tuple(conv.kernel_size)

    def extra_repr(self) -> str:
        kind = "gated" if self.gate is not None else "dense"
        pinned = "" if self.backend == _backend.AUTO else f", backend={self.backend!r}"
        means = ", emit_means=True" if self.emit_means else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={tuple(self.stride)}, "
                f"padding={tuple(self.pad4)}, {kind}, relu={self.relu}, in_mask={self.uses_in_mask}{means}{pinned}")

    def _conv(self, x: torch.Tensor, mask: Optional[torch.Tensor], in_mask: Optional[torch.Tensor],
              in_frac: Optional[float]) -> Tuple[torch.Tensor, Optional[float]]:
        if mask is None:  # a dense layer: the dispatcher sends it to PyTorch's conv
            return _backend.run(x, self.weight, self.bias, None, None, self.stride, self.pad4, self.dilation,
                                self.groups, self.relu, backend=self.backend), None
        if not self.uses_in_mask:
            in_mask = in_frac = None
        frac = kept = None
        if x.is_cpu and not _backend.capturing():
            # The kept fractions for the dense-or-kernel rule: one count per mask
            # (a consumer reuses its producer's), on the host, CPU tensors only.
            # Never while a graph is captured: the capture would freeze them.
            n = mask.numel()
            frac = kept = np.count_nonzero(mask.numpy()) / n if n else 1.0
            if in_mask is not None:
                kept *= in_frac if in_frac is not None else _backend.mask_fraction(in_mask)
        # An all-on out-mask need not be applied (the dense route then skips the
        # multiply); frac is None during a capture, so the mask stays in the graph.
        out_mask = None if frac == 1.0 else mask
        y = _backend.run(x, self.weight, self.bias, out_mask, in_mask, self.stride, self.pad4, self.dilation,
                         self.groups, self.relu, backend=self.backend, kept=kept, x_masked=True)
        return y, frac

    def set_crossover(self, height: int, width: int, batch: int, dense_above: float) -> None:
        """Run the kernel at kept fractions <= ``dense_above`` on inputs of
        ``height`` x ``width`` near ``batch`` (a measured crossover, see
        :func:`~pydecouple.accelerate.tuning.tune`), dense conv above."""
        rows = [r for r in self.crossovers.get((height, width), []) if r[0] != batch]
        self.crossovers[(height, width)] = sorted(rows + [(int(batch), float(dense_above))])
        self._crossover_of = {}

    def crossover_for(self, n: int, h: int, w: int) -> Optional[float]:
        """The measured crossover for a batch of ``n`` images of ``h`` x
        ``w``: that of the measured batch nearest to ``n`` in log scale; None
        where this image size was not measured (the rule then decides)."""
        key = (n, h, w)
        if key not in self._crossover_of:
            rows = self.crossovers.get((h, w))
            self._crossover_of[key] = (min(rows, key=lambda r: abs(math.log(max(n, 1) / r[0])))[1]
                                       if rows else None)
        return self._crossover_of[key]

    def gate_params(self) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The gate's (w1, b1, w2, b2) for the fused layer, or None where the
        gate is forced open or is an ACM of its own structure."""
        g = self.gate
        if g is None or g.force_open or g.acm is not None:
            return None
        return g.w1, g.b1, g.w2, g.b2

    def run(self, x: torch.Tensor, in_mask: Optional[torch.Tensor] = None, in_frac: Optional[float] = None,
            residual: Optional[torch.Tensor] = None, x_means: Optional[torch.Tensor] = None) -> Flow:
        """``(y, mask, kept fraction of mask or None, y's channel means or
        None)`` for input ``x`` and the upstream mask (used only if this layer
        is chained to it). With a ``residual`` (the last conv of a residual
        block): ``y = relu(y + residual)``, fused into the layer where it runs
        in one call. ``x_means``: x's channel means (float32 (N, C)), only
        from the layer that wrote x."""
        params = self.gate_params()
        if params is not None:
            # Gate, dense-or-kernel choice, conv and residual in one compiled
            # call where the dispatcher has one for this input.
            t0 = time.perf_counter() if self.probe is not None else 0.0
            dense_above = self.crossover_for(x.shape[0], x.shape[2], x.shape[3]) \
                if self.crossovers and x.dim() == 4 else None
            fused = _backend.run_gated_layer(x, in_mask if self.uses_in_mask else None, self.weight, self.bias,
                                             params, self.stride, self.pad4, self.dilation, self.groups,
                                             self.relu, residual, residual is not None, backend=self.backend,
                                             x_means=x_means, out_means=self.emit_means, dense_above=dense_above)
            if fused is not None:
                if self.probe is not None:  # one call: its time is the conv's, the gate's inside it
                    self.probe(self, x, fused[1], in_mask if self.uses_in_mask else None, fused[0], 0.0,
                               time.perf_counter() - t0)
                return fused[0], fused[1], None, fused[2]
        if self.probe is not None:
            y, mask, frac = self._run_probed(x, in_mask, in_frac)
        else:
            mask = self.gate(x) if self.gate is not None else None
            y, frac = self._conv(x, mask, in_mask, in_frac)
        if residual is not None:
            y = torch.relu_(y.add_(residual))
        return y, mask, frac, None

    def _run_probed(self, x, in_mask, in_frac):
        t0 = time.perf_counter()
        mask = self.gate(x) if self.gate is not None else None
        t1 = time.perf_counter()
        y, frac = self._conv(x, mask, in_mask, in_frac)
        t2 = time.perf_counter()
        self.probe(self, x, mask, in_mask if self.uses_in_mask else None, y, t1 - t0, t2 - t1)
        return y, mask, frac

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[0]


class AccelSequential(_NoScript, nn.Module):
    """A chain of stages through which masks (and channel means) travel as values.

    ``kinds[i]``: ``"conv"`` (an :class:`AccelConv`: consumes and produces a
    mask), ``"pass"`` (zero-preserving: the mask goes through; the channel
    means only through an ``nn.Identity``), ``"seq"`` (a nested
    :class:`AccelSequential`), ``"block"`` (an :class:`AccelResidual`: the
    mask stops, channel means go through), or ``"other"`` (both stop).
    """

    def __init__(self, stages: Sequence[nn.Module], kinds: Sequence[str]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.kinds = list(kinds)

    def run(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, frac: Optional[float] = None,
            means: Optional[torch.Tensor] = None) -> Flow:
        for kind, stage in zip(self.kinds, self.stages):
            if kind == "conv":
                x, mask, frac, means = stage.run(x, mask, frac, x_means=means)
            elif kind == "seq":
                x, mask, frac, means = stage.run(x, mask, frac, means)
            elif kind == "block":
                x, mask, frac, means = stage.run(x, None, None, means)
            elif kind == "pass":
                if not isinstance(stage, nn.Identity):
                    x, means = stage(x), None
            else:
                x = stage(x)
                mask = frac = means = None
        return x, mask, frac, means

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[0]

    def __getitem__(self, i: int) -> nn.Module:
        return self.stages[i]

    def __len__(self) -> int:
        return len(self.stages)


class AccelResidual(_NoScript, nn.Module):
    """A residual block (basic or bottleneck): conv1 (-> conv2) fused with ReLU,
    the last conv + BN + mask without ReLU, then ``relu(out + shortcut)``."""

    def __init__(self, convs: Sequence[AccelConv], downsample: Optional[nn.Module]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(convs)
        self.downsample = downsample

    def run(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, frac: Optional[float] = None,
            means: Optional[torch.Tensor] = None) -> Flow:
        """``(y, None, None, y's channel means or None)``: the block's output
        masks nothing (the shortcut fills every channel). ``means``: x's
        channel means, from the layer that wrote x."""
        if self.downsample is None:
            identity = x
        elif isinstance(self.downsample, (AccelConv, AccelSequential)):
            identity = self.downsample.run(x)[0]
        else:
            identity = self.downsample(x)
        out, m, f = x, None, None
        for conv in self.convs[:-1]:
            out, m, f, means = conv.run(out, m, f, x_means=means)
        # The last conv adds the shortcut and applies the block's ReLU in its
        # epilogue (mask before the add, as the decoupled block does).
        y, _, _, means = self.convs[-1].run(out, m, f, residual=identity, x_means=means)
        return y, None, None, means

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[0]


class AccelEntry(_NoScript, nn.Module):
    """An accelerated model run in another dtype and/or memory format, and/or
    through traced graphs: the input is converted on entry, the output
    returned in the input's dtype. Its parameters (but the gates') are in
    ``dtype``.

    ``executor="trace"``: each new input signature (shape, dtype, layout) is
    traced once with ``torch.jit.trace`` and later calls run the traced graph,
    so no Python runs between layers (resnet56 at batch 1 on Zen 4: 8.8 ms
    against 13.9 ms eager, docs/acceleration.md). The trace is safe here
    because nothing data-dependent is decided in Python while tracing: the
    fused layer chooses dense or kernel in C++ per call, and every other mask
    stays in the graph (:func:`pydecouple._backend.capturing`). The eager
    modules run instead when a probe is attached (profiling, FLOPs), under
    autocast, with grad enabled, or while an outer capture (torch.compile,
    torch.export, an outer trace) records the forward.
    """

    EXECUTORS = ("eager", "trace")
    MAX_TRACES = 8  # input signatures kept; the oldest is dropped beyond

    def __init__(self, inner: nn.Module, dtype: Optional[torch.dtype], channels_last: bool,
                 executor: str = "eager") -> None:
        super().__init__()
        if dtype is not None:
            if not dtype.is_floating_point or dtype == torch.float64:
                raise ValueError(f"accelerate: argument 'dtype' must be torch.float32, torch.bfloat16 or "
                                 f"torch.float16, got {dtype}")
            # Every module but the gates (and what they hold) goes to ``dtype``;
            # the gates' MLPs are never converted, so they keep their float32
            # values (their decisions are float32's; a round trip through
            # bfloat16 flipped 3-5% of the gates of trained digits models).
            in_gates = {id(sub) for g in inner.modules() if isinstance(g, AccelGate) for sub in g.modules()}
            to_dtype = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
            for m in inner.modules():
                if id(m) not in in_gates:
                    m._apply(to_dtype, recurse=False)
        if channels_last:
            # Weights in the input's layout too: oneDNN otherwise reorders an
            # NCHW weight on every call (3-9% of VGG16 at batch 32, Zen 4);
            # the CPU kernel packs from any strides.
            inner.to(memory_format=torch.channels_last)
        self.inner = inner
        self.dtype = dtype
        self.channels_last = bool(channels_last)
        self.executor = executor
        self._traces: "dict" = {}
        # The layers whose probes force the eager path, listed once (not walked on every call).
        self._layers = [m for m in inner.modules() if isinstance(m, AccelConv)]

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}, channels_last={self.channels_last}, executor={self.executor!r}"

    def _apply(self, fn, *args, **kwargs):
        self._traces = {}  # .to() / .float() / .cuda(): the traced graphs hold the old tensors
        return super()._apply(fn, *args, **kwargs)

    def _traced(self, x: torch.Tensor) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        if (self.executor != "trace" or torch.is_grad_enabled() or _backend.capturing()
                or torch._C._is_any_autocast_enabled()
                or any(m.probe is not None for m in self._layers)):
            return None
        key = (tuple(x.shape), x.dtype, x.device, x.is_contiguous(memory_format=torch.channels_last))
        fn = self._traces.get(key)
        if fn is None:
            with warnings.catch_warnings():
                # torch.jit.trace is deprecated in torch 2.13 (a DeprecationWarning per call), not removed.
                warnings.simplefilter("ignore")
                fn = torch.jit.trace(self.inner, x, check_trace=False)
            if len(self._traces) >= self.MAX_TRACES:
                self._traces.pop(next(iter(self._traces)))
            self._traces[key] = fn
        return fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        if self.dtype is not None and x.dtype != self.dtype:
            x = x.to(self.dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        traced = self._traced(x)
        out = traced(x) if traced is not None else self.inner(x)
        return out.to(in_dtype) if out.is_floating_point() and out.dtype != in_dtype else out


def _fused_gate(stage: nn.Module) -> Optional[AccelConv]:
    """``stage`` if it is a gated layer that runs fused (and so can take or
    give channel means), else None."""
    return stage if isinstance(stage, AccelConv) and stage.gate_params() is not None and stage.groups == 1 else None


def _ends(kind: str, stage: nn.Module, first: bool) -> Optional[AccelConv]:
    """The fused gated layer that reads ``stage``'s input first (``first``),
    or writes its output last; None if that is not one."""
    if kind == "conv":
        return _fused_gate(stage)
    if kind == "block":
        return _fused_gate(stage.convs[0] if first else stage.convs[-1])
    if kind == "seq":
        inner = [(k, s) for k, s in zip(stage.kinds, stage.stages) if not isinstance(s, nn.Identity)]
        return _ends(*(inner[0] if first else inner[-1]), first) if inner else None
    return None


def link_gate_means(accel: nn.Module) -> int:
    """Ask every fused gated layer whose output a fused gated layer reads
    next to return that output's channel means (``emit_means``), so that the
    consumer's gate does not read its input again. Returns the number of
    links. Run by :func:`~pydecouple.accelerate.accelerate`; a chain the
    modules do not see (a user's forward between two layers) is not linked."""
    links = 0
    for m in accel.modules():
        if isinstance(m, AccelResidual):
            pairs = [(a, b) for a, b in zip(m.convs[:-1], m.convs[1:])]
        elif isinstance(m, AccelSequential):
            inner = [(k, s) for k, s in zip(m.kinds, m.stages) if not isinstance(s, nn.Identity)]
            pairs = [(_ends(*a, first=False), _ends(*b, first=True)) for a, b in zip(inner[:-1], inner[1:])]
        else:
            continue
        for producer, consumer in pairs:
            if _fused_gate(producer) is not None and _fused_gate(consumer) is not None:
                producer.emit_means = True
                links += 1
    return links


def accel_layers(accel: nn.Module) -> List[Tuple[str, AccelConv]]:
    """Every :class:`AccelConv` of an accelerated model, in registration (forward) order."""
    return [(n, m) for n, m in accel.named_modules() if isinstance(m, AccelConv)]


@contextlib.contextmanager
def probing(accel: nn.Module, probe: Probe) -> Iterator[List[AccelConv]]:
    """Attach ``probe`` to every :class:`AccelConv` of ``accel`` for the
    duration of the block (the ones already attached come back after it);
    yields the layers."""
    layers = [m for _, m in accel_layers(accel)]
    before = [m.probe for m in layers]
    for m in layers:
        m.probe = probe
    try:
        yield layers
    finally:
        for m, p in zip(layers, before):
            m.probe = p
