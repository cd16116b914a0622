"""The decoupling losses (METHOD.md, "Losses")::

    L = CE(f(x), y) + lam_k * L_KL + lam_m * L_MI + lam_s * L_S

* ``mi_loss``: variational bound on I(path; class): one bias-free linear
  classifier U_l per gated layer, ``sum_l CE(U_l m_l, y)``. Chance value:
  ``n_layers * ln K``.
* ``kl_loss``: output-encoding alignment, ``sum_l KL(p || q)``. Default direction
  ``"output_gate"``: p = softmax(GAP(O_l)) (the layer's unmasked pooled output), q =
  softmax(m_l) (the gate): what the authors' ResNet-56 code uses. Being
  mode-covering in p, it asks the gate to be on wherever the layer responds
  strongly *for this input*, which is a per-sample signal; the other direction
  (``"gate_output"``, their VGG/ResNet-20 code) is kept as an option.
* ``sparsity_loss``: ``sum_l | mean_batch ||m_l||_1 - rho C_l |``; ``rho = 0`` is L1.
  ``normalize=True`` divides each layer's term by C_l (a kept-fraction target
  that weighs layers equally; the paper's form is unnormalised).
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nn.gate import ArchitectureControl, gate_modules

__all__ = ["mi_loss", "kl_loss", "sparsity_loss", "DecouplingLoss", "METHOD_DEFAULTS"]

# VGG (cfg E, BN), CIFAR-10 row of METHOD.md's table.
METHOD_DEFAULTS = dict(lam_k=1.0, lam_m=0.04, lam_s=2e-4, rho=0.0)


def mi_loss(gates: Sequence[torch.Tensor], targets: torch.Tensor, classifiers: Sequence[nn.Module]) -> torch.Tensor:
    """``sum_l CE(U_l(m_l), y)`` over layers; gates (N, C_l), classifiers U_l: C_l -> K."""
    if len(gates) != len(classifiers):
        raise ValueError(f"mi_loss: {len(gates)} gate tensors but {len(classifiers)} classifiers")
    total = gates[0].new_zeros(())
    for m, u in zip(gates, classifiers):
        total = total + F.cross_entropy(u(m), targets)
    return total


def kl_loss(pooled: Sequence[torch.Tensor], gates: Sequence[torch.Tensor], direction: str = "output_gate") -> torch.Tensor:
    """``sum_l KL(softmax(GAP(O_l)) || softmax(m_l))`` (``direction="output_gate"``)
    or ``KL(softmax(m_l) || softmax(GAP(O_l)))`` (``"gate_output"``), batch mean."""
    if direction not in ("output_gate", "gate_output"):
        raise ValueError(f"kl_loss: direction must be 'output_gate' or 'gate_output', got {direction!r}")
    total = gates[0].new_zeros(())
    for o, m in zip(pooled, gates):
        lo, lm = F.log_softmax(o, dim=1), F.log_softmax(m, dim=1)
        if direction == "output_gate":
            total = total + F.kl_div(lm, lo, reduction="batchmean", log_target=True)
        else:
            total = total + F.kl_div(lo, lm, reduction="batchmean", log_target=True)
    return total


def sparsity_loss(gates: Sequence[torch.Tensor], rho: float = 0.0, normalize: bool = False) -> torch.Tensor:
    """``sum_l | mean_batch ||m_l||_1 - rho * C_l |`` (divided by C_l if ``normalize``)."""
    total = gates[0].new_zeros(())
    for m in gates:
        c = m.shape[1]
        t = (m.abs().sum(dim=1).mean() - rho * c).abs()
        total = total + (t / c if normalize else t)
    return total


class DecouplingLoss(nn.Module):
    """CE + lam_k L_KL + lam_m L_MI + lam_s L_S over a decoupled model's gates.

    Holds the MI classifiers (its parameters: optimise them with the model).
    Reads the gates of the last forward from the model's ACMs.

    Args:
        model: the decoupled model (its ACMs, in forward order).
        num_classes: K.
        lam_k, lam_m, lam_s, rho: METHOD.md's weights (defaults: the VGG CIFAR-10 row).
        kl_direction: ``"output_gate"`` (default) or ``"gate_output"``.
        normalize_sparsity: see :func:`sparsity_loss`.
        mi_init: ``"zeros"`` (default: L_MI starts at its chance value) or
            ``"default"`` (PyTorch's Linear init, as the authors' code).

    ``forward(logits, targets)`` returns ``(total, terms)`` with terms a dict of
    detached scalars: ``ce, kl, mi, sparsity, total``.
    """

    def __init__(self, model: nn.Module, num_classes: int, lam_k: float = METHOD_DEFAULTS["lam_k"],
                 lam_m: float = METHOD_DEFAULTS["lam_m"], lam_s: float = METHOD_DEFAULTS["lam_s"],
                 rho: float = METHOD_DEFAULTS["rho"], kl_direction: str = "output_gate",
                 normalize_sparsity: bool = False, mi_init: str = "zeros") -> None:
        super().__init__()
        gates = [g for _, g in gate_modules(model)]
        if not gates:
            raise ValueError("DecouplingLoss: the model has no gate modules; decouple it first")
        object.__setattr__(self, "_gates", gates)
        self.classifiers = nn.ModuleList(nn.Linear(g.out_channels, num_classes, bias=False) for g in gates)
        if mi_init == "zeros":  # L_MI starts at chance, without the large random-classifier gradients
            for c in self.classifiers:
                nn.init.zeros_(c.weight)
        elif mi_init != "default":
            raise ValueError(f"DecouplingLoss: mi_init must be 'zeros' or 'default', got {mi_init!r}")
        self.num_classes = num_classes
        self.lam_k, self.lam_m, self.lam_s, self.rho = float(lam_k), float(lam_m), float(lam_s), float(rho)
        self.kl_direction = kl_direction
        self.normalize_sparsity = normalize_sparsity
        self.sparsity_scale = 1.0  # warm-up multiplier on lam_s, set by the trainer

    @property
    def gates(self) -> List[ArchitectureControl]:
        return self._gates

    @property
    def mi_chance(self) -> float:
        return len(self._gates) * math.log(self.num_classes)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        ce = F.cross_entropy(logits, targets)
        gates = [g.last_gate for g in self._gates]
        if any(v is None for v in gates):
            raise RuntimeError("DecouplingLoss: run the model forward before the loss (a gate has no value yet)")
        mi = mi_loss(gates, targets, self.classifiers)
        sp = sparsity_loss(gates, self.rho, self.normalize_sparsity)
        if self.lam_k and all(g.last_pooled is not None for g in self._gates):
            kl = kl_loss([g.last_pooled for g in self._gates], gates, self.kl_direction)
        else:
            kl = ce.new_zeros(())
        total = ce + self.lam_k * kl + self.lam_m * mi + self.lam_s * self.sparsity_scale * sp
        terms = {"ce": ce.detach(), "kl": kl.detach(), "mi": mi.detach(), "sparsity": sp.detach(), "total": total.detach()}
        return total, terms
