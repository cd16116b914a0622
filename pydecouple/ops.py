"""Public ops: ``gated_conv2d`` and its registration as ``torch.ops.pydecouple``.

Layering (a reader finds each level by name)::

    pydecouple.ops.gated_conv2d            argument checking and normalisation (this file)
      -> torch.ops.pydecouple.gated_conv2d   the registered op: fake impl, autograd
        -> pydecouple._backend.run           the one dispatcher: cpu / triton / cuda / dense / reference
          -> torch.ops.pydecouple.gated_conv2d_cpu   (C++, csrc/cpu)  and friends

The registered op always takes a batched input and explicit four-sided padding;
the Python function accepts everything ``F.conv2d`` accepts and maps it there.
Eager calls that need neither autograd nor a capture go from the checks
straight to the dispatcher (see :func:`gated_conv2d`).
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import _backend
from ._validate import normalize_conv_args
from .geometry import masks_to_indices, output_memory_format, output_size

__all__ = ["gated_conv2d", "masks_to_indices"]

IntOrPair = Union[int, Sequence[int]]


def _gated_conv2d_impl(x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups, relu, backend=None):
    """The op's implementation: the backend's result in the layout the fake promises."""
    out = _backend.run(x, weight, bias, out_mask, in_mask, tuple(stride), tuple(padding), tuple(dilation), groups,
                       relu, backend=backend)
    return out.contiguous(memory_format=output_memory_format(x))


@torch.library.custom_op("pydecouple::gated_conv2d", mutates_args=())
def _gated_conv2d_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_mask: Optional[torch.Tensor],
    in_mask: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    relu: bool,
    backend: Optional[str] = None,
) -> torch.Tensor:
    return _gated_conv2d_impl(x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups, relu, backend)


def _fake_output(x, weight, stride, padding, dilation):
    n, _, h, w = x.shape
    ho, wo = output_size(h, w, weight.shape[2:], stride, padding, dilation)
    return x.new_empty((n, weight.shape[0], ho, wo)).contiguous(memory_format=output_memory_format(x))


@_gated_conv2d_op.register_fake
def _(x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups, relu, backend=None):
    return _fake_output(x, weight, stride, padding, dilation)


def _register_kernel_fakes() -> None:
    """Fake implementations of the compiled per-device kernels, so that the
    dispatcher's direct kernel calls (eager inference skips the registered
    op's wrapper) still trace under torch.compile and torch.export."""
    for name in ("gated_conv2d_cpu", "gated_conv2d_cuda"):
        if hasattr(torch.ops.pydecouple, name):
            torch.library.register_fake(f"pydecouple::{name}")(_fake_kernel)
    if hasattr(torch.ops.pydecouple, "accel_conv_cpu"):
        torch.library.register_fake("pydecouple::accel_conv_cpu")(_fake_accel_conv)


def _fake_kernel(x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups, relu):
    return _fake_output(x, weight, stride, padding, dilation)


def _fake_accel_conv(x, in_mask, weight, bias, w1, b1, w2, b2, stride, padding, dilation, relu, residual,
                     residual_relu, dense_above, x_means=None, out_means=False):
    n, o = x.shape[0], weight.shape[0]
    return (_fake_output(x, weight, stride, padding, dilation), x.new_empty((n, o), dtype=torch.bool),
            x.new_empty((n, o) if out_means else (0,), dtype=torch.float32))


if _backend.extension_available():
    _register_kernel_fakes()


