"""Which implementation of ``gated_conv2d`` runs, and why not the others.

Each backend answers ``why_not(problem)``: ``None`` when it can run the problem,
else a sentence saying why not (device, dtype, missing build). The dispatcher
tries them in priority order for the problem's device. ``PYDECOUPLE_BACKEND``
(``reference``, ``dense``, ``cpu``, ``triton``, ``cuda``) forces one; a forced
backend that cannot run is an error listing its reason, never a silent fallback.

Automatic choice adds one rule on top of priority: where gating cannot pay
(most channels kept, see :func:`gating_threshold`) the ``dense`` backend runs,
which is PyTorch's own convolution followed by the mask.
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


# ----------------------------------------------------------------------------- backends


def _why_not_reference(x):
    return None


def _why_not_cpu(x):
    err = _load_extension()
    if err:
        return err
    if x.device.type != "cpu":
        return f"it runs on CPU tensors, and x is on {x.device}"
    if not hasattr(torch.ops.pydecouple, "gated_conv2d_cpu"):
        return "the extension was built without the CPU kernel"
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"it computes in float32 (float16/bfloat16 through float32), not {x.dtype}"
    return None


def _run_cpu(x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups, relu):
    dtype = x.dtype
    if dtype != torch.float32:
        # bfloat16/float16: gather and accumulate in float32, round once at the end.
        x, weight = x.float(), weight.float()
        bias = bias.float() if bias is not None else None
    out = torch.ops.pydecouple.gated_conv2d_cpu(
        x, weight, bias, out_mask, in_mask, list(stride), list(padding), list(dilation), groups, relu
    )
    return out.to(dtype) if dtype != torch.float32 else out


def _why_not_triton(x):
    try:
        from .kernels import gated_conv2d_triton  # noqa: F401
    except Exception as e:
        return f"Triton is not importable ({type(e).__name__}: {e})"
    if x.device.type == "cuda":
        return None
    if x.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "CPU tensors need Triton's interpreter (set TRITON_INTERPRET=1 before importing triton)"
    return f"it runs on CUDA tensors, and x is on {x.device}"


def _run_triton(*args):
    from .kernels import gated_conv2d_triton

    return gated_conv2d_triton(*args)


def _why_not_cuda(x):
    err = _load_extension()
    if err:
        return err
    if x.device.type != "cuda":
        return f"it runs on CUDA tensors, and x is on {x.device}"
    if not hasattr(torch.ops.pydecouple, "gated_conv2d_cuda"):
        return "the extension was built without CUDA (no CUDA build of PyTorch or no matching nvcc at build time)"
    return None


def _run_cuda(x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups, relu):
    return torch.ops.pydecouple.gated_conv2d_cuda(
        x, weight, bias, out_mask, in_mask, list(stride), list(padding), list(dilation), groups, relu
    )


def run_dense(x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups, relu):
    """PyTorch's own convolution, then the mask: the fallback where gating cannot
    pay. The same function as the reference, without its copies where a mask
    has nothing to do (the reference always re-writes x and the output).
    Whether a mask is all on is read on the CPU only (on CUDA it would sync)."""
    on_cpu = x.device.type == "cpu"
    if in_mask is not None and not (on_cpu and bool(in_mask.all())):
        x = torch.where(in_mask[:, :, None, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    top, bottom, left, right = padding
    if top == bottom and left == right:
        out = torch.nn.functional.conv2d(x, weight, bias, stride, (top, left), dilation, groups)
    else:
        x = torch.nn.functional.pad(x, (left, right, top, bottom))
        out = torch.nn.functional.conv2d(x, weight, bias, stride, 0, dilation, groups)
    if relu:
        out = out.relu_()
    if out_mask is not None and not (on_cpu and bool(out_mask.all())):
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
    def frac(m):
        if m is None or m.numel() == 0:
            return 1.0
        # numpy's count is a third of torch's sum-and-read overhead on a CPU bool tensor.
        kept = np.count_nonzero(m.numpy()) if m.device.type == "cpu" else int(m.sum())
        return kept / m.numel()

    return frac(in_mask) * frac(out_mask)


def gating_threshold(batch: int, hw: int) -> float:
    """The kept fraction f_in * f_out below which the CPU kernel beats oneDNN's
    dense convolution, from the crossover measured with
    benchmarks/bench_gated_conv.py (README, "CPU kernel"): with all channels
    kept the kernel runs at 0.5-0.9x of dense at batch 32 (at 0.4-0.7x on 4x4
    and 2x2 images, where its vectors carry discarded positions), at about
    0.6-1.8x at batch 1."""
    if batch <= 4:
        return 0.8
    if hw <= 16:
        return 0.45
    return 0.6


def kernel_pays(kept: float, batch: int, hw: int) -> bool:
    """Whether the CPU kernel is expected to beat dense conv at this kept fraction."""
    return kept <= gating_threshold(batch, hw)


def gating_pays(x, weight, out_mask, in_mask, groups) -> bool:
    """Whether the gathered kernel can beat dense conv on this problem (CPU)."""
    if out_mask is None and in_mask is None:
        return False
    return kernel_pays(kept_fraction(x, out_mask, in_mask), x.shape[0], x.shape[2] * x.shape[3])


def requested() -> Optional[str]:
    name = os.environ.get(ENV_VAR, "").strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {sorted(BACKENDS)}, got {name!r}")
    return name


def explain(x: torch.Tensor) -> List[Tuple[str, Optional[str]]]:
    """Every backend with the reason it cannot run ``x`` (None where it can)."""
    return [(name, b.why_not(x)) for name, b in BACKENDS.items()]


def choose(x, weight, out_mask, in_mask, groups) -> str:
    forced = requested()
    if forced is not None:
        why = BACKENDS[forced].why_not(x)
        if why is not None:
            raise RuntimeError(f"gated_conv2d: {ENV_VAR}={forced} was requested but cannot run: {why}")
        return forced
    if x.device.type == "cuda" and out_mask is None and in_mask is None:
        # Everything kept, known without reading a mask (no host sync): cuDNN.
        return "dense"
    order = PRIORITY.get(x.device.type, ("reference",))
    reasons = []
    for name in order:
        why = BACKENDS[name].why_not(x)
        if why is None:
            if name == "cpu" and not gating_pays(x, weight, out_mask, in_mask, groups):
                return "dense"
            return name
        reasons.append(f"{name}: {why}")
    raise RuntimeError("gated_conv2d: no backend can run this input:\n  " + "\n  ".join(reasons))


def run(x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups, relu):
    name = choose(x, weight, out_mask, in_mask, groups)
    return BACKENDS[name].run(x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups, relu)
