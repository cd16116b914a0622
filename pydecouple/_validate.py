"""Argument checking and normalisation for ``gated_conv2d``.

Every check runs before any kernel, and every message names the argument,
what was expected and what was given. The result is what the registered op
takes: a batched input, pairs for stride and dilation, four-sided padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch


def _fail(arg: str, expected: str, given: str, exc=ValueError):
    raise exc(f"gated_conv2d: argument '{arg}' must be {expected}, got {given}")


def _describe(t: torch.Tensor) -> str:
    return f"{t.dim()}-D tensor of shape {tuple(t.shape)} ({t.dtype}, {t.device})"


def _pair(arg: str, v, minimum: int) -> Tuple[int, int]:
    if isinstance(v, bool):
        _fail(arg, "an int or a pair of ints", repr(v), TypeError)
    if isinstance(v, int):
        v = (v, v)
    try:
        v = tuple(v)
    except TypeError:
        _fail(arg, "an int or a pair of ints", repr(v), TypeError)
    if len(v) == 1:
        v = (v[0], v[0])
    if len(v) != 2 or not all(isinstance(e, int) and not isinstance(e, bool) for e in v):
        _fail(arg, "an int or a pair of ints", repr(v), TypeError)
    if min(v) < minimum:
        _fail(arg, f"at least {minimum} in each dimension", repr(v))
    return v


@dataclass
class ConvArgs:
    x: torch.Tensor
    out_mask: Optional[torch.Tensor]
    in_mask: Optional[torch.Tensor]
    stride: Tuple[int, int]
    padding: Tuple[int, int, int, int]  # top, bottom, left, right
    dilation: Tuple[int, int]
    unbatched: bool


def _check_mask(name: str, mask, n: int, c: int, unbatched: bool, device) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        _fail(name, "a bool tensor or None", type(mask).__name__, TypeError)
    if mask.dtype != torch.bool:
        _fail(name, "a torch.bool tensor", f"dtype {mask.dtype}", TypeError)
    if mask.device != device:
        _fail(name, f"on the device of 'x' ({device})", f"a tensor on {mask.device}")
    expected = (c,) if unbatched else (n, c)
    if tuple(mask.shape) != expected:
        shape_txt = "(C,) for unbatched input" if unbatched else "(N, C)"
        _fail(name, f"of shape {expected} = {shape_txt}", f"shape {tuple(mask.shape)}")
    return mask.unsqueeze(0) if unbatched else mask


def normalize_conv_args(x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups) -> ConvArgs:
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            _fail(name, "a torch.Tensor", type(t).__name__, TypeError)
        if not t.is_floating_point():
            _fail(name, "a floating-point tensor (float32, float64, float16 or bfloat16)", f"dtype {t.dtype}", TypeError)
    if x.dim() not in (3, 4):
        _fail("x", "a 4-D (N, C, H, W) or 3-D (C, H, W) tensor", _describe(x))
    if weight.dim() != 4:
        _fail("weight", "a 4-D (Cout, Cin // groups, KH, KW) tensor", _describe(weight))
    if weight.device != x.device:
        _fail("weight", f"on the device of 'x' ({x.device})", f"a tensor on {weight.device}")
    if weight.dtype != x.dtype:
        _fail("weight", f"of the dtype of 'x' ({x.dtype})", f"dtype {weight.dtype}", TypeError)
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            _fail("bias", "a torch.Tensor or None", type(bias).__name__, TypeError)
        if bias.device != x.device:
            _fail("bias", f"on the device of 'x' ({x.device})", f"a tensor on {bias.device}")
        if bias.dtype != x.dtype:
            _fail("bias", f"of the dtype of 'x' ({x.dtype})", f"dtype {bias.dtype}", TypeError)
        if tuple(bias.shape) != (weight.shape[0],):
            _fail("bias", f"of shape ({weight.shape[0]},) = (Cout,)", f"shape {tuple(bias.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        _fail("groups", "a positive int", repr(groups), TypeError if not isinstance(groups, int) else ValueError)
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    n, cin, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape
    if cin % groups != 0:
        _fail("x", f"a channel count divisible by groups={groups}", f"{cin} channels")
    if cout % groups != 0:
        _fail("weight", f"an output-channel count divisible by groups={groups}", f"{cout} filters")
    if cin_g * groups != cin:
        _fail("weight", f"of shape (Cout, {cin // groups}, KH, KW) to match x's {cin} channels and groups={groups}",
              f"shape {tuple(weight.shape)}")
    if kh < 1 or kw < 1 or cout < 1:
        _fail("weight", "non-empty in Cout, KH and KW", f"shape {tuple(weight.shape)}")
    s = _pair("stride", stride, 1)
    d = _pair("dilation", dilation, 1)
    if isinstance(padding, str):
        if padding == "valid":
            pad4 = (0, 0, 0, 0)
        elif padding == "same":
            if s != (1, 1):
                _fail("padding", "a number when stride is not 1 ('same' needs stride 1, as in F.conv2d)",
                      f"'same' with stride {s}")
            th, tw = d[0] * (kh - 1), d[1] * (kw - 1)
            pad4 = (th // 2, th - th // 2, tw // 2, tw - tw // 2)
        else:
            _fail("padding", "an int, a pair, 'same' or 'valid'", repr(padding))
    else:
        p = _pair("padding", padding, 0)
        pad4 = (p[0], p[0], p[1], p[1])
    eh = h + pad4[0] + pad4[1] - d[0] * (kh - 1)
    ew = w + pad4[2] + pad4[3] - d[1] * (kw - 1)
    if eh < 1 or ew < 1:
        _fail("x", f"at least as large as the dilated kernel ({d[0] * (kh - 1) + 1}x{d[1] * (kw - 1) + 1}) after padding",
              f"input {h}x{w} with padding {pad4} (top, bottom, left, right)")
    om = _check_mask("out_mask", out_mask, n, cout, unbatched, x.device)
    im = _check_mask("in_mask", in_mask, n, cin, unbatched, x.device)
    return ConvArgs(x, om, im, s, pad4, d, unbatched)