@torch.library.custom_op("pydecouple::gated_conv2d_backward", mutates_args=())
def _gated_conv2d_backward_op(
    grad_out: torch.Tensor,
    out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    out_mask: Optional[torch.Tensor],
    in_mask: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for x, weight and bias. Correct, not fast: it runs the dense
    convolution backward on the masked problem (the forward is where the
    skipping pays; training uses the dense masked path anyway, docs/method.md)."""
    g = grad_out
    if out_mask is not None:
        g = g * out_mask[:, :, None, None].to(g.dtype)
    if relu:
        g = g * (out > 0).to(g.dtype)
    xin = x
    if in_mask is not None:
        xin = torch.where(in_mask[:, :, None, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    top, bottom, left, right = padding
    xp = torch.nn.functional.pad(xin, (left, right, top, bottom)) if any(padding) else xin
    gx, gw, gb = torch.ops.aten.convolution_backward(
        g.contiguous(), xp, weight, [weight.shape[0]], list(stride), [0, 0], list(dilation),
        False, [0, 0], groups, [True, True, True],
    )
    h, w = x.shape[2], x.shape[3]
    gx = gx[:, :, top:top + h, left:left + w]
    if in_mask is not None:
        gx = gx * in_mask[:, :, None, None].to(gx.dtype)
    return gx.contiguous(), gw, gb


@_gated_conv2d_backward_op.register_fake
def _(grad_out, out, x, weight, out_mask, in_mask, stride, padding, dilation, groups, relu):
    return torch.empty_like(x), torch.empty_like(weight), weight.new_empty((weight.shape[0],))


def _setup_context(ctx, inputs, output):
    x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups, relu, _ = inputs
    ctx.save_for_backward(x, weight, out_mask, in_mask, output if relu else None)
    ctx.conv = (tuple(stride), tuple(padding), tuple(dilation), groups, relu)
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    x, weight, out_mask, in_mask, out = ctx.saved_tensors
    stride, padding, dilation, groups, relu = ctx.conv
    if out is None:
        out = grad_out  # unused when relu is False; any tensor fits the schema
    gx, gw, gb = _gated_conv2d_backward_op(
        grad_out, out, x, weight, out_mask, in_mask, stride, padding, dilation, groups, relu
    )
    return gx, gw, (gb if ctx.has_bias else None), None, None, None, None, None, None, None, None


_gated_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


def gated_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out_mask: Optional[torch.Tensor] = None,
    in_mask: Optional[torch.Tensor] = None,
    stride: IntOrPair = 1,
    padding: Union[IntOrPair, str] = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    *,
    relu: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Convolution in which each sample computes only its kept filters.

    Exactly ``F.conv2d(x * in_mask, weight, bias, stride, padding, dilation,
    groups) * out_mask``, but a sample's cost is proportional to its kept input
    channels times its kept output filters.

    Args:
        x: (N, Cin, H, W) or unbatched (Cin, H, W); contiguous or channels_last.
        weight: (Cout, Cin // groups, KH, KW).
        bias: (Cout,) or None. Deselected outputs get no bias: they are exactly 0.
        out_mask: bool (N, Cout), or (Cout,) for unbatched input; None = all on.
        in_mask: bool (N, Cin), or (Cin,) for unbatched input; None = all on.
            Channels that are off are read as zero whatever ``x`` holds there.
        stride, dilation: int or pair. padding: int, pair, ``'same'`` or ``'valid'``.
        groups: as in ``F.conv2d`` (depthwise included).
        relu: fused epilogue ``mask * relu(conv + bias)``, what a folded
            conv-BN-ReLU block needs at inference.
        backend: None (automatic, or what ``PYDECOUPLE_BACKEND`` pins),
            ``'auto'`` (automatic whatever the environment says), or one of
            ``'cpu'``, ``'dense'``, ``'reference'``, ``'triton'``, ``'cuda'`` to
            pin that implementation (benchmarks, tests); a pinned backend that
            cannot run the input is an error, never a silent fallback.

    Under ``torch.autocast`` the op follows ``F.conv2d``: floating-point
    arguments other than float64 are cast to the autocast dtype first.

    Returns:
        (N, Cout, Ho, Wo), or (Cout, Ho, Wo) for unbatched input.

    Raises:
        ValueError / TypeError naming the argument, what was expected and what
        was given, before any kernel runs.
    """
    backend = _backend.check_backend(backend)
    if torch._C._is_any_autocast_enabled() and isinstance(x, torch.Tensor):
        x, weight, bias = _backend.autocast_args(x, weight, bias)  # before the checks: they then see one dtype
    a = normalize_conv_args(x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups, relu)
    if _needs_registered_op(a.x, weight, bias):
        out = _gated_conv2d_op(
            a.x, weight, bias, a.out_mask, a.in_mask, a.stride, a.padding, a.dilation, a.groups, bool(relu), backend
        )
    else:
        # Eager inference: the same implementation without the registered op's
        # wrapper (autograd and fake-tensor plumbing cost ~25 us a call, as
        # much as a small layer's whole kernel at batch 1).
        out = _gated_conv2d_impl(
            a.x, weight, bias, a.out_mask, a.in_mask, a.stride, a.padding, a.dilation, a.groups, bool(relu), backend
        )
    return out.squeeze(0) if a.unbatched else out


def _needs_registered_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether a call must go through the registered op: under torch.compile
    (it traces the op), or where autograd must record it."""
    if torch.compiler.is_compiling():
        return True
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
