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

from ._common import UsageError, check_device, check_model_fits_data, integer, make_out_dir, number, quiet_rebuild

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
    g.add_argument("--train-subset", type=integer(1), default=None, metavar="N",
                   help="use only the first N training images (class-balanced order is not guaranteed)")
    g.add_argument("--test-subset", type=integer(1), default=None, metavar="N", help="evaluate on the first N test images")
    o = p.add_argument_group("optimisation")
    o.add_argument("--epochs", type=integer(1), default=8)
    o.add_argument("--batch-size", type=integer(1), default=128, help="per process")
    o.add_argument("--lr", type=number(0, low_open=True), default=0.05)
    o.add_argument("--momentum", type=number(0, 1, high_open=True), default=0.9)
    o.add_argument("--weight-decay", type=number(0), default=5e-4)
    o.add_argument("--schedule", choices=["cosine", "step", "constant"], default="cosine")
    o.add_argument("--milestones", type=integer(1), nargs="*", default=[], help="epochs of x0.1 steps (--schedule step)")
    o.add_argument("--lr-warmup-steps", type=integer(0), default=0)
    o.add_argument("--no-augment", action="store_true")
    o.add_argument("--max-steps-per-epoch", type=integer(1), default=None, help="cut epochs short (smoke tests)")
    d = p.add_argument_group("decoupling (with --decouple)")
    d.add_argument("--lam-k", type=number(0), default=1.0, help="weight of L_KL")
    d.add_argument("--lam-m", type=number(0), default=0.04, help="weight of L_MI")
    d.add_argument("--lam-s", type=number(0), default=2e-4, help="weight of L_S")
    d.add_argument("--rho", type=number(0, 1, note="a kept fraction"), default=0.0,
                   help="target kept fraction of L_S (0: plain L1)")
    d.add_argument("--normalize-sparsity", action="store_true", help="divide each layer's L_S by its width")
    d.add_argument("--kl-direction", choices=["output_gate", "gate_output"], default="output_gate")
    d.add_argument("--mi-init", choices=["zeros", "default"], default="zeros",
                   help="MI classifiers' init (zeros: L_MI starts at chance; default: PyTorch's, as the authors)")
    d.add_argument("--gate-lr-mult", type=number(0), default=1.0, help="lr multiplier of the gates and MI classifiers")
    d.add_argument("--gate-weight-decay", type=number(0), default=None)
    d.add_argument("--sparsity-warmup", type=number(0), default=0.0, help="epochs over which lam_s ramps up from 0")
    d.add_argument("--gate-warm-start", type=integer(0), default=0, metavar="STEPS",
                   help="fit the gates to the dense network's per-image filter saliency for STEPS steps "
                        "before fine-tuning (docs/method.md); 0: off")
    d.add_argument("--gate-noise-final", type=number(0), default=None, metavar="STD",
                   help="anneal the SemHash noise linearly from --gate-noise to STD over the run (default: constant)")
    d.add_argument("--gate-warm-start-keep", type=number(0, 1, low_open=True, note="a kept fraction"), default=None,
                   metavar="FRAC",
                   help="the warm start's kept fraction per layer (default: --rho, or 0.5)")
    d.add_argument("--gate-init", choices=["open", "paper"], default="open", help="ACM initialisation")
    d.add_argument("--gate-noise", type=number(0), default=1.0, help="SemHash noise std")
    d.add_argument("--gate-bias-init", type=number(), default=3.0)
    d.add_argument("--gate-input-grad", action="store_true",
                   help="let gradients flow from the gates into the backbone features (the authors' code)")
    d.add_argument("--gate-norm-gamma", type=number(), default=1.0, help="initial gamma of --gate-logit-norm")
    d.add_argument("--gate-logit-norm", action="store_true", help="batch-normalise the gate logits")
    r = p.add_argument_group("run")
    r.add_argument("--out", default="runs/train", help="output folder: metrics.jsonl, last.pt")
    r.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    r.add_argument("--stop-after-epochs", type=integer(1), default=None,
                   help="stop after this many epochs (the schedule still spans --epochs); continue with --resume")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--threads", type=integer(0, note="0: torch's own choice"), default=None,
                   help="torch CPU threads per process")
    r.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    r.add_argument("--no-progress", action="store_true")
    # Which arguments only a decoupled model uses: given to a dense one, they would do nothing, silently.
    p.set_defaults(_decoupling_args={a.dest: (a.option_strings[0], a.default) for a in d._group_actions})


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


