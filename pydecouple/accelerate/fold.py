"""BatchNorm folding, once for every layer that needs it: a conv's BN and a
gate's logit BN are the same affine map after a linear one."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn

__all__ = ["fold_bn", "fold_bn_into"]


@torch.no_grad()
def fold_bn_into(weight: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.modules.batchnorm._BatchNorm
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(linear_map(x))`` as one linear map, from BN's
    running statistics (its eval function). ``weight``'s first dimension is
    the output channels (a conv's ``(Cout, ...)``, a linear layer's
    ``(out, in)``). Computed in float64 and rounded once to ``weight``'s dtype,
    so a folded layer differs from the pair by one rounding.
    """
    if not bn.track_running_stats or bn.running_mean is None:
        raise ValueError(f"accelerate: a {type(bn).__name__} without running statistics cannot be folded "
                         "(track_running_stats=False): its eval output depends on the batch")
    dt = weight.dtype
    var = bn.running_var.double()
    mean = bn.running_mean.double()
    gamma = bn.weight.detach().double() if bn.affine else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.affine else torch.zeros_like(var)
    s = gamma / torch.sqrt(var + bn.eps)
    w = (weight.detach().double() * s.view(-1, *([1] * (weight.dim() - 1)))).to(dt)
    b0 = bias.detach().double() if bias is not None else torch.zeros_like(mean)
    b = ((b0 - mean) * s + beta).to(dt)
    return w.contiguous(), b.contiguous()


@torch.no_grad()
def fold_bn(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Weight and bias of ``bn(conv(x))`` as one conv (BN's running statistics);
    without ``bn``, copies of the conv's own."""
    if bn is None:
        w, b = conv.weight.detach(), conv.bias
        return w.clone(), (b.detach().clone() if b is not None else None)
    return fold_bn_into(conv.weight, conv.bias, bn)
