"""`python -m pydecouple info`: the machine, the CPU kernel's instruction-set
paths and the versions, for bug reports and benchmark tables."""

from __future__ import annotations

import argparse
import json
import platform

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="one JSON object instead of lines")


def run(args: argparse.Namespace) -> int:
    from .. import isa
    from .._backend import explain as explain_backends

    info = isa.cpu_info()
    facts = {
        "cpu": info["cpu"],
        "cpu_features": info["features"],
        "cpu_kernel_path": info["path"],
        "cpu_kernel_paths": info["paths"],
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "backends": {name: why for name, why in explain_backends()},
    }
    if args.json:
        print(json.dumps(facts, indent=1))
        return 0
    print(f"cpu: {facts['cpu']} ({facts['threads']} threads; features: {', '.join(facts['cpu_features']) or 'none'})")
    print(f"cpu kernel path in use: {facts['cpu_kernel_path']}  (PYDECOUPLE_CPU_ISA forces one)")
    for p, why in facts["cpu_kernel_paths"].items():
        print(f"  {p:8s} {'available' if why is None else 'unavailable: ' + why}")
    print(f"torch {facts['torch']}, python {facts['python']}")
    print("backends of gated_conv2d (for a CPU float32 tensor):")
    for name, why in facts["backends"].items():
        print(f"  {name:9s} {'can run' if why is None else why}")
    return 0
