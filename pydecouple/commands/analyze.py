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

from ._common import UsageError, check_device, check_model_fits_data, integer, make_out_dir, number, quiet_rebuild

log = logging.getLogger("pydecouple.analyze")

EXIT_OK, EXIT_BAD_INPUT = 0, 2


def add_common(parser: argparse.ArgumentParser, limit: int, ref_limit: int) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a decoupled checkpoint written by `pydecouple train`")
    parser.add_argument("--data", default="digits", metavar="SPEC",
                        help="'digits', a CIFAR .npz (e.g. ../shared/data/cifar10/cifar10-subset.npz) "
                             "or a cifar-10-batches-py folder (default: digits)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument("--limit", type=integer(0, note="0: all"), default=limit, metavar="N",
                        help=f"test images used, class-balanced (default {limit}; 0 = all)")
    parser.add_argument("--ref-limit", type=integer(0, note="0: all"), default=ref_limit, metavar="N",
                        help=f"training images the class templates are built from (default {ref_limit}; 0 = all)")
    parser.add_argument("--metric", default="cosine", choices=["cosine", "jaccard", "hamming"],
                        help="path similarity (default cosine: ignores filters both paths leave off and does not "
                             "favour denser templates; see pydecouple.paths)")
    parser.add_argument("--batch-size", type=integer(1), default=256)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--seed", type=integer(0), default=0)
    parser.add_argument("--threads", type=integer(0, note="0: torch's own choice"), default=0,
                        help="CPU threads for torch (default 0: torch's own choice; 1 on a shared machine)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser, limit=2000, ref_limit=5000)
    parser.add_argument("--margin", type=number(0, 1, note="a difference of on-frequencies"), default=0.3,
                        help="a filter is specific to class c when it is on for c at least this much more often "
                             "than for any other class (default 0.3)")
    parser.add_argument("--layer", default=None,
                        help="gated layer (index or name) for the filter-by-class picture "
                             "(default: the one with the most class-specific filters)")


def load_inputs(args: argparse.Namespace, min_per_class: int = 0) -> tuple[Any, dict, Any, Any, Any, Any, list]:
    """Model, meta, test images/labels, reference images/labels, class names.

    Raises :class:`UsageError` naming the argument at fault: device, output
    folder, checkpoint, data (or data the checkpoint cannot take), and a
    ``--limit`` below ``min_per_class`` test images per class."""
    import torch

    from pydecouple.checkpoint import CheckpointError, load_model
    from pydecouple.data import DataError, load_dataset
    from pydecouple.paths import balanced_subset

    from pydecouple.nn import is_decoupled

    dev = check_device("--device", args.device)
    expected = "a decoupled checkpoint written by `pydecouple train --decouple`"
    if not os.path.isfile(args.checkpoint):
        raise UsageError("--checkpoint", expected, f"{args.checkpoint!r}, which is not a file")
    make_out_dir("--out", args.out)
    if getattr(args, "save_paths", None):
        make_out_dir("--save-paths", args.save_paths)
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    try:
        with quiet_rebuild():
            model, meta = load_model(args.checkpoint)
    except CheckpointError as e:
        raise UsageError.from_loader("--checkpoint", e) from None
    if not is_decoupled(model):
        raise UsageError("--checkpoint", expected + " (paths need gates)",
                         f"{args.checkpoint!r}, a dense {meta.get('arch')} without gates")
    if dev is None:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(dev).eval()
    try:
        x_test, y_test, names = load_dataset(args.data, "test")
        x_ref, y_ref, _ = load_dataset(args.data, "train")
    except DataError as e:
        raise UsageError.from_loader("--data", e) from None
    check_model_fits_data(model, x_test, torch.cat((y_test, y_ref)), "--checkpoint", args.checkpoint, "--data",
                          args.data, meta)
    k = len(np.unique(_arr(y_test)))
    if min_per_class and args.limit and args.limit < min_per_class * k:
        raise UsageError("--limit", f"0 (all) or at least {min_per_class * k} ({min_per_class} test images per class "
                         f"of the {k} in --data {args.data!r})", str(args.limit))
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


def _layer_index(layer: Any, model: Any) -> Any:
    """--layer as an index into the gated layers: a name, or an index from -L to L - 1
    (Python's convention; 99 used to wrap around silently to 99 % L)."""
    if layer is None:
        return None
    from pydecouple.paths import gate_modules_of

    gnames = [n for n, _ in gate_modules_of(model)]
    if layer in gnames:
        return gnames.index(layer)
    n = len(gnames)
    expected = (f"a gated layer's index from {-n} to {n - 1} or its name ({', '.join(gnames)})" if n
                else "a decoupled checkpoint (this one has no gated layer)")
    if layer.lstrip("-").isdigit() and n and -n <= int(layer) < n:
        return int(layer) % n
    raise UsageError("--layer", expected, repr(layer))


def run(args: argparse.Namespace) -> int:
    _setup_logging()
    from pydecouple.paths import analyze

    try:
        model, meta, x, y, xr, yr, names = load_inputs(args)
        layer = _layer_index(args.layer, model)
    except UsageError as e:
        log.error("pydecouple analyze: %s", e)
        return EXIT_BAD_INPUT
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, OSError) as e:
        log.error("pydecouple analyze: %s", e)
        return EXIT_BAD_INPUT
    try:
        rep = analyze(model, x, y, names, args.out, ref_images=xr, ref_labels=yr, metric=args.metric,
                      margin=args.margin, layer=layer, batch_size=args.batch_size, seed=args.seed,
                      progress=not args.no_progress, info=run_info(args, meta))
    except ValueError as e:  # analyze()'s own checks of what it was given
        log.error("pydecouple analyze: %s", e)
        return EXIT_BAD_INPUT
    from pydecouple.report import pct

    print(
        f"network accuracy {pct(rep['network_accuracy'])}, nearest-template accuracy "
        f"{pct(rep['template_accuracy'])} ({pct(rep['template_accuracy_ratio'], 0)} of the network's), constant gates "
        f"{pct(rep['constant_gates']['fraction_constant'], 0)}; top pairs: "
        + ", ".join(f"{p['a']}-{p['b']}" for p in rep["top_similar_pairs"][:4])
        + f"\nreport: {os.path.join(args.out, 'report.md')}",
        file=sys.stdout,
    )
    return EXIT_OK
