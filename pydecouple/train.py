"""Training: dense pre-training and decoupling fine-tuning, on one CPU or many
GPUs (``torchrun``: DistributedDataParallel, NCCL on GPUs, gloo on CPU).

``train(model, train_data, test_data, ...)`` is the function API (the demo
uses it without a subprocess); ``python -m pydecouple train`` wraps it
(:mod:`pydecouple.commands.train`).

Per epoch (rank 0): a JSON line in ``<out_dir>/metrics.jsonl`` with each loss
term, train and test accuracy, the kept fraction per gated layer, the FLOPs
ratio, the fraction of gates that never change over the test images, and the
MI term on hard gates; a checkpoint ``<out_dir>/last.pt`` (model, optimizer,
scheduler, MI classifiers, epoch) from which ``resume=True`` continues.
Every epoch re-seeds from ``(seed, epoch, rank)``, so a resumed run repeats the
uninterrupted one.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint as ckpt
from .data import augment as augment_batch
from .flops import FlopsCounter
from .losses import DecouplingLoss
from .nn.gate import gate_modules

__all__ = ["train", "evaluate", "gate_statistics", "collect_masks"]

log = logging.getLogger("pydecouple.train")

Data = Tuple[torch.Tensor, torch.Tensor]


class _Objective(nn.Module):
    """Model + loss in one module, so DDP synchronises the MI classifiers too."""

    def __init__(self, model: nn.Module, loss: Optional[DecouplingLoss]) -> None:
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        logits = self.model(x)
        if self.loss is None:
            ce = F.cross_entropy(logits, y)
            return logits, ce, {"ce": ce.detach(), "total": ce.detach()}
        # A loss with a teacher (knowledge distillation) runs it on the same augmented batch.
        total, terms = self.loss(logits, y, x) if getattr(self.loss, "takes_inputs", False) else self.loss(logits, y)
        return logits, total, terms


def _rank_world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collect_masks(model: nn.Module, x: torch.Tensor, batch_size: int = 500, device=None) -> List[torch.Tensor]:
    """Hard eval masks of every gated layer over images ``x``: a list of (N, C_l) bool."""
    was = model.training
    model.eval()
    gates = [g for _, g in gate_modules(model)]
    out: List[List[torch.Tensor]] = [[] for _ in gates]
    device = device or next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size].to(device))
            for j, g in enumerate(gates):
                out[j].append(g.last_mask.cpu())
    model.train(was)
    return [torch.cat(o) for o in out]


def _constant_fraction(masks: Sequence[torch.Tensor]) -> Tuple[float, List[float]]:
    per = []
    total, const = 0, 0
    for m in masks:
        c = (m.all(0) | (~m).all(0))
        per.append(float(c.float().mean()))
        total += m.shape[1]
        const += int(c.sum())
    return (const / total if total else 0.0), per


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500,
             loss: Optional[DecouplingLoss] = None, device=None) -> Dict[str, Any]:
    """Accuracy, CE, and for a decoupled model: kept fraction per layer, FLOPs
    ratio, fraction of constant gates, and L_MI on the hard gates (with the
    loss's classifiers), all over ``x``."""
    was = model.training
    model.eval()
    device = device or next(model.parameters()).device
    gates = [g for _, g in gate_modules(model)]
    masks: List[List[torch.Tensor]] = [[] for _ in gates]
    correct, ce_sum, n = 0, 0.0, 0
    with FlopsCounter(model) as fc:
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            logits = model(xb)
            ce_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
            correct += int((logits.argmax(1) == yb).sum())
            n += len(yb)
            for j, g in enumerate(gates):
                masks[j].append(g.last_mask.cpu())
    model.train(was)
    res: Dict[str, Any] = {"acc": correct / max(n, 1), "ce": ce_sum / max(n, 1)}
    if gates:
        ms = [torch.cat(m) for m in masks]
        res["kept"] = [float(m.float().mean()) for m in ms]
        res["flops_ratio"] = fc.report().ratio
        res["constant_gates"], res["constant_per_layer"] = _constant_fraction(ms)
        if loss is not None:
            with torch.no_grad():
                yc = y[:n].cpu()
                res["mi"] = float(sum(F.cross_entropy(F.linear(m.float(), u.weight.detach().cpu()), yc) for u, m in zip(loss.classifiers, ms)))
                res["mi_chance"] = loss.mi_chance
    return res


def gate_statistics(model: nn.Module, train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                    test_y: torch.Tensor, loss: Optional[DecouplingLoss] = None, max_fit: int = 5000) -> Dict[str, Any]:
    """Whether paths depend on the input.

    * ``constant_gates``: fraction of (layer, filter) gates that take one value
      over all of ``train_x`` (never change); per layer too.
    * ``mi`` (with ``loss``): sum over layers of CE(U_l m_l, y) on hard train
      gates; ``mi_chance = n_layers ln K``.
    * ``predictability``: per layer, test accuracy of a logistic regression
      fitted on the train gate vectors alone (chance 1/K), and on all layers'
      gates concatenated.
    """
    from sklearn.linear_model import LogisticRegression

    mtr = collect_masks(model, train_x)
    mte = collect_masks(model, test_x)
    const, per = _constant_fraction(mtr)
    res: Dict[str, Any] = {"constant_gates": const, "constant_per_layer": per,
                           "kept": [float(m.float().mean()) for m in mtr]}
    if loss is not None:
        res["mi"] = float(sum(F.cross_entropy(F.linear(m.float(), u.weight.detach().cpu()), train_y) for u, m in zip(loss.classifiers, mtr)))
        res["mi_chance"] = loss.mi_chance
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(train_x), generator=g)[:max_fit]
    pred = []
    ytr, yte = train_y[idx].numpy(), test_y.numpy()
    for a, b in list(zip(mtr, mte)) + [(torch.cat(mtr, 1), torch.cat(mte, 1))]:
        A, B = a[idx].float().numpy(), b.float().numpy()
        if A.std(0).max() == 0:
            pred.append(float((yte == np.bincount(ytr).argmax()).mean()))
            continue
        clf = LogisticRegression(max_iter=300, C=1.0)
        clf.fit(A, ytr)
        pred.append(float(clf.score(B, yte)))
    res["predictability"] = pred[:-1]
    res["predictability_all_layers"] = pred[-1]
    return res


