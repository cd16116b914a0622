"""The specification of ``gated_conv2d``: dense, masked, readable, slow.

Every other implementation (C++ CPU, Triton, CUDA) is tested against
:func:`gated_conv2d_reference`. It computes, exactly::

    out = F.conv2d(pad(x * in_mask), weight, bias, stride, 0, dilation, groups)
    out = relu(out) if relu else out
    out = out * out_mask

with ``pad`` the explicit (top, bottom, left, right) zero padding. A deselected
output channel is exactly zero (its bias is not added); an input channel that is
off is treated as zero whatever ``x`` holds there (also NaN or inf).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def gated_conv2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_mask: Optional[torch.Tensor],
    in_mask: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    relu: bool = False,
) -> torch.Tensor:
    """Masked dense convolution, the meaning of the op.

    Args:
        x: (N, Cin, H, W) input.
        weight: (Cout, Cin // groups, KH, KW).
        bias: (Cout,) or None.
        out_mask: bool (N, Cout) or None (all on).
        in_mask: bool (N, Cin) or None (all on).
        stride, dilation: (sh, sw) and (dh, dw).
        padding: (top, bottom, left, right) zero padding.
        groups: as in ``F.conv2d``.
        relu: apply ReLU after the bias, before the out-mask (the fused epilogue).
    """
    if in_mask is not None:
        # torch.where, not a multiply: an input channel that is off is zero even
        # where x holds NaN or inf (0 * inf would be NaN).
        x = torch.where(in_mask[:, :, None, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    top, bottom, left, right = padding
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom))
    out = F.conv2d(x, weight, bias, tuple(stride), 0, tuple(dilation), groups)
    if relu:
        out = torch.relu(out)
    if out_mask is not None:
        out = torch.where(out_mask[:, :, None, None], out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out
