"""Which implementation of ``gated_conv2d`` runs, and why not the others: the
one dispatch point.

Every caller goes through :func:`run` (or asks :func:`choose` which backend
``run`` would take): the public op :func:`pydecouple.gated_conv2d`, its
registered form under autograd and ``torch.compile``, the accelerated
modules of :mod:`pydecouple.accelerate`, the benchmarks and the demo. No
other module calls a compiled kernel or restates the rule below.

Each backend answers ``why_not(x)``: ``None`` when it can run the problem,
else a sentence saying why not (device, dtype, missing build). The dispatcher
tries them in priority order for the problem's device. A caller pins one with
``backend=`` (``reference``, ``dense``, ``cpu``, ``triton``, ``cuda``);
``PYDECOUPLE_BACKEND`` pins one for every caller that does not. A pinned
backend that cannot run is an error listing its reason, never a silent
fallback.

Automatic choice adds one rule on top of priority: where gating cannot pay
(most channels kept, see :func:`gating_threshold`) the ``dense`` backend runs,
which is PyTorch's own convolution followed by the mask. That rule reads the
masks on the host, so it is made only on the CPU and never while a graph is
captured (``torch.compile``, ``torch.export``, ``torch.jit.trace``): a capture
would freeze the choice, and the kernel, which serves every kept fraction,
runs there instead.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from .reference import gated_conv2d_reference

ENV_VAR = "PYDECOUPLE_BACKEND"
AUTO = "auto"  # backend= value: the automatic choice, whatever PYDECOUPLE_BACKEND says


@dataclass
class Backend:
    name: str
    why_not: Callable[[torch.Tensor], Optional[str]]
    run: Callable[..., torch.Tensor]


_extension_error: Optional[str] = None
_extension_loaded = False


def _load_extension() -> Optional[str]:
    """Import the compiled library once; on failure say why once, and go on."""
    global _extension_loaded, _extension_error
    if not _extension_loaded:
        _extension_loaded = True
        try:
            from . import _C  # noqa: F401  (its import registers the C++ ops)
        except Exception as e:  # any import failure: a missing build, an ABI mismatch
            _extension_error = f"the compiled extension pydecouple._C did not load ({type(e).__name__}: {e})"
            warnings.warn(f"pydecouple: {_extension_error}; the reference implementation takes over", stacklevel=3)
    return _extension_error


def extension_available() -> bool:
    return _load_extension() is None


def autocast_args(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """What autocast does to F.conv2d's arguments: floating-point tensors other
    than float64 in the autocast dtype of x's device, so that a kernel sees one
    dtype (gated_conv2d is not on autocast's lists, so it does this itself).
    Unchanged where autocast is off for x's device."""
    dev = x.device.type
    if not torch.is_autocast_enabled(dev):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(dev)

    def cast(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in (torch.float64, dtype):
            return t.to(dtype)
        return t

    return cast(x), cast(weight), cast(bias)


def capturing() -> bool:
    """Whether a graph is being captured (torch.compile, torch.export,
    torch.jit.trace): no decision may then read a tensor's values, since the
    capture would freeze it."""
    return torch.compiler.is_compiling() or torch._C._is_tracing()


# ----------------------------------------------------------------------------- backends

# Whether each compiled kernel is in the build: fixed once the extension is
# loaded, and a lookup on torch.ops costs microseconds, so it is asked once.
_KERNEL_ABSENT = {
    "gated_conv2d_cpu": "the extension was built without the CPU kernel",
    "accel_conv_cpu": "the extension was built without the fused CPU layer",
    "gated_conv2d_cuda": "the extension was built without CUDA (no CUDA build of PyTorch or no matching nvcc at "
                         "build time)",
}
_kernel_missing: Dict[str, Optional[str]] = {}


def _missing(op: str) -> Optional[str]:
    """None if the compiled kernel ``op`` can be called, else why not."""
    if op not in _kernel_missing:
        err = _load_extension()
        _kernel_missing[op] = err or (None if hasattr(torch.ops.pydecouple, op) else _KERNEL_ABSENT[op])
    return _kernel_missing[op]


CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CPU_KERNEL: Optional[bool] = None  # whether the compiled CPU kernel can be called (asked once)


def _cpu_kernel() -> bool:
    global _CPU_KERNEL
    _CPU_KERNEL = _missing("gated_conv2d_cpu") is None
    return _CPU_KERNEL


def _why_not_reference(x):
    return None


def _why_not_cpu(x):
    err = _missing("gated_conv2d_cpu")
    if err:
        return err
    if x.device.type != "cpu":
        return f"it runs on CPU tensors, and x is on {x.device}"
    if x.dtype not in CPU_DTYPES:
        return f"it takes float32, bfloat16 or float16, not {x.dtype}"
    return None


def _run_cpu(x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups, relu):
    # float32, bfloat16 and float16 go in as they are: the kernel keeps
    # bfloat16 where the CPU has a bfloat16 dot product (float32
    # accumulation, one rounding), widens the rest, and returns x's dtype.
    return torch.ops.pydecouple.gated_conv2d_cpu(x, weight, bias, out_mask, in_mask, stride, padding, dilation,
                                                 groups, relu)


_triton_import: Dict[str, Optional[str]] = {}


def _triton_missing() -> Optional[str]:
    """Why the Triton kernels cannot be imported (None if they can), asked
    once: a traced forward then reads a cached value instead of an import."""
    if "error" not in _triton_import:
        try:
            from .kernels import gated_conv2d_triton  # noqa: F401
        except Exception as e:
            _triton_import["error"] = f"Triton is not importable ({type(e).__name__}: {e})"
        else:
            _triton_import["error"] = None
    return _triton_import["error"]


def _why_not_triton(x):
    err = _triton_missing()
    if err:
        return err
    if x.device.type == "cuda":
        return None
    if x.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 before importing triton)"
    return f"it runs on CUDA tensors, and x is on {x.device}"


def _run_triton(x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups, relu):
    if torch.compiler.is_compiling():
        # The launcher's host code is not for Dynamo to trace; the registered
        # op is opaque to it (it has a fake) and runs this backend at run time.
        return torch.ops.pydecouple.gated_conv2d(x, weight, bias, out_mask, in_mask, stride, padding, dilation,
                                                 groups, relu, "triton")
    from .kernels import gated_conv2d_triton

    return gated_conv2d_triton(x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups, relu)


def _why_not_cuda(x):
    err = _missing("gated_conv2d_cuda")
    if err:
        return err
    if x.device.type != "cuda":
        return f"it runs on CUDA tensors, and x is on {x.device}"
    return None


def _run_cuda(x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups, relu):
    return torch.ops.pydecouple.gated_conv2d_cuda(x, weight, bias, out_mask, in_mask, stride, padding, dilation,
                                                  groups, relu)


def run_dense(x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups, relu):
    """PyTorch's own convolution, then the mask: the fallback where gating cannot
    pay. The same function as the reference, without its copies where a mask
    has nothing to do (the reference always re-writes x and the output).
    Whether a mask is all on is read on the CPU only (on CUDA it would sync),
    and never during a capture (it would freeze "all on" into the graph)."""
    skip_all_on = x.device.type == "cpu" and not capturing()
    if in_mask is not None and not (skip_all_on and bool(in_mask.all())):
        x = torch.where(in_mask[:, :, None, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    top, bottom, left, right = padding
    if top == bottom and left == right:
        out = torch.nn.functional.conv2d(x, weight, bias, stride, (top, left), dilation, groups)
    else:
        x = torch.nn.functional.pad(x, (left, right, top, bottom))
        out = torch.nn.functional.conv2d(x, weight, bias, stride, 0, dilation, groups)
    if relu:
        out = out.relu_()
    if out_mask is not None and not (skip_all_on and bool(out_mask.all())):
        out = out.masked_fill_(~out_mask[:, :, None, None], 0)
    return out


BACKENDS: Dict[str, Backend] = {
    "reference": Backend("reference", _why_not_reference, gated_conv2d_reference),
    "dense": Backend("dense", _why_not_reference, run_dense),
    "cpu": Backend("cpu", _why_not_cpu, _run_cpu),
    "triton": Backend("triton", _why_not_triton, _run_triton),
    "cuda": Backend("cuda", _why_not_cuda, _run_cuda),
}

# Priority per device type for the automatic choice. Triton is not tried on CPU
# (the interpreter is a testing tool, not an implementation to choose).
PRIORITY: Dict[str, Tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("triton", "cuda", "reference"),
}


def kept_fraction(x: torch.Tensor, out_mask, in_mask) -> float:
    """Mean kept input fraction times mean kept output fraction (host-side, two
    reductions: cheap enough for every call; only used off the CUDA path)."""
    return mask_fraction(in_mask) * mask_fraction(out_mask)


def mask_fraction(m: Optional[torch.Tensor]) -> float:
    """Kept fraction of a mask (1 for None or an empty mask), read on the host."""
    if m is None or m.numel() == 0:
        return 1.0
    # numpy's count is a third of torch's sum-and-read overhead on a CPU bool tensor.
    kept = np.count_nonzero(m.numpy()) if m.device.type == "cpu" else int(m.sum())
    return kept / m.numel()


def gating_threshold(batch: int, hw: int, depth: int = 0, width: int = 0) -> float:
    """The kept fraction f_in * f_out at or below which the CPU kernel runs;
    above it the dispatcher runs dense conv and applies the mask.

    Fitted to ``benchmarks/bench_gated_conv.py`` (benchmarks/results/
    cpu_kernel*.csv, AMD Zen 4, 2 threads, 30 layer shapes of 64-768
    channels, float32 and bfloat16) and to the CIFAR ResNets' 16-64-channel
    layers (docs/acceleration.md): per layer, the kept fraction at which the
    pinned kernel falls to 0.85x of the best dense layout (dense conv + the
    mask it then needs costs about 1.15x dense), interpolated between f = 1,
    0.75, 0.5 and 0.25. Each value is at or below the smallest crossover of
    its class in either dtype; all kept (1.0) is always dense.

    - ``width`` (output channels) <= 16 at batch > 4: a sample's kept filters
      fill less than one 16-lane vector (kernel 0.6-0.85x of dense at f = 0.5);
      ``depth`` <= 32 at batch > 4 (a bottleneck's 1x1 expansions from 16-32
      channels): memory-bound, the kernel writes the whole output as dense
      does and saves only arithmetic (0.45-0.65x of dense at f = 0.25,
      float32; 0.55-0.86x bfloat16; resnet47_bottleneck's profile);
      <= 64, or images of 5x5-8x8: 0.5 (32-128-channel layers at batch 32
      cross at 0.5-0.62 since the kernel's 8-filter tail and one-unit
      groups, 2026-12-03: 1.04-1.41x of dense + mask at f = 0.5).
    - batch <= 4 (oneDNN is slow on small batches): images of <= 64
      positions 0.8 (crossovers 0.81-1.0); larger ones 0.6, and 0.45 for
      ``depth`` (C_in/groups x kh x kw) <= 128 or ``width`` <= 32, whose short
      dot products or narrow outputs do not amortise the weight gather.
    - batch > 4: the per-sample weight gather grows against the GEMM as the
      image shrinks: 2x2 0.13-0.16, 3x3 and 4x4 0.33-0.49, 5x5-8x8
      0.48-0.91, larger images 0.7-1.0 (depth <= 128: 0.49-0.81).
    """
    if batch <= 4:
        if hw <= 64:
            return 0.8
        return 0.45 if (0 < depth <= 128 or 0 < width <= 32) else 0.6
    if 0 < width <= 16 or 0 < depth <= 32:
        return 0.1
    if hw <= 4:
        return 0.12
    if hw <= 16:
        return 0.3
    if 0 < width <= 64 or hw <= 64:
        return 0.5
    return 0.45 if 0 < depth <= 128 else 0.65


def kernel_pays(kept: float, batch: int, hw: int, depth: int = 0, width: int = 0) -> bool:
    """Whether the CPU kernel is expected to beat dense conv at this kept fraction."""
    return kept <= gating_threshold(batch, hw, depth, width)


def gating_pays(x, weight, out_mask, in_mask, groups) -> bool:
    """Whether the gathered kernel can beat dense conv on this problem (CPU)."""
    if out_mask is None and in_mask is None:
        return False
    co, ci, kh, kw = weight.shape
    return kernel_pays(kept_fraction(x, out_mask, in_mask), x.shape[0], x.shape[2] * x.shape[3], ci * kh * kw, co)


def requested() -> Optional[str]:
    """The backend ``PYDECOUPLE_BACKEND`` pins, or None."""
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {sorted(BACKENDS)}, got {name!r}")
    return name


def check_backend(backend, arg: str = "backend") -> Optional[str]:
    """``backend`` as the dispatcher takes it: None (``PYDECOUPLE_BACKEND``, else
    automatic), ``'auto'`` or a backend's name; anything else is an error
    naming ``arg``."""
    if backend is None or (isinstance(backend, str) and (backend == AUTO or backend in BACKENDS)):
        return backend
    raise ValueError(f"gated_conv2d: argument '{arg}' must be None, {AUTO!r} or one of {sorted(BACKENDS)}, "
                     f"got {backend!r}")


def explain(x: Optional[torch.Tensor] = None) -> List[Tuple[str, Optional[str]]]:
    """Every backend with the reason it cannot run ``x`` (None where it can).
    Without ``x``: for a float32 CPU tensor."""
    if x is None:
        x = torch.empty(0)
    return [(name, b.why_not(x)) for name, b in BACKENDS.items()]


def choose(x, weight, out_mask, in_mask, groups, *, backend: Optional[str] = None,
           kept: Optional[float] = None) -> str:
    """The backend :func:`run` takes for this problem.

    ``backend``: None = the one ``PYDECOUPLE_BACKEND`` pins, else automatic;
    ``'auto'`` = automatic; a name = that one (an error if it cannot run).
    ``kept``: ``f_in * f_out`` where the caller has counted it (the
    accelerated modules do, once per mask); else it is counted here if the
    rule needs it.
    """
    how = "backend="
    if backend is None:
        backend, how = requested(), f"{ENV_VAR}="
    if backend is not None and backend != AUTO:
        spec = BACKENDS.get(backend)
        if spec is None:
            check_backend(backend)
        why = spec.why_not(x)
        if why is not None:
            raise RuntimeError(f"gated_conv2d: {how}{backend} was requested but cannot run: {why}")
        return backend
    if x.is_cpu and x.dtype in CPU_DTYPES and (_CPU_KERNEL if _CPU_KERNEL is not None else _cpu_kernel()):
        # The hot path of eager CPU inference (a layer's kernel can take 30 us
        # at batch 1): a few attribute reads, no device object, no extra call.
        if out_mask is None and in_mask is None:
            return "dense"
        if kept is None:
            if capturing():
                return "cpu"
            kept = kept_fraction(x, out_mask, in_mask)
        n, _, h, w = x.shape
        co, ci, kh, kw = weight.shape
        return "cpu" if kept <= gating_threshold(n, h * w, ci * kh * kw, co) else "dense"
    dev = x.device.type
    if dev == "cuda" and out_mask is None and in_mask is None:
        # Everything kept, known without reading a mask (no host sync): cuDNN.
        return "dense"
    reasons = []
    for name in PRIORITY.get(dev, ("reference",)):
        why = BACKENDS[name].why_not(x)
        if why is None:
            return name
        reasons.append(f"{name}: {why}")
    raise RuntimeError("gated_conv2d: no backend can run this input:\n  " + "\n  ".join(reasons))


def run(x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups, relu, *,
        backend: Optional[str] = None, kept: Optional[float] = None, x_masked: bool = False) -> torch.Tensor:
    """``out_mask * act(conv(x * in_mask) + bias)`` by the backend :func:`choose` picks.

    Arguments as the registered op takes them (batched ``x``, pairs, four-sided
    ``padding``), already checked; under autocast they are cast as F.conv2d's
    would be (:func:`autocast_args`). ``x_masked``: the caller guarantees that
    the channels ``in_mask`` turns off are already zero in ``x`` (the
    accelerated modules: the producer's output is masked), so ``in_mask`` only
    saves work and the dense route need not apply it.
    """
    if torch._C._is_any_autocast_enabled():
        # The accelerated modules' folded weights are float32; under autocast the
        # input arrives in its dtype from the previous layer (the op casts before its checks).
        x, weight, bias = autocast_args(x, weight, bias)
    name = choose(x, weight, out_mask, in_mask, groups, backend=backend, kept=kept)
    if x_masked and name == "dense":
        in_mask = None
    return BACKENDS[name].run(x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups, relu)


# ----------------------------------------------------------------------------- accelerated gated layers

_FUSED: Optional[bool] = None  # whether pydecouple::accel_conv_cpu can be called (asked once)


def run_gated_layer(x: torch.Tensor, in_mask: Optional[torch.Tensor], weight: torch.Tensor,
                    bias: Optional[torch.Tensor], gate: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                    stride, padding, dilation, groups: int, relu: bool, residual: Optional[torch.Tensor] = None,
                    residual_relu: bool = False, *, backend: Optional[str] = None,
                    x_means: Optional[torch.Tensor] = None, out_means: bool = False,
                    dense_above: Optional[float] = None
                    ) -> Optional[Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
    """An accelerated gated layer in one compiled call, where one can run it:
    the gate ``mask = W2 relu(W1 mean_hw(x) + b1) + b2 > 0`` (float32), the
    dense-or-kernel choice of :func:`gating_threshold` made in C++ from the
    counted masks, the conv with ``mask * relu?(conv + bias)`` and, with a
    residual, ``relu?(y + residual)``. Returns ``(y, mask, y_means)``, or
    None where the fused layer cannot run (not a CPU float tensor, grouped, a
    backend pinned that it is not): the caller then runs the gate and
    :func:`run`.

    ``gate``: (w1, b1, w2, b2) in float32. ``x``'s channels that ``in_mask``
    turns off must be zero (the producer's output is masked). ``x_means``:
    x's float32 channel means (N, C), where the layer that wrote x returned
    them: the gate then does not read x. ``out_means``: also return y's
    (else ``y_means`` is None), for the next layer's gate.
    ``dense_above``: the layer's measured crossover
    (:func:`pydecouple.accelerate.tune`), which replaces the rule's under
    automatic choice; a pinned backend ignores it.
    """
    global _FUSED
    if not x.is_cpu or x.dtype not in CPU_DTYPES or groups != 1 or x.dim() != 4:
        return None
    if _FUSED is None:
        _FUSED = _missing("accel_conv_cpu") is None
    if not _FUSED:
        return None
    if backend is None:
        backend = requested() or AUTO
    if backend == AUTO:
        if dense_above is None:
            n, _, h, w = x.shape
            co, ci, kh, kw = weight.shape
            dense_above = gating_threshold(n, h * w, ci * kh * kw, co)
    elif backend == "cpu":
        dense_above = 2.0  # the kernel for every kept fraction
    elif backend == "dense":
        dense_above = -1.0  # PyTorch's conv, then the mask
    else:
        return None
    if torch._C._is_any_autocast_enabled():
        x, weight, bias = autocast_args(x, weight, bias)
        if residual is not None:
            residual = residual.to(x.dtype)
    w1, b1, w2, b2 = gate
    y, mask, y_means = _call_fused(x, in_mask, weight, bias, w1, b1, w2, b2, list(stride), list(padding),
                                   list(dilation), relu, residual, residual_relu, dense_above, x_means, out_means)
    return y, mask, (y_means if out_means else None)


def _call_fused(*args):
    """The compiled fused layer (one name to observe it by, as BACKENDS' runs are)."""
    return torch.ops.pydecouple.accel_conv_cpu(*args)