def _record_epoch(rec: Dict[str, Any], model: nn.Module, test_data: Optional[Data], eval_batch_size: int,
                  loss: Optional[DecouplingLoss], device, out: Optional[Path]) -> Dict[str, Any]:
    """Rank 0: add the test-set evaluation to ``rec``, log it, append it to ``<out>/metrics.jsonl``."""
    if test_data is not None:
        ev = evaluate(model, test_data[0], test_data[1], eval_batch_size, loss, device)
        rec.update({f"test_{k}" if k in ("acc", "ce") else k: v for k, v in ev.items()})
    log.info("%s", json.dumps(rec), extra={"metrics": rec})  # the command shows it as a short line
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
    return rec


def _param_groups(model: nn.Module, loss: Optional[nn.Module], lr: float, weight_decay: float, gate_lr_mult: float,
                  gate_weight_decay: Optional[float]):
    gate_ids = {id(p) for _, g in gate_modules(model) for p in g.parameters()}
    base = [p for p in model.parameters() if id(p) not in gate_ids]
    gate = [p for p in model.parameters() if id(p) in gate_ids]
    if loss is not None:
        gate += list(loss.parameters())
    gwd = weight_decay if gate_weight_decay is None else gate_weight_decay
    groups = [{"params": base, "lr": lr, "weight_decay": weight_decay, "name": "model"}]
    if gate:
        groups.append({"params": gate, "lr": lr * gate_lr_mult, "weight_decay": gwd, "name": "gates"})
    return groups


def _lr_lambda(schedule: str, total_steps: int, steps_per_epoch: int, milestones: Sequence[int], warmup_steps: int):
    def f(step: int) -> float:
        w = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        if schedule == "cosine":
            return w * 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
        if schedule == "step":
            return w * 0.1 ** sum(step >= m * steps_per_epoch for m in milestones)
        return w

    return f


