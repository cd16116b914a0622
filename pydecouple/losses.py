"""The decoupling losses of the paper (Li et al., ECCV 2020; the settings used here: docs/method.md)::

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
* ``distillation_loss``: Hinton et al.'s knowledge distillation,
  ``T^2 KL(softmax(t / T) || softmax(s / T))`` on the logits of a frozen teacher
  (the dense network the student came from). ``DecouplingLoss(teacher=...,
  kd_weight=w, kd_temperature=T)`` replaces CE by ``(1 - w) CE + w T^2 KL``;
  :class:`DistillationLoss` does the same for a dense (or pruned) student, so
  both arms of a comparison can get the same teacher.
  Both take the inputs as a third argument (``loss(logits, y, x)``; ``train``
  passes them to any loss whose ``takes_inputs`` is True) to run the teacher.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nn.gate import ArchitectureControl, gate_modules

__all__ = ["mi_loss", "kl_loss", "sparsity_loss", "distillation_loss", "DecouplingLoss", "DistillationLoss",
           "METHOD_DEFAULTS"]

# The authors' code's settings for VGG (cfg E, BN) on CIFAR-10.
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


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """``T^2 KL(softmax(t / T) || softmax(s / T))``, batch mean. The ``T^2`` keeps the
    gradient's scale independent of T (Hinton et al., 2015)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"distillation_loss: student_logits and teacher_logits must have the same shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"distillation_loss: argument 'temperature' must be > 0, got {temperature!r}")
    t = float(temperature)
    ls = F.log_softmax(student_logits / t, dim=1)
    lt = F.log_softmax(teacher_logits.detach() / t, dim=1)
    return F.kl_div(ls, lt, reduction="batchmean", log_target=True) * (t * t)


class _Teacher:
    """A frozen teacher held outside the module tree: not in ``parameters()``
    (the optimiser, DDP), not in ``state_dict()`` (every checkpoint), not moved
    by ``.to()``; run in eval mode without gradients, on the inputs' device."""

    def __init__(self, owner: str, teacher: Optional[nn.Module], weight: float, temperature: float,
                 student: Optional[nn.Module] = None) -> None:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 1:
            raise ValueError(f"{owner}: argument 'kd_weight' must be in [0, 1] (the share of the distillation "
                             f"term against CE), got {weight!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"{owner}: argument 'kd_temperature' must be > 0, got {temperature!r}")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise TypeError(f"{owner}: argument 'teacher' must be an nn.Module or None, got {type(teacher).__name__}")
        if weight > 0 and teacher is None:
            raise ValueError(f"{owner}: argument 'teacher' is required when kd_weight > 0 (got kd_weight={weight})")
        if teacher is not None and teacher is student:
            raise ValueError(f"{owner}: argument 'teacher' must be a separate (frozen) model, got the student itself")
        self.model = teacher
        self.weight, self.temperature = float(weight), float(temperature)
        if teacher is not None:
            teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)

    @property
    def active(self) -> bool:
        return self.model is not None and self.weight > 0

    @torch.no_grad()
    def logits(self, owner: str, inputs: Optional[torch.Tensor]) -> torch.Tensor:
        if inputs is None:
            raise ValueError(f"{owner}: distillation needs the inputs: call loss(logits, targets, inputs)")
        p = next(self.model.parameters(), None)
        if p is not None and p.device != inputs.device:
            self.model.to(inputs.device)
        self.model.eval()  # the trainer's model.train() never reaches it, but a caller's might
        return self.model(inputs)


