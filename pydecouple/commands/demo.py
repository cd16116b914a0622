"""`python -m pydecouple demo`: the whole story on an embedded data set."""

from __future__ import annotations

import argparse
import sys

from ._common import EXIT_USAGE, UsageError, make_out_dir


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="digits",
                   help="'digits' (embedded, default), a CIFAR-10 .npz (e.g. ../shared/data/cifar10/cifar10-subset.npz) "
                        "or a cifar-10-batches-py folder")
    p.add_argument("--out", default="demo-out", help="output folder for report.md, report.json and the PNGs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="one epoch each, small subsets: a smoke test in seconds")


def run(args: argparse.Namespace) -> int:
    from ..data import DataError
    from ..demo import run as run_demo

    try:
        make_out_dir("--out", args.out)  # before minutes of work, not after
    except UsageError as e:
        print(f"pydecouple demo: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        run_demo(data=args.data, out=args.out, quick=args.quick, seed=args.seed)
    except (DataError, FileNotFoundError) as e:
        print(f"pydecouple demo: argument --data: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0