class _ProgressFormatter(logging.Formatter):
    """Per-epoch records (logged by pydecouple.train with ``extra={"metrics": rec}``) as one
    short progress line. The full record goes to <out>/metrics.jsonl, and the last one to
    stdout as the command's result: logging it whole too printed the last epoch twice."""

    KEYS = (("train_acc", "train acc", "{:.1%}"), ("test_acc", "test acc", "{:.1%}"), ("train_total", "loss", "{:.4g}"),
            ("flops_ratio", "FLOPs", "{:.2f}"), ("constant_gates", "constant gates", "{:.0%}"))

    def __init__(self, epochs: int) -> None:
        super().__init__("%(asctime)s %(name)s %(message)s")
        self.epochs = epochs

    def format(self, record: logging.LogRecord) -> str:
        rec = getattr(record, "metrics", None)
        if isinstance(rec, dict) and "epoch" in rec:
            parts = [f"{label} {fmt.format(rec[k])}" for k, label, fmt in self.KEYS if isinstance(rec.get(k), (int, float))]
            head = "gate warm start" if rec.get("gate_warm_start") is not None else f"epoch {rec['epoch']}/{self.epochs}"
            tail = f" ({rec['seconds']} s)" if "seconds" in rec else ""
            record = logging.makeLogRecord({**record.__dict__, "msg": f"{head}: {', '.join(parts)}{tail}", "args": None})
        return super().format(record)


def _setup_logging(rank: int, epochs: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_ProgressFormatter(epochs))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=[handler])


# Arguments that shape the gates decouple() adds: they do nothing to a checkpoint decoupled already.
_GATE_BUILD_ARGS = ("gate_init", "gate_noise", "gate_bias_init", "gate_logit_norm", "gate_input_grad", "gate_norm_gamma")


def _check_arguments(args: argparse.Namespace) -> None:
    """What can be refused before any data is read (also before torch.distributed starts)."""
    if args.milestones and args.schedule != "step":
        raise UsageError("--milestones", "only with --schedule step (the other schedules ignore it)",
                         f"{args.milestones} with --schedule {args.schedule}")
    late = [m for m in args.milestones if m > args.epochs]
    if late:
        raise UsageError("--milestones", f"epochs within --epochs {args.epochs}", f"{late}, which never come")
    if args.gate_warm_start_keep is not None and not args.gate_warm_start:
        raise UsageError("--gate-warm-start-keep", "only with --gate-warm-start STEPS > 0 (it sets that warm start's "
                         "kept fraction)", f"{args.gate_warm_start_keep} without a warm start")
    args.device = check_device("--device", args.device)
    make_out_dir("--out", args.out)


def _check_decoupling_args(args: argparse.Namespace, decoupled: bool, decoupled_here: bool) -> None:
    """Decoupling arguments given where they would do nothing, silently."""
    given = {dest: opt for dest, (opt, default) in args._decoupling_args.items() if getattr(args, dest) != default}
    if not decoupled and given:
        opt = next(iter(given.values()))
        src = f"--init {args.init!r}" if args.init else "a model built without --decouple"
        raise UsageError(opt, "a decoupled model (add --decouple): it sets the gates or the decoupling loss",
                         f"{opt} {getattr(args, next(iter(given)))} for {src}, which is dense")
    built = [given[d] for d in _GATE_BUILD_ARGS if d in given]
    if decoupled and not decoupled_here and built:
        raise UsageError(built[0], "a model this command decouples (a dense --init with --decouple): it shapes the "
                         "gates decouple() adds", f"{built[0]} for --init {args.init!r}, whose gates exist already")


def run(args: argparse.Namespace) -> int:
    try:
        _check_arguments(args)
    except UsageError as e:
        print(f"pydecouple train: {e}", file=sys.stderr)
        return EXIT_USAGE
    import torch.distributed as dist

    started = _init_distributed()
    try:
        code = _run(args)
    except BaseException:
        if started:
            dist.destroy_process_group()
        raise
    if started:
        if code == EXIT_OK:
            dist.barrier()  # every rank done before any tears down: a rank leaving early can abort a slower one
        dist.destroy_process_group()
    return code