class DistillationLoss(nn.Module):
    """``(1 - kd_weight) CE + kd_weight T^2 KL(teacher || student)`` for a
    dense or pruned student, with the interface of :class:`DecouplingLoss`:
    ``loss(logits, targets, inputs) -> (total, {ce, kd, total})``. Pass it as
    ``train(..., loss=DistillationLoss(teacher))``.

    Args:
        teacher: the frozen teacher (e.g. the dense model the student was pruned from).
        kd_weight: the distillation share, in [0, 1].
        kd_temperature: T > 0 (softened logits).
    """

    takes_inputs = True

    def __init__(self, teacher: nn.Module, kd_weight: float = 0.5, kd_temperature: float = 4.0) -> None:
        super().__init__()
        if teacher is None:
            raise ValueError("DistillationLoss: argument 'teacher' must be an nn.Module, got None")
        object.__setattr__(self, "_teacher", _Teacher("DistillationLoss", teacher, kd_weight, kd_temperature))
        self.kd_weight, self.kd_temperature = float(kd_weight), float(kd_temperature)
        self.sparsity_scale = 1.0  # set by the trainer for every loss; unused here

    def describe(self) -> Dict[str, float]:
        """What a checkpoint's meta records about this loss."""
        return {"kd_weight": self.kd_weight, "kd_temperature": self.kd_temperature}

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                inputs: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        ce = F.cross_entropy(logits, targets)
        w = self._teacher.weight
        kd = distillation_loss(logits, self._teacher.logits("DistillationLoss", inputs), self.kd_temperature) \
            if w > 0 else ce.new_zeros(())
        total = (1 - w) * ce + w * kd
        return total, {"ce": ce.detach(), "kd": kd.detach(), "total": total.detach()}


class DecouplingLoss(nn.Module):
    """CE + lam_k L_KL + lam_m L_MI + lam_s L_S over a decoupled model's gates.

    Holds the MI classifiers (its parameters: optimise them with the model).
    Reads the gates of the last forward from the model's ACMs.

    Args:
        model: the decoupled model (its ACMs, in forward order).
        num_classes: K.
        lam_k, lam_m, lam_s, rho: the paper's loss weights (defaults: the authors' VGG CIFAR-10 settings).
        kl_direction: ``"output_gate"`` (default) or ``"gate_output"``.
        normalize_sparsity: see :func:`sparsity_loss`.
        mi_init: ``"zeros"`` (default: L_MI starts at its chance value) or
            ``"default"`` (PyTorch's Linear init, as the authors' code).
        teacher: a frozen teacher for knowledge distillation (None: off), e.g.
            the dense model the decoupled one came from. Not part of the loss's
            parameters or state_dict.
        kd_weight: w in [0, 1]: CE becomes ``(1 - w) CE + w T^2 KL(teacher || student)``.
        kd_temperature: T > 0.

    ``forward(logits, targets, inputs=None)`` returns ``(total, terms)`` with terms
    a dict of detached scalars: ``ce, kl, mi, sparsity, total`` (and ``kd`` with a
    teacher; ``inputs`` is then required, to run the teacher).
    """

    takes_inputs = True

    def __init__(self, model: nn.Module, num_classes: int, lam_k: float = METHOD_DEFAULTS["lam_k"],
                 lam_m: float = METHOD_DEFAULTS["lam_m"], lam_s: float = METHOD_DEFAULTS["lam_s"],
                 rho: float = METHOD_DEFAULTS["rho"], kl_direction: str = "output_gate",
                 normalize_sparsity: bool = False, mi_init: str = "zeros", teacher: Optional[nn.Module] = None,
                 kd_weight: float = 0.0, kd_temperature: float = 4.0) -> None:
        super().__init__()
        object.__setattr__(self, "_teacher", _Teacher("DecouplingLoss", teacher, kd_weight, kd_temperature, model))
        self.kd_weight, self.kd_temperature = float(kd_weight), float(kd_temperature)
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

    def describe(self) -> Dict[str, object]:
        """What a checkpoint's meta records about this loss."""
        d: Dict[str, object] = {"lam_k": self.lam_k, "lam_m": self.lam_m, "lam_s": self.lam_s, "rho": self.rho,
                                "kl_direction": self.kl_direction}
        if self._teacher.active:
            d.update(kd_weight=self.kd_weight, kd_temperature=self.kd_temperature)
        return d

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                inputs: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
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
        task = ce
        kd = None
        if self._teacher.active:
            w = self._teacher.weight
            kd = distillation_loss(logits, self._teacher.logits("DecouplingLoss", inputs), self.kd_temperature)
            task = (1 - w) * ce + w * kd
        total = task + self.lam_k * kl + self.lam_m * mi + self.lam_s * self.sparsity_scale * sp
        terms = {"ce": ce.detach(), "kl": kl.detach(), "mi": mi.detach(), "sparsity": sp.detach(), "total": total.detach()}
        if kd is not None:
            terms["kd"] = kd.detach()
        return total, terms
