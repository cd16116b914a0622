"""`python -m pydecouple <command>` / `pydecouple <command>`.

Each command lives in ``pydecouple/commands/<name>.py`` and defines
``add_arguments(parser)`` and ``run(args) -> int`` (the exit code). Commands are
imported only when chosen, so ``--help`` stays fast.

Misuse ends in one line on stderr naming the argument, what was expected and
what was given, with exit code 2; an unexpected failure (a bug) in one line
with exit code 1, its traceback only with ``PYDECOUPLE_TRACEBACK=1``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

COMMANDS = {
    "train": "dense pre-training or decoupling fine-tuning (torchrun-ready)",
    "analyze": "path-level interpretation of a decoupled checkpoint: PNGs and a report",
    "detect": "adversarial detection from paths (FGSM, PGD): ROC-AUC and a report",
    "demo": "the whole story on an embedded data set, in minutes",
    "info": "the CPU, the kernel's instruction-set path and the versions",
}

TRACEBACK_ENV = "PYDECOUPLE_TRACEBACK"
EXIT_BUG, EXIT_INTERRUPTED = 1, 130


class Parser(argparse.ArgumentParser):
    """argparse, with its errors in one line: its own print the whole usage block
    first (about 30 lines for train), which buries the one line that matters."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pydecouple", description=__doc__.splitlines()[0])
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
    p = Parser(prog=f"pydecouple {name}", description=COMMANDS[name])
    module.add_arguments(p)
    args = p.parse_args(argv[1:])
    if os.environ.get(TRACEBACK_ENV) == "1":
        return int(module.run(args) or 0)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"pydecouple {name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # the last resort: every known misuse is caught, with its argument, before this
        text = str(e).strip().splitlines()
        print(f"pydecouple {name}: unexpected {type(e).__name__}: {text[0] if text else ''} "
              f"(a bug: rerun with {TRACEBACK_ENV}=1 for the traceback, and report it)", file=sys.stderr)
        return EXIT_BUG