def _run(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from .. import checkpoint as ckpt
    from ..data import DataError, load_dataset
    from ..losses import DecouplingLoss
    from ..models import build
    from ..nn import decouple, is_decoupled
    from ..train import train

    rank = dist.get_rank() if dist.is_initialized() else 0
    _setup_logging(rank, args.epochs)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        xtr, ytr, classes = load_dataset(args.data, "train")
        xte, yte, _ = load_dataset(args.data, "test")
    except DataError as e:
        print(f"pydecouple train: argument --data: {e}", file=sys.stderr)
        return EXIT_DATA
    if args.train_subset:
        xtr, ytr = xtr[:args.train_subset], ytr[:args.train_subset]
    if args.test_subset:
        xte, yte = xte[:args.test_subset], yte[:args.test_subset]
    gate_kw = {"init": args.gate_init, "noise_std": args.gate_noise, "bias_init": args.gate_bias_init,
               "logit_norm": args.gate_logit_norm, "detach_input": not args.gate_input_grad,
               "norm_gamma_init": args.gate_norm_gamma}
    torch.manual_seed(args.seed)
    try:
        if args.init:
            try:
                with quiet_rebuild():
                    model, meta = ckpt.load_model(args.init)
            except ckpt.CheckpointError as e:
                print(f"pydecouple train: argument --init: expected a checkpoint written by `pydecouple train`, "
                      f"got {e}", file=sys.stderr)
                return EXIT_DATA
            if args.arch and args.arch != meta.get("arch"):
                raise UsageError("--arch", f"no --arch with --init, or the checkpoint's own ({meta.get('arch')!r})",
                                 repr(args.arch))
            meta = dict(meta)
            check_model_fits_data(model, xtr, torch.cat((ytr, yte)), "--init", args.init, "--data", args.data, meta)
            model.train()
            decoupled_here = args.decouple and not is_decoupled(model)
            _check_decoupling_args(args, is_decoupled(model) or decoupled_here, decoupled_here)
            if decoupled_here:
                model = decouple(model, inplace=True, **gate_kw)
                meta["decoupled"], meta["decouple_kwargs"] = True, gate_kw
            meta["init"] = str(args.init)
        else:
            arch = args.arch or ("tiny_cnn" if args.data == "digits" else "small_vgg")
            meta = {"arch": arch, "num_classes": len(classes), "in_channels": int(xtr.shape[1]),
                    "decoupled": bool(args.decouple), "decouple_kwargs": gate_kw if args.decouple else {}}
            _check_decoupling_args(args, bool(args.decouple), bool(args.decouple))
            try:
                model = build(arch, len(classes), args.decouple, int(xtr.shape[1]), decouple_kwargs=gate_kw)
            except ValueError as e:
                print(f"pydecouple train: argument --arch: {e}", file=sys.stderr)
                return EXIT_USAGE
            check_model_fits_data(model, xtr, torch.cat((ytr, yte)), "--arch", arch, "--data", args.data, meta)
    except UsageError as e:
        print(f"pydecouple train: {e}", file=sys.stderr)
        # docs/method.md's exit codes: 3 where the data or a checkpoint is at fault, 2 for other arguments
        return EXIT_DATA if e.arg in ("--data", "--init") else EXIT_USAGE
    meta.update({"dataset": str(args.data), "classes": list(classes)})
    loss = None
    if is_decoupled(model):
        loss = DecouplingLoss(model, len(classes), lam_k=args.lam_k, lam_m=args.lam_m, lam_s=args.lam_s,
                              rho=args.rho, kl_direction=args.kl_direction,
                              normalize_sparsity=args.normalize_sparsity, mi_init=args.mi_init)
    meta["train_args"] = {k: (str(v) if k == "device" and v is not None else v)
                          for k, v in vars(args).items() if not k.startswith("_")}
    try:
        hist = train(model, (xtr, ytr), (xte, yte), epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                     momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
                     milestones=args.milestones, lr_warmup_steps=args.lr_warmup_steps, loss=loss,
                     gate_lr_mult=args.gate_lr_mult, gate_weight_decay=args.gate_weight_decay,
                     sparsity_warmup=args.sparsity_warmup, gate_warm_start_steps=args.gate_warm_start,
                     gate_warm_start_keep=args.gate_warm_start_keep, gate_noise_final=args.gate_noise_final, augment=not args.no_augment, seed=args.seed,
                     out_dir=args.out, meta=meta, resume=args.resume, max_steps_per_epoch=args.max_steps_per_epoch,
                     stop_after_epochs=args.stop_after_epochs,
                     progress=not args.no_progress, device=args.device)
    except ckpt.CheckpointError as e:  # only --resume reads one inside train()
        print(f"pydecouple train: argument --resume: expected a checkpoint of this run in --out to continue from, "
              f"got {e}", file=sys.stderr)
        return EXIT_DATA
    if rank == 0 and hist:
        print(json.dumps(hist[-1]))  # the result, on stdout; stderr had one progress line per epoch
    return EXIT_OK
