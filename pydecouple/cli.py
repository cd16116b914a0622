"""`python -m pydecouple <command>` / `pydecouple <command>`.

Each command lives in ``pydecouple/commands/<name>.py`` and defines
``add_arguments(parser)`` and ``run(args) -> int`` (the exit code). Commands are
imported only when chosen, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

COMMANDS = {
    "train": "dense pre-training or decoupling fine-tuning (torchrun-ready)",
    "analyze": "path-level interpretation of a decoupled checkpoint: PNGs and a report",
    "detect": "adversarial detection from paths (FGSM, PGD): ROC-AUC and a report",
    "demo": "the whole story on an embedded data set, in minutes",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pydecouple", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, helptext in COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.set_defaults(_module=name)
        # A command's own arguments are added only when it is the one chosen.
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2
    name = argv[0]
    module = importlib.import_module(f"pydecouple.commands.{name}")
    p = argparse.ArgumentParser(prog=f"pydecouple {name}", description=COMMANDS[name])
    module.add_arguments(p)
    args = p.parse_args(argv[1:])
    return int(module.run(args) or 0)
