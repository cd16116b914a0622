"""The architecture controlling module (ACM): one per gated layer.

The paper's ACM (Li et al., ECCV 2020, "Architecture controlling module")::

    z = GAP(X);  h = ReLU(W1 z + b1);  y = W2 h + b2        # y: (N, Cout) gate logits

Training gate: Improved SemHash (GaterNet). Noise ``eps ~ N(0, noise_std^2)``
is added to the logits; a random half of the *channels* (per channel, not per
batch row: the authors' ``v1[index]`` indexing bug is not copied) uses the hard
gate with a straight-through gradient, the other half the soft gate.
Eval gate: ``1[y > 0]``, no noise.

Initialisation. The paper's (``init="paper"``): ``W1 = 0, b1 = 1``, ``W2`` Kaiming,
``b2 = 1``. With ``W1 = 0`` every sample gets the same logits, and Kaiming
``W2`` makes ``y ~ N(1, 2)`` per channel, so about a quarter of the gates are
closed for *every* input at step 0 (the calibration's drop to 15% accuracy).
``init="open"`` (our default, docs/method.md) keeps the gate input-dependent
from the start and every gate open: ``W1`` Kaiming, ``W2 ~ N(0, w2_std^2)``
small, ``b2 = bias_init`` (3 by default, so even the noisy training gate is open
for ~99.9% of draws).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ArchitectureControl", "gate_modules", "semhash"]


def semhash(logits: torch.Tensor, noise_std: float = 1.0, hard_fraction: float = 0.5) -> Tuple[torch.Tensor, torch.Tensor]:
    """Improved SemHash training gate.

    Args:
        logits: (N, C) gate logits y.
        noise_std: standard deviation of the Gaussian noise added to y.
        hard_fraction: fraction of channels (drawn per channel, per call) that
            use the hard gate with a straight-through gradient.

    Returns:
        (v, hard): v (N, C) float gate with gradient, hard (N, C) bool = 1[y + eps > 0].
    """
    g = logits + noise_std * torch.randn_like(logits) if noise_std > 0 else logits
    v1 = torch.clamp(1.2 * torch.sigmoid(g) - 0.1, 0.0, 1.0)
    hard = g > 0
    v2 = hard.to(v1.dtype)
    use_hard = torch.rand(logits.shape[1], device=logits.device) < hard_fraction  # per channel
    v = torch.where(use_hard[None, :], v1 + (v2 - v1).detach(), v1)
    return v, hard


class ArchitectureControl(nn.Module):
    """Predicts a per-sample binary gate over a layer's ``out_channels`` filters
    from the layer's input.

    Args:
        in_channels: channels of the gated layer's input X.
        out_channels: filters of the gated layer (gate width).
        reduction: hidden width is ``max(in_channels // reduction, min_hidden)``.
        min_hidden: floor on the hidden width.
        noise_std: SemHash noise in training (paper: 1.0).
        init: ``"open"`` (default, see module docstring) or ``"paper"``.
        bias_init: b2 at init (``"open"`` only; the paper's is 1).
        w2_std: std of W2 at init (``"open"`` only).
        logit_norm: batch-normalise the logits (beta starts at ``bias_init``).
        norm_gamma_init: gamma of the logit norm at init: the spread of a gate's
            logit over inputs, relative to the noise (1) and the threshold (beta).
        detach_input: stop gradients from the gate into the layer's input, so
            L_S and L_MI train the ACMs (and CE trains the backbone through the
            gated outputs) without reshaping the backbone's features.

    After each forward: ``last_logits`` (N, Cout) float (with grad in training),
    ``last_mask`` (N, Cout) bool detached (hard mask; in training the hard part
    of the noisy gate), ``last_gate`` (N, Cout) float, the value returned.
    ``force_open = True`` makes every gate 1 (the dense model's function);
    the logits are still computed (``pydecouple.warmstart`` fits them then).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        reduction: int = 4,
        min_hidden: int = 8,
        *,
        noise_std: float = 1.0,
        init: str = "open",
        bias_init: float = 3.0,
        w2_std: float = 0.01,
        logit_norm: bool = False,
        detach_input: bool = True,
        norm_gamma_init: float = 1.0,
    ) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"ArchitectureControl: in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}")
        if init not in ("open", "paper"):
            raise ValueError(f"ArchitectureControl: init must be 'open' or 'paper', got {init!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.hidden = max(in_channels // max(reduction, 1), min_hidden)
        self.fc1 = nn.Linear(in_channels, self.hidden)
        self.fc2 = nn.Linear(self.hidden, out_channels)
        # Optional: batch-normalise the logits, y = gamma * (u - mean) / std + beta, so a
        # gate's spread over inputs stays comparable to its threshold (docs/method.md).
        self.norm = nn.BatchNorm1d(out_channels) if logit_norm else None
        self.noise_std = float(noise_std)
        self.hard_fraction = 0.5
        self.init = init
        self.detach_input = detach_input
        self.norm_gamma_init = float(norm_gamma_init)
        self.bias_init = float(bias_init)
        self.w2_std = float(w2_std)
        self.force_open = False
        self.record_pooled = False  # record last_pooled in eval mode too (gate warm start)
        self.last_logits: Optional[torch.Tensor] = None
        self.last_mask: Optional[torch.Tensor] = None
        self.last_gate: Optional[torch.Tensor] = None
        self.last_pooled: Optional[torch.Tensor] = None  # GAP of the unmasked layer output (training), for L_KL
        self.reset_parameters()

    _PER_FORWARD = ("last_logits", "last_mask", "last_gate", "last_pooled")

    def __getstate__(self):
        # The values of the last forward are a cache, not state: a copy or a
        # pickle taken right after a training step would otherwise carry
        # tensors with autograd history (which deepcopy refuses).
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        for k in self._PER_FORWARD:
            state[k] = None
        return state

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init == "paper":
                self.fc1.weight.zero_()
                self.fc1.bias.fill_(1.0)
                nn.init.kaiming_normal_(self.fc2.weight)
                self.fc2.bias.fill_(1.0)
            else:
                nn.init.kaiming_normal_(self.fc1.weight)
                self.fc1.bias.zero_()
                self.fc2.weight.normal_(0.0, self.w2_std)
                self.fc2.bias.fill_(self.bias_init)
            if self.norm is not None:  # the scale of W2 no longer matters: make u's spread >> BN's eps
                nn.init.kaiming_normal_(self.fc2.weight)
                self.norm.reset_parameters()
                self.norm.weight.fill_(self.norm_gamma_init)
                self.norm.bias.fill_(self.bias_init)
                self.fc2.bias.zero_()

    def extra_repr(self) -> str:
        return (f"{self.in_channels} -> {self.hidden} -> {self.out_channels}, noise_std={self.noise_std}, "
                f"init={self.init!r}, logit_norm={self.norm is not None}, detach_input={self.detach_input}")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Gate logits y (N, Cout) for the layer input x (N, Cin, H, W)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"ArchitectureControl: expected input (N, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        z = x.mean(dim=(2, 3))
        if self.detach_input:
            z = z.detach()
        y = self.fc2(F.relu(self.fc1(z)))
        if self.norm is not None:
            if self.training and y.shape[0] == 1:  # batch statistics need two samples
                return F.batch_norm(y, self.norm.running_mean, self.norm.running_var, self.norm.weight,
                                    self.norm.bias, False, 0.0, self.norm.eps)
            y = self.norm(y)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.logits(x)
        if self.force_open:
            v = torch.ones_like(y)
            mask = torch.ones_like(y, dtype=torch.bool)
        elif self.training:
            v, mask = semhash(y, self.noise_std, self.hard_fraction)
        else:
            mask = y > 0
            v = mask.to(y.dtype)
        self.last_logits = y
        self.last_mask = mask.detach()
        self.last_gate = v
        return v


def gate_modules(model: nn.Module) -> List[Tuple[str, ArchitectureControl]]:
    """Every ACM of ``model`` with its qualified name, in registration order
    (the forward order for the models ``decouple`` produces)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, ArchitectureControl)]
