"""`python -m pydecouple train`: dense pre-training, or decoupling fine-tuning
from a dense checkpoint. Runs unchanged under ``torchrun --nproc_per_node=N``.

Examples::

    # dense small VGG on the CIFAR-10 subset
    python -m pydecouple train --data ../shared/data/cifar10/cifar10-subset.npz \\
        --arch small_vgg --epochs 8 --lr 0.05 --out runs/small_vgg_dense
    # decouple it and fine-tune (the settings of docs/method.md)
    python -m pydecouple train --data ../shared/data/cifar10/cifar10-subset.npz \\
        --init runs/small_vgg_dense/last.pt --decouple --epochs 2 --lr 0.01 --weight-decay 1e-4 \\
        --gate-logit-norm --gate-bias-init 2 --lam-m 1 --gate-lr-mult 10 --lam-s 0.5 --rho 0.6 \\
        --out runs/small_vgg_dec
    # the same under torchrun (DDP; gloo on CPU, NCCL on GPUs)
    torchrun --nproc_per_node=2 -m pydecouple train --data digits --epochs 2 --out runs/digits_ddp
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

EXIT_OK, EXIT_USAGE, EXIT_DATA = 0, 2, 3


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("Examples::", 1)[1]
    g = p.add_argument_group("data and model")
    g.add_argument("--data", default="digits",
                   help="'digits' (embedded, default), a CIFAR-10 .npz, or a cifar-10-batches-py folder")
    g.add_argument("--arch", default=None, help="small_vgg, vgg16, vgg_cfg_e, resnet20, resnet56, tiny_cnn "
                   "(default: tiny_cnn for digits, small_vgg otherwise; ignored with --init)")
    g.add_argument("--init", default=None, metavar="CKPT", help="start from this checkpoint (e.g. the dense one)")
    g.add_argument("--decouple", action="store_true", help="decouple the model (gates + decoupling loss)")
    g.add_argument("--train-subset", type=int, default=None, help="use only the first N training images (class-balanced order is not guaranteed)")
    g.add_argument("--test-subset", type=int, default=None, help="evaluate on the first N test images")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=int, default=8)
    o.add_argument("--batch-size", type=int, default=128, help="per process")
    o.add_argument("--lr", type=float, default=0.05)
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--weight-decay", type=float, default=5e-4)
    o.add_argument("--schedule", choices=["cosine", "step", "constant"], default="cosine")
    o.add_argument("--milestones", type=int, nargs="*", default=[], help="epochs of x0.1 steps (--schedule step)")
    o.add_argument("--lr-warmup-steps", type=int, default=0)
    o.add_argument("--no-augment", action="store_true")
    o.add_argument("--max-steps-per-epoch", type=int, default=None, help="cut epochs short (smoke tests)")
    d = p.add_argument_group("decoupling (with --decouple)")
    d.add_argument("--lam-k", type=float, default=1.0, help="weight of L_KL")
    d.add_argument("--lam-m", type=float, default=0.04, help="weight of L_MI")
    d.add_argument("--lam-s", type=float, default=2e-4, help="weight of L_S")
    d.add_argument("--rho", type=float, default=0.0, help="target kept fraction of L_S (0: plain L1)")
    d.add_argument("--normalize-sparsity", action="store_true", help="divide each layer's L_S by its width")
    d.add_argument("--kl-direction", choices=["output_gate", "gate_output"], default="output_gate")
    d.add_argument("--mi-init", choices=["zeros", "default"], default="zeros",
                   help="MI classifiers' init (zeros: L_MI starts at chance; default: PyTorch's, as the authors)")
    d.add_argument("--gate-lr-mult", type=float, default=1.0, help="lr multiplier of the gates and MI classifiers")
    d.add_argument("--gate-weight-decay", type=float, default=None)
    d.add_argument("--sparsity-warmup", type=float, default=0.0, help="epochs over which lam_s ramps up from 0")
    d.add_argument("--gate-warm-start", type=int, default=0, metavar="STEPS",
                   help="fit the gates to the dense network's per-image filter saliency for STEPS steps "
                        "before fine-tuning (docs/method.md); 0: off")
    d.add_argument("--gate-noise-final", type=float, default=None, metavar="STD",
                   help="anneal the SemHash noise linearly from --gate-noise to STD over the run (default: constant)")
    d.add_argument("--gate-warm-start-keep", type=float, default=None, metavar="FRAC",
                   help="the warm start's kept fraction per layer (default: --rho, or 0.5)")
    d.add_argument("--gate-init", choices=["open", "paper"], default="open", help="ACM initialisation")
    d.add_argument("--gate-noise", type=float, default=1.0, help="SemHash noise std")
    d.add_argument("--gate-bias-init", type=float, default=3.0)
    d.add_argument("--gate-input-grad", action="store_true",
                   help="let gradients flow from the gates into the backbone features (the authors' code)")
    d.add_argument("--gate-norm-gamma", type=float, default=1.0, help="initial gamma of --gate-logit-norm")
    d.add_argument("--gate-logit-norm", action="store_true", help="batch-normalise the gate logits")
    r = p.add_argument_group("run")
    r.add_argument("--out", default="runs/train", help="output folder: metrics.jsonl, last.pt")
    r.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    r.add_argument("--stop-after-epochs", type=int, default=None,
                   help="stop after this many epochs (the schedule still spans --epochs); continue with --resume")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    r.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    r.add_argument("--no-progress", action="store_true")


def _init_distributed():
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
        return True
    return False


def run(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from .. import checkpoint as ckpt
    from ..data import DataError, load_dataset
    from ..losses import DecouplingLoss
    from ..models import build
    from ..nn import decouple, is_decoupled
    from ..train import train

    started = _init_distributed()
    rank = dist.get_rank() if dist.is_initialized() else 0
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        xtr, ytr, classes = load_dataset(args.data, "train")
        xte, yte, _ = load_dataset(args.data, "test")
    except DataError as e:
        print(f"pydecouple train: {e}", file=sys.stderr)
        return EXIT_DATA
    if args.train_subset:
        xtr, ytr = xtr[:args.train_subset], ytr[:args.train_subset]
    if args.test_subset:
        xte, yte = xte[:args.test_subset], yte[:args.test_subset]
    gate_kw = {"init": args.gate_init, "noise_std": args.gate_noise, "bias_init": args.gate_bias_init,
               "logit_norm": args.gate_logit_norm, "detach_input": not args.gate_input_grad,
               "norm_gamma_init": args.gate_norm_gamma}
    torch.manual_seed(args.seed)
    if args.init:
        try:
            model, meta = ckpt.load_model(args.init)
        except ckpt.CheckpointError as e:
            print(f"pydecouple train: {e}", file=sys.stderr)
            return EXIT_DATA
        meta = dict(meta)
        model.train()
        if args.decouple and not is_decoupled(model):
            model = decouple(model, inplace=True, **gate_kw)
            meta["decoupled"], meta["decouple_kwargs"] = True, gate_kw
        meta["init"] = str(args.init)
    else:
        arch = args.arch or ("tiny_cnn" if args.data == "digits" else "small_vgg")
        meta = {"arch": arch, "num_classes": len(classes), "in_channels": int(xtr.shape[1]),
                "decoupled": bool(args.decouple), "decouple_kwargs": gate_kw if args.decouple else {}}
        try:
            model = build(arch, len(classes), args.decouple, int(xtr.shape[1]), decouple_kwargs=gate_kw)
        except ValueError as e:
            print(f"pydecouple train: {e}", file=sys.stderr)
            return EXIT_USAGE
    meta.update({"dataset": str(args.data), "classes": list(classes)})
    loss = None
    if is_decoupled(model):
        loss = DecouplingLoss(model, len(classes), lam_k=args.lam_k, lam_m=args.lam_m, lam_s=args.lam_s,
                              rho=args.rho, kl_direction=args.kl_direction,
                              normalize_sparsity=args.normalize_sparsity, mi_init=args.mi_init)
    meta["train_args"] = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    hist = train(model, (xtr, ytr), (xte, yte), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                 momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
                 milestones=args.milestones, lr_warmup_steps=args.lr_warmup_steps, loss=loss,
                 gate_lr_mult=args.gate_lr_mult, gate_weight_decay=args.gate_weight_decay,
                 sparsity_warmup=args.sparsity_warmup, gate_warm_start_steps=args.gate_warm_start,
                 gate_warm_start_keep=args.gate_warm_start_keep, gate_noise_final=args.gate_noise_final, augment=not args.no_augment, seed=args.seed,
                 out_dir=args.out, meta=meta, resume=args.resume, max_steps_per_epoch=args.max_steps_per_epoch,
                 stop_after_epochs=args.stop_after_epochs,
                 progress=not args.no_progress, device=args.device)
    if rank == 0 and hist:
        print(json.dumps(hist[-1]))
    if started:
        dist.barrier()  # every rank done before any tears down: a rank leaving early can abort a slower one
        dist.destroy_process_group()
    return EXIT_OK
