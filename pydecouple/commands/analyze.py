"""`python -m pydecouple analyze`: path-level interpretation of a decoupled checkpoint.

Templates are built from the training split, every figure is measured on the
test split; the output folder gets PNGs, ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

import numpy as np

log = logging.getLogger("pydecouple.analyze")

EXIT_OK, EXIT_BAD_INPUT = 0, 2


def add_common(parser: argparse.ArgumentParser, limit: int, ref_limit: int) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a decoupled checkpoint written by `pydecouple train`")
    parser.add_argument("--data", default="digits", metavar="SPEC",
                        help="'digits', a CIFAR .npz (e.g. ../shared/data/cifar10/cifar10-subset.npz) "
                             "or a cifar-10-batches-py folder (default: digits)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument("--limit", type=int, default=limit, metavar="N",
                        help=f"test images used, class-balanced (default {limit}; 0 = all)")
    parser.add_argument("--ref-limit", type=int, default=ref_limit, metavar="N",
                        help=f"training images the class templates are built from (default {ref_limit}; 0 = all)")
    parser.add_argument("--metric", default="cosine", choices=["cosine", "jaccard", "hamming"],
                        help="path similarity (default cosine: ignores filters both paths leave off and does not "
                             "favour denser templates; see pydecouple.paths)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (default 0: torch's own choice; 1 on a shared machine)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser, limit=2000, ref_limit=5000)
    parser.add_argument("--margin", type=float, default=0.3,
                        help="a filter is specific to class c when it is on for c at least this much more often "
                             "than for any other class (default 0.3)")
    parser.add_argument("--layer", default=None,
                        help="gated layer (index or name) for the filter-by-class picture "
                             "(default: the one with the most class-specific filters)")


def load_inputs(args: argparse.Namespace) -> tuple[Any, dict, Any, Any, Any, Any, list]:
    """Model, meta, test images/labels, reference images/labels, class names. Raises on bad input."""
    import torch

    from pydecouple.checkpoint import load_model
    from pydecouple.data import load_dataset
    from pydecouple.paths import balanced_subset

    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    if not os.path.exists(args.checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    model, meta = load_model(args.checkpoint)
    dev = args.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(dev).eval()
    x_test, y_test, names = load_dataset(args.data, "test")
    x_ref, y_ref, _ = load_dataset(args.data, "train")
    it = balanced_subset(_arr(y_test), args.limit or None, args.seed)
    ir = balanced_subset(_arr(y_ref), args.ref_limit or None, args.seed + 1)
    return model, meta or {}, x_test[it], y_test[it], x_ref[ir], y_ref[ir], list(names)


def run_info(args: argparse.Namespace, meta: dict) -> dict:
    """What the report was computed from: checkpoint, its training settings, data, limits."""
    keep = ("epochs", "lr", "lam_k", "lam_m", "lam_s", "rho", "init", "train_subset", "gate_init", "gate_bias_init")
    ta = meta.get("train_args") or {}
    return {
        "checkpoint": os.path.abspath(args.checkpoint),
        "arch": meta.get("arch"),
        "decoupled": meta.get("decoupled"),
        "train_args": {k: ta[k] for k in keep if k in ta},
        "data": args.data,
        "limit": args.limit,
        "ref_limit": args.ref_limit,
        "seed": args.seed,
    }


def _arr(a: Any) -> np.ndarray:
    return a.numpy() if hasattr(a, "numpy") else np.asarray(a)


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")


def run(args: argparse.Namespace) -> int:
    _setup_logging()
    from pydecouple.paths import analyze

    try:
        model, meta, x, y, xr, yr, names = load_inputs(args)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, OSError) as e:
        log.error("analyze: %s", e)
        return EXIT_BAD_INPUT
    layer = args.layer
    if layer is not None:
        from pydecouple.paths import gate_modules_of

        gnames = [n for n, _ in gate_modules_of(model)]
        if layer.lstrip("-").isdigit():
            layer = int(layer) % max(len(gnames), 1)
        elif layer in gnames:
            layer = gnames.index(layer)
        else:
            log.error("analyze: no gated layer %r; gated layers: %s", layer, ", ".join(gnames))
            return EXIT_BAD_INPUT
    try:
        rep = analyze(model, x, y, names, args.out, ref_images=xr, ref_labels=yr, metric=args.metric,
                      margin=args.margin, layer=layer, batch_size=args.batch_size, seed=args.seed,
                      progress=not args.no_progress, info=run_info(args, meta))
    except ValueError as e:  # e.g. a dense checkpoint without gates
        log.error("analyze: %s", e)
        return EXIT_BAD_INPUT
    from pydecouple.paths import _pct

    print(
        f"network accuracy {_pct(rep['network_accuracy'])}, nearest-template accuracy "
        f"{_pct(rep['template_accuracy'])} ({_pct(rep['template_accuracy_ratio'], 0)} of the network's), constant gates "
        f"{_pct(rep['constant_gates']['fraction_constant'], 0)}; top pairs: "
        + ", ".join(f"{p['a']}-{p['b']}" for p in rep["top_similar_pairs"][:4])
        + f"\nreport: {os.path.join(args.out, 'report.md')}",
        file=sys.stdout,
    )
    return EXIT_OK
