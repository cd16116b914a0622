"""Convolution geometry and mask conventions, written once.

The argument checks (``_validate.py``), the op (its fake and its output
layout), the compiled kernels' fakes, the accelerated modules' padding and the
public ``masks_to_indices`` and the Triton launcher (``kernels/gated_conv2d.py``)
take their output size, memory layout, four-sided padding and kept-first
index lists from here, so that a change of convention is a change in one
place. Still restated: the C++ kernels (in C++); tests hold every
implementation to the reference.
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import torch

__all__ = ["conv_padding4", "masks_to_indices", "output_memory_format", "output_size", "same_padding"]

Pad4 = Tuple[int, int, int, int]  # top, bottom, left, right


def same_padding(kernel_size: Sequence[int], dilation: Sequence[int]) -> Pad4:
    """Four-sided padding of ``padding='same'`` (stride 1): as F.conv2d, the
    odd pixel of an even total goes to the bottom / right."""
    th, tw = dilation[0] * (kernel_size[0] - 1), dilation[1] * (kernel_size[1] - 1)
    return th // 2, th - th // 2, tw // 2, tw - tw // 2


def conv_padding4(padding: Union[str, Sequence[int]], kernel_size: Sequence[int], dilation: Sequence[int]) -> Pad4:
    """An ``nn.Conv2d``'s ``padding`` attribute (a pair, ``'same'`` or
    ``'valid'``, already checked by nn.Conv2d) as (top, bottom, left, right)."""
    if isinstance(padding, str):
        return (0, 0, 0, 0) if padding == "valid" else same_padding(kernel_size, dilation)
    return int(padding[0]), int(padding[0]), int(padding[1]), int(padding[1])


def output_size(h: int, w: int, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int]) -> Tuple[int, int]:
    """(Ho, Wo) of a convolution with four-sided ``padding`` (F.conv2d's formula)."""
    top, bottom, left, right = padding
    ho = (h + top + bottom - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
    wo = (w + left + right - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
    return ho, wo


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels_last out exactly when ``x`` is channels_last-strided and not
    contiguous, as F.conv2d does (a tensor that is both, e.g. 1x1 images,
    counts as contiguous)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def masks_to_indices(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row index lists of the kept channels, kept first, and their counts.

    ``mask``: bool (N, C). Returns ``idx`` int32 (N, C) whose first ``count[n]``
    entries are the kept channels of row n in increasing order (the rest are
    the others, also in order), and ``count`` int32 (N,). Made with device ops
    only (a stable sort), no host synchronisation: safe under CUDA graphs.
    """
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    return order.to(torch.int32).contiguous(), mask.sum(dim=1, dtype=torch.int32).contiguous()
