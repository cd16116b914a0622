"""Gate warm start: fit every ACM to the dense network's own filter saliency
before the gates are applied.

Why (docs/method.md, "Gate warm start"): decoupling starts from a dense
network whose ACMs know nothing. Whatever the ACMs close at the first
fine-tuning step is, to the backbone, random per-sample dropout of a third or
more of every layer's filters; on the CIFAR subset that cost 25+ accuracy
points that short fine-tuning never won back. The dense network already knows
which of its filters respond to an image: the spatial mean of a layer's
(pre-ReLU, post-BN) output. So, with the backbone frozen and the gates held
open (the network computes its dense function), each ACM is trained by binary
cross-entropy to predict, from the layer's input, the ``keep`` fraction of
filters with the largest mean response for that image. The ACM sees only the
layer's pooled input, so what it learns is a per-input prediction, not the
answer. Only the tiny ACMs get gradients: a step costs about one dense
forward pass.

The idea is the saliency target of feature boosting and suppression
(Gao et al., ICLR 2019) used as a distillation target for the paper's gates;
the paper itself starts its gates from a fixed initialisation.
"""

from __future__ import annotations

import logging
import time
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import augment as augment_batch
from .nn.gate import gate_modules

__all__ = ["saliency_targets", "warm_start_gates"]

log = logging.getLogger("pydecouple.warmstart")


def _probit(p: float) -> float:
    p = min(max(p, 1e-4), 1 - 1e-4)
    return float(torch.special.ndtri(torch.tensor(p, dtype=torch.float64)))


def saliency_targets(pooled: torch.Tensor, keep: float) -> torch.Tensor:
    """Per sample, 1 for the ``round(keep * C)`` channels (at least 1) with the
    largest pooled response, else 0: (N, C) float."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"saliency_targets: keep must be in (0, 1], got {keep}")
    n, c = pooled.shape
    k = min(c, max(1, round(keep * c)))
    idx = pooled.topk(k, dim=1).indices
    return torch.zeros_like(pooled).scatter_(1, idx, 1.0)


def warm_start_gates(model: nn.Module, images: torch.Tensor, keep: float, steps: int = 200,
                     batch_size: int = 128, lr: float = 1e-2, augment: bool = True, seed: int = 0,
                     device: Optional[torch.device] = None, progress: bool = False) -> List[Dict[str, float]]:
    """Fit the ACMs of a decoupled ``model`` to keep, per image, the ``keep``
    fraction of each layer's filters with the largest mean response.

    The backbone is left untouched: eval mode (BN running statistics, no
    update), no gradients, gates forced open. The ACMs run in train mode (their
    logit norm learns its statistics) and are optimised with Adam.

    Args:
        model: a decoupled model (``pydecouple.decouple``).
        images: training images in [0, 1], (N, C, H, W), CPU.
        keep: target kept fraction per layer (the fine-tuning's ``rho``).
        steps, batch_size, lr: Adam on the ACM parameters.
        augment: random crop + flip, as in training.
        seed: the batch order and augmentation.
        device: default: the model's.
        progress: a tqdm bar.

    Returns:
        One record per logged step: ``step``, ``bce`` (mean over layers),
        ``agreement`` (fraction of gate decisions equal to the target),
        ``kept`` (mean kept fraction of the hard gates).
    """
    gates = [g for _, g in gate_modules(model)]
    if not gates:
        raise ValueError("warm_start_gates: the model has no gate modules; decouple it first")
    if images.dim() != 4 or len(images) == 0:
        raise ValueError(f"warm_start_gates: images must be (N, C, H, W) with N >= 1, got {tuple(images.shape)}")
    if steps < 1:
        raise ValueError(f"warm_start_gates: steps must be >= 1, got {steps}")
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"warm_start_gates: keep must be in (0, 1], got {keep}")
    device = device or next(model.parameters()).device
    was_training = model.training
    saved = [(g.force_open, g.record_pooled) for g in gates]
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    gate_params = [p for g in gates for p in g.parameters()]
    gate_ids = {id(p) for p in gate_params}
    for p, _ in frozen:
        p.requires_grad_(id(p) in gate_ids)
    opt = torch.optim.Adam(gate_params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    gen = torch.Generator().manual_seed(seed)
    pad, flip = (4, True) if images.shape[-1] >= 16 else (1, False)
    history: List[Dict[str, float]] = []
    model.eval()
    for g in gates:
        g.train()
        g.force_open, g.record_pooled = True, True
        if g.norm is not None:
            # Normalised logits are ~N(beta, gamma^2) over inputs: start at the threshold
            # that keeps the target fraction, P(y > 0) = keep, instead of the open-gate init.
            with torch.no_grad():
                g.norm.bias.fill_(float(g.norm.weight.abs().mean()) * _probit(keep))
    bar = range(steps)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc="gate warm start", leave=False, dynamic_ncols=True)
    t0 = time.time()
    try:
        order = torch.randperm(len(images), generator=gen)
        pos = 0
        for step in bar:
            if pos + batch_size > len(order):
                order, pos = torch.randperm(len(images), generator=gen), 0
            xb = images[order[pos:pos + batch_size]]
            pos += batch_size
            if augment:
                xb = augment_batch(xb, pad=pad, flip=flip, generator=gen)
            model(xb.to(device))
            losses, agree, kept = [], 0.0, 0.0
            for g in gates:
                target = saliency_targets(g.last_pooled.detach().float(), keep)
                y = g.last_logits.float()
                losses.append(F.binary_cross_entropy_with_logits(y, target))
                with torch.no_grad():
                    agree += float(((y > 0).float() == target).float().mean())
                    kept += float((y > 0).float().mean())
            loss = torch.stack(losses).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 20 == 0 or step == steps - 1:
                rec = {"step": step + 1, "bce": float(loss.detach()), "agreement": agree / len(gates),
                       "kept": kept / len(gates), "seconds": round(time.time() - t0, 1)}
                history.append(rec)
                if progress:
                    bar.set_postfix(bce=f"{rec['bce']:.3f}", agree=f"{rec['agreement']:.3f}")
    finally:
        for g, (fo, rp) in zip(gates, saved):
            g.force_open, g.record_pooled = fo, rp
            g.last_pooled = None
        for p, rg in frozen:
            p.requires_grad_(rg)
        model.train(was_training)
    if history:
        log.info("gate warm start: %d steps, %.1f s, final bce %.3f, agreement %.3f, kept %.3f", steps,
                 history[-1]["seconds"], history[-1]["bce"], history[-1]["agreement"], history[-1]["kept"])
    return history
