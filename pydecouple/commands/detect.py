"""`python -m pydecouple detect`: adversarial detection from paths.

FGSM and PGD (L-infinity, pixel space) on the test split; the learned detector is
fit on one half of it and everything is measured on the other; templates come
from the training split. Writes PNGs, ``report.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from fractions import Fraction

from ._common import UsageError, integer
from .analyze import EXIT_BAD_INPUT, EXIT_OK, _setup_logging, add_common, load_inputs, run_info

log = logging.getLogger("pydecouple.detect")


def parse_eps(text: str) -> float:
    """'8/255', '0.03' -> float, in pixel units, in (0, 1] (0 attacks nothing: no detector can be fit)."""
    try:
        v = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"expected a number or a fraction like 8/255, got {text!r}")
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a size in pixel units in (0, 1], got {text!r}")
    return v


def parse_c(text: str):
    """'auto' or a finite number > 0 (LogisticRegression's C)."""
    if text == "auto":
        return text
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number > 0, got {text!r}")
    return v


# Two test images per class: one for the half the learned detector is fit on, one for the half it is measured on.
MIN_PER_CLASS = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser, limit=1000, ref_limit=2000)
    parser.add_argument("--eps", type=parse_eps, default=8 / 255,
                        help="L-inf radius in pixel units, e.g. 8/255 (default) or 0.03")
    parser.add_argument("--attacks", default="fgsm,pgd", help="comma-separated, from fgsm,pgd (default both)")
    parser.add_argument("--pgd-steps", type=integer(1), default=10, help="PGD iterations (default 10)")
    parser.add_argument("--pgd-step", type=parse_eps, default=None,
                        help="PGD step size in pixel units (default 2.5 * eps / steps)")
    parser.add_argument("--no-random-start", action="store_true", help="start PGD at the clean image")
    parser.add_argument("--save-paths", default=None, metavar="DIR",
                        help="also keep the clean, reference and attacked paths there (npz) for later study")
    parser.add_argument("--C", type=parse_c, default="auto",
                        help="inverse L2 strength of the learned detector, or 'auto' (default): chosen by "
                             "cross-validation on the fit half only")


def run(args: argparse.Namespace) -> int:
    _setup_logging()
    from pydecouple.adversarial import detect

    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    bad = [a for a in attacks if a not in ("fgsm", "pgd")]
    if bad or not attacks:
        log.error("pydecouple detect: argument --attacks: expected a comma-separated list from fgsm, pgd, got %r", args.attacks)
        return EXIT_BAD_INPUT
    try:
        model, meta, x, y, xr, yr, _names = load_inputs(args, min_per_class=MIN_PER_CLASS)
    except UsageError as e:
        log.error("pydecouple detect: %s", e)
        return EXIT_BAD_INPUT
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, OSError) as e:
        log.error("pydecouple detect: %s", e)
        return EXIT_BAD_INPUT
    try:
        rep = detect(model, x, y, args.out, eps=args.eps, attacks=attacks, pgd_iters=args.pgd_steps,
                     pgd_step=args.pgd_step, random_start=not args.no_random_start, ref_images=xr, ref_labels=yr,
                     metric=args.metric, C=args.C, batch_size=args.batch_size, seed=args.seed,
                     progress=not args.no_progress, save_paths=args.save_paths,
                     info=run_info(args, meta))
    except ValueError as e:
        log.error("pydecouple detect: %s", e)
        return EXIT_BAD_INPUT
    from pydecouple.report import pct

    f2 = lambda v: "n/a" if v is None else f"{v:.3f}"
    for a, h in rep["headline"].items():
        print(f"{a}: success {pct(h['success_rate'], 0)}, ROC-AUC learned {f2(h['learned_auc'])}, "
              f"learned+logits {f2(h['learned_logits_auc'])}, unsupervised {f2(h['unsupervised_auc'])}, "
              f"max-softmax {f2(h['max_softmax_auc'])}", file=sys.stdout)
    print(f"report: {os.path.join(args.out, 'report.md')}", file=sys.stdout)
    return EXIT_OK
