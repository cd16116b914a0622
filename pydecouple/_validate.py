"""Argument checking and normalisation for ``gated_conv2d``.

Every check runs before any kernel, and every message names the argument,
what was expected and what was given. The result is what the registered op
takes: a batched input, pairs for stride and dilation, four-sided padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch

from .geometry import output_size, same_padding


def _fail(arg: str, expected: str, given: str, exc=ValueError):
    raise exc(f"gated_conv2d: argument '{arg}' must be {expected}, got {given}")


def _describe(t: torch.Tensor) -> str:
    return f"{t.dim()}-D tensor of shape {tuple(t.shape)} ({t.dtype}, {t.device})"


# F.conv2d reads stride, padding and dilation as C++ int64: larger Python ints
# fail there with "Overflow when unpacking long long".
_INT64_MAX = 2**63 - 1
# F.conv2d's output-size arithmetic overflows once a padded input side reaches
# 2**31 (on an 8x8 input, padding 2**30 gives "Output size is too small",
# 2**61 kills the process with SIGFPE): a padded side must stay below it.
_MAX_SIDE = 2**31 - 1


def _as_int(v):
    """``v`` as a Python int where F.conv2d would take it as one (an int, a
    numpy integer, a 0-d integer tensor), else None. Bools of every kind are
    refused: ``stride=True`` is a bug, not a stride of 1."""
    if isinstance(v, torch.Tensor):
        if v.dim() != 0 or v.dtype == torch.bool or v.is_floating_point() or v.is_complex():
            return None
        return int(v.item())
    if isinstance(v, (bool, np.bool_)):
        return None
    if isinstance(v, (int, np.integer)):
        return int(v)
    return None


def _pair(arg: str, v, minimum: int) -> Tuple[int, int]:
    single = _as_int(v)
    if single is not None:
        v = (single, single)
    elif isinstance(v, (bool, np.bool_, str)) or (isinstance(v, torch.Tensor) and v.dim() == 0):
        _fail(arg, "an int or a pair of ints", repr(v), TypeError)
    else:
        try:
            v = tuple(v)
        except TypeError:
            _fail(arg, "an int or a pair of ints", repr(v), TypeError)
    if len(v) == 1:
        v = (v[0], v[0])
    ints = tuple(_as_int(e) for e in v)
    if len(v) != 2 or any(e is None for e in ints):
        _fail(arg, "an int or a pair of ints", repr(v), TypeError)
    if min(ints) < minimum:
        _fail(arg, f"at least {minimum} in each dimension", repr(ints))
    if max(ints) > _INT64_MAX:
        _fail(arg, "at most 2**63 - 1 in each dimension (a 64-bit integer, as F.conv2d takes)", repr(ints))
    return ints


@dataclass
class ConvArgs:
    x: torch.Tensor
    out_mask: Optional[torch.Tensor]
    in_mask: Optional[torch.Tensor]
    stride: Tuple[int, int]
    padding: Tuple[int, int, int, int]  # top, bottom, left, right
    dilation: Tuple[int, int]
    unbatched: bool
    groups: int = 1
    relu: bool = False


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


def normalize_conv_args(x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups,
                        relu: bool = False) -> ConvArgs:
    """Check every argument of ``gated_conv2d`` and return them normalised.

    stride, padding, dilation and groups take what F.conv2d takes: ints,
    numpy integers, 0-d integer tensors, and (for the first three) sequences of
    one or two of them; floats and bools are refused. ``relu`` must be a bool
    (``relu='yes'`` would otherwise read as True). A stride larger than the
    input it slides over is replaced by that size: the output is the same
    (one position along that side), and the kernels never see the huge value.
    """
    if not isinstance(relu, (bool, np.bool_)):
        _fail("relu", "a bool (True fuses a ReLU into the epilogue)", repr(relu), TypeError)
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
    g = _as_int(groups)
    if g is None:
        _fail("groups", "a positive int", repr(groups), TypeError)
    if g < 1:
        _fail("groups", "a positive int", repr(groups))
    groups = g
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
            pad4 = same_padding((kh, kw), d)
        else:
            _fail("padding", "an int, a pair, 'same' or 'valid'", repr(padding))
    else:
        p = _pair("padding", padding, 0)
        pad4 = (p[0], p[0], p[1], p[1])
    ph, pw = h + pad4[0] + pad4[1], w + pad4[2] + pad4[3]
    if max(ph, pw) > _MAX_SIDE:
        _fail("padding", f"small enough that the padded input stays below 2**31 pixels a side (F.conv2d's "
              f"output size overflows beyond)", f"padding {pad4} (top, bottom, left, right) on a {h}x{w} input")
    # Python ints: no overflow here, whatever the dilation (F.conv2d's own
    # arithmetic wraps for dilation >= 2**62 and returns a wrong-sized output).
    eh = ph - d[0] * (kh - 1)
    ew = pw - d[1] * (kw - 1)
    if eh < 1 or ew < 1:
        _fail("x", f"at least as large as the dilated kernel ({d[0] * (kh - 1) + 1}x{d[1] * (kw - 1) + 1}) after padding",
              f"input {h}x{w} with padding {pad4} (top, bottom, left, right)")
    # Output position o starts at o * stride; a stride >= the room the kernel
    # has (eh) leaves only o = 0, for any such stride: same output, and the
    # kernel gets a stride that fits in 32 bits.
    s = (min(s[0], eh), min(s[1], ew))
    ho, wo = output_size(h, w, (kh, kw), s, pad4, d)
    if n * cout * ho * wo * x.element_size() > _INT64_MAX:
        _fail("padding", "small enough for the output to fit in memory addressable by a tensor (2**63 bytes)",
              f"padding {pad4} (top, bottom, left, right), giving an output of {n}x{cout}x{ho}x{wo} "
              f"{x.dtype} elements")
    om = _check_mask("out_mask", out_mask, n, cout, unbatched, x.device)
    im = _check_mask("in_mask", in_mask, n, cin, unbatched, x.device)
    return ConvArgs(x, om, im, s, pad4, d, unbatched, groups, bool(relu))