def train(
    model: nn.Module,
    train_data: Data,
    test_data: Optional[Data] = None,
    *,
    epochs: int = 1,
    batch_size: int = 128,
    lr: float = 0.05,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    milestones: Sequence[int] = (),
    lr_warmup_steps: int = 0,
    loss: Optional[DecouplingLoss] = None,
    gate_lr_mult: float = 1.0,
    gate_weight_decay: Optional[float] = None,
    sparsity_warmup: float = 0.0,
    gate_warm_start_steps: int = 0,
    gate_warm_start_keep: Optional[float] = None,
    gate_noise_final: Optional[float] = None,
    augment: Optional[bool] = None,
    seed: int = 0,
    out_dir: Optional[str] = None,
    meta: Optional[Dict[str, Any]] = None,
    resume: bool = False,
    max_steps_per_epoch: Optional[int] = None,
    stop_after_epochs: Optional[int] = None,
    eval_batch_size: int = 500,
    progress: bool = True,
    device: Optional[torch.device] = None,
) -> List[Dict[str, Any]]:
    """Train ``model`` (dense when ``loss`` is None, else with the decoupling loss).

    Args:
        model: the model (dense or decoupled); moved to ``device``.
        train_data, test_data: ``(images in [0,1] (N,C,H,W), labels)`` tensors (CPU).
        epochs, batch_size (per process), lr, momentum, weight_decay: SGD.
        schedule: ``"cosine"`` (per step), ``"step"`` (x0.1 at ``milestones`` epochs) or ``"constant"``.
        lr_warmup_steps: linear learning-rate warm-up.
        loss: a :class:`~pydecouple.losses.DecouplingLoss` built on ``model``; its MI
            classifiers are trained with the gates. Or a
            :class:`~pydecouple.losses.DistillationLoss` (a dense student and its teacher).
        gate_lr_mult: learning-rate multiplier for the ACMs and MI classifiers.
        gate_weight_decay: their weight decay (default: ``weight_decay``).
        sparsity_warmup: epochs over which lam_s ramps linearly from 0.
        gate_warm_start_steps: before the first epoch (not on resume), fit the
            ACMs to the dense network's per-image filter saliency for this many
            steps (:func:`pydecouple.warmstart.warm_start_gates`); 0: off.
        gate_warm_start_keep: its target kept fraction (default: the loss's
            ``rho``, or 0.5 when ``rho`` is 0).
        gate_noise_final: anneal every ACM's SemHash noise linearly, per step,
            from its own ``noise_std`` to this value at the last step (None: off),
            so the training gate ends close to the deterministic eval gate.
        augment: random crop + flip (None: on, with pad 4 + flip for >= 16 px
            images, pad 1 and no flip for smaller ones).
        seed: every epoch re-seeds from (seed, epoch, rank).
        out_dir: where rank 0 writes ``metrics.jsonl`` and ``last.pt`` (None: nowhere).
        meta: stored in the checkpoint (``arch``, ``num_classes``, ... for ``load_model``).
        resume: continue from ``<out_dir>/last.pt`` if it exists.
        max_steps_per_epoch: cut epochs short (tests).
        stop_after_epochs: return after this many epochs in total (the schedule
            still spans ``epochs``; continue later with ``resume=True``).
        device: default CUDA (this rank's GPU under torchrun) if available, else CPU.

    Under ``torch.distributed`` (initialised by the caller, e.g. the command under
    torchrun) the model and loss are wrapped in DDP, the training set is split by
    a ``DistributedSampler``, and only rank 0 evaluates, logs and checkpoints.

    Returns:
        The history: one dict per epoch (what ``metrics.jsonl`` holds).
    """
    rank, world = _rank_world()
    if device is None:
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if world > 1 else torch.cuda.current_device())
        else:
            device = torch.device("cpu")
    device = torch.device(device)
    xtr, ytr = train_data
    if len(xtr) != len(ytr) or len(xtr) == 0:
        raise ValueError(f"train: train_data has {len(xtr)} images and {len(ytr)} labels")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"train: epochs must be an int >= 1, got {epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"train: batch_size must be an int >= 1, got {batch_size!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"train: lr must be a finite number > 0, got {lr!r}")
    if gate_warm_start_steps < 0:
        raise ValueError(f"train: gate_warm_start_steps must be >= 0 (0: no warm start), got {gate_warm_start_steps}")
    if gate_noise_final is not None and gate_noise_final < 0:
        raise ValueError(f"train: gate_noise_final must be >= 0 (a noise standard deviation) or None, got {gate_noise_final}")
    if augment is None:
        augment = True
    pad, flip = (4, True) if xtr.shape[-1] >= 16 else (1, False)
    model.to(device)
    if loss is not None:
        loss.to(device)
    objective = _Objective(model, loss)
    groups = _param_groups(model, loss, lr, weight_decay, gate_lr_mult, gate_weight_decay)
    opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = len(xtr) // world // batch_size + (1 if (len(xtr) // world) % batch_size >= 2 else 0)
    if max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, max_steps_per_epoch)
    steps_per_epoch = max(steps_per_epoch, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, _lr_lambda(schedule, epochs * steps_per_epoch, steps_per_epoch, milestones, lr_warmup_steps))
    history: List[Dict[str, Any]] = []
    start_epoch = 0
    out = Path(out_dir) if out_dir else None
    last = out / "last.pt" if out else None
    if resume and last is not None and last.is_file():
        blob = ckpt.load(last, map_location=str(device) if device.type != "cuda" else "cpu")
        try:  # a last.pt of another model or loss, or without training state: one clear error, not a traceback
            model.load_state_dict(blob["state_dict"])
            ex = blob["extra"]
            opt.load_state_dict(ex["optimizer"])
            sched.load_state_dict(ex["scheduler"])
            if loss is not None and ex.get("loss") is not None:
                loss.load_state_dict(ex["loss"])
            start_epoch = int(ex["epoch"]) + 1
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise ckpt.CheckpointError(
                f"{last}: cannot resume from it: it is not this run's training state (another model, loss or "
                f"optimizer, or no training state): {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            ) from e
        history = list(ex.get("history") or [])
        if rank == 0:
            log.info("resumed from %s at epoch %d", last, start_epoch)
    elif resume and rank == 0:
        log.info("resume: no checkpoint at %s, starting fresh", last)

    if gate_warm_start_steps and loss is not None and start_epoch == 0:
        # Before DDP wraps the model: DDP's constructor then broadcasts rank 0's gates.
        from .warmstart import warm_start_gates

        keep = gate_warm_start_keep if gate_warm_start_keep is not None else (loss.rho or 0.5)
        ws = warm_start_gates(model, xtr, keep, steps=gate_warm_start_steps, batch_size=batch_size,
                              seed=seed * 31 + rank, device=device, progress=progress and rank == 0)
        if rank == 0:
            _record_epoch({"epoch": 0, "gate_warm_start": ws[-1]}, model, test_data, eval_batch_size, loss, device, out)

    net: nn.Module = objective
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)
    if out and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    meta = dict(meta or {})
    if loss is not None:
        meta.setdefault("loss", loss.describe() if hasattr(loss, "describe") else
                        {"lam_k": loss.lam_k, "lam_m": loss.lam_m, "lam_s": loss.lam_s, "rho": loss.rho,
                         "kl_direction": loss.kl_direction})

    end_epoch = min(epochs, stop_after_epochs) if stop_after_epochs else epochs
    acms = [g for _, g in gate_modules(model)]
    noise0 = [g.noise_std for g in acms]  # put back at the end: the anneal is this run's schedule
    for epoch in range(start_epoch, end_epoch):
        torch.manual_seed(seed * 100003 + epoch * 1009 + rank)
        gen = torch.Generator().manual_seed(seed * 100003 + epoch * 1009 + rank)
        if world > 1:
            sampler = torch.utils.data.DistributedSampler(range(len(xtr)), num_replicas=world, rank=rank,
                                                          shuffle=True, seed=seed, drop_last=True)
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler))
        else:
            order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        objective.train()
        sums: Dict[str, float] = {}
        correct, seen = 0, 0
        t0 = time.time()
        bar = range(steps_per_epoch)
        if progress and rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(bar, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)
        for step in bar:
            idx = order[step * batch_size:(step + 1) * batch_size]
            xb, yb = xtr[idx], ytr[idx]
            if augment:
                xb = augment_batch(xb, pad=pad, flip=flip, generator=gen)
            xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
            if gate_noise_final is not None:
                frac = (epoch * steps_per_epoch + step) / max(epochs * steps_per_epoch - 1, 1)
                for g, n0 in zip(acms, noise0):
                    g.noise_std = n0 + (gate_noise_final - n0) * frac
            if loss is not None:
                loss.sparsity_scale = min(1.0, (epoch + step / steps_per_epoch) / sparsity_warmup) if sparsity_warmup else 1.0
            logits, total, terms = net(xb, yb)
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            sched.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(yb)
            correct += int((logits.detach().argmax(1) == yb).sum())
            seen += len(yb)
            if progress and rank == 0 and step % 10 == 0:
                bar.set_postfix(loss=f"{float(terms['total']):.3f}", acc=f"{correct / seen:.3f}")
        if world > 1:
            # BN running statistics are updated locally after DDP's last broadcast:
            # make every rank hold rank 0's, as the checkpoint does.
            for b in model.buffers():
                dist.broadcast(b, 0)
        rec: Dict[str, Any] = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - t0, 1),
                               "train_acc": correct / max(seen, 1)}
        rec.update({f"train_{k}": v / max(seen, 1) for k, v in sums.items()})
        if rank == 0:
            history.append(_record_epoch(rec, model, test_data, eval_batch_size, loss, device, out))
            if out is not None:
                extra = {"epoch": epoch, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "loss": loss.state_dict() if loss is not None else None, "history": history}
                ckpt.save(last, model, meta, extra)
        else:
            history.append(rec)
        if world > 1:
            dist.barrier()
    for g, n0 in zip(acms, noise0):
        g.noise_std = n0
    if world > 1:
        # Left to interpreter shutdown, what training leaves in reference cycles (DDP's
        # reducer and the gloo work it holds; which object exactly was not pinned down)
        # aborted a rank ("terminate called without an active exception") in 3 of 78
        # two-rank torchrun runs on this machine, 0 of 140 with this collection: free it
        # here, while the caller can still destroy_process_group() cleanly.
        del net
        gc.collect()
    return history
