"""Which instruction set the CPU kernel runs, chosen at run time.

The compiled extension reads the CPU's features once (cpuid) and takes the
best path it has; ``PYDECOUPLE_CPU_ISA`` forces one, read at every call:

==========  ==================================================================
``amx``     oneDNN's brgemm micro-kernel on a CPU with AMX (bfloat16 on AMX
            tiles; float32 on AVX-512 FMA); an error on a CPU without AMX
``onednn``  the same micro-kernel on any x86-64 CPU with AVX2, at the ISA
            oneDNN picks (to test the AMX path's code on other CPUs)
``avx512``  pydecouple's own AVX-512 kernels: float32 FMA, bfloat16 through
            ``vdpbf16ps`` where the CPU has AVX512_BF16 (else widened)
``avx2``    pydecouple's own AVX2 + FMA kernels (bfloat16/float16 widened)
``generic`` portable C++ (any CPU)
==========  ==================================================================

float16 is widened to float32 on every path (no float32-accumulating float16
dot product exists before AMX-FP16). ``python -m pydecouple info`` prints all
of this for the machine at hand.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch

ENV_VAR = "PYDECOUPLE_CPU_ISA"
PATHS = ("amx", "onednn", "avx512", "avx2", "generic")


def _load() -> bool:
    try:
        from . import _C  # noqa: F401  (registers the ops)
    except Exception:  # noqa: BLE001  (the extension may be missing; say so in the result)
        return False
    return hasattr(torch.ops.pydecouple, "cpu_info")


def cpu_info() -> Dict[str, object]:
    """The CPU, its features, every path with ``None`` (available) or the
    reason it is not, and the path in use (``error: ...`` if
    ``PYDECOUPLE_CPU_ISA`` asks for one this CPU cannot run)."""
    if not _load():
        return {"cpu": "unknown", "features": [], "paths": {p: "the compiled extension is not built" for p in PATHS},
                "path": None}
    info: Dict[str, object] = {"paths": {}}
    for line in torch.ops.pydecouple.cpu_info().splitlines():
        key, _, value = line.partition("=")
        if key == "cpu":
            info["cpu"] = value
        elif key == "features":
            info["features"] = [f for f in value.split(",") if f]
        elif key.startswith("path."):
            info["paths"][key[5:]] = None if value == "available" else value.removeprefix("unavailable: ")
        elif key == "path":
            info["path"] = value
    return info


def available_paths() -> List[str]:
    """The paths this CPU and build can run, best first."""
    return [p for p, why in cpu_info()["paths"].items() if why is None]


def current_path() -> Optional[str]:
    """The path the CPU kernel takes now (``PYDECOUPLE_CPU_ISA`` or the best)."""
    return cpu_info()["path"]


def has_bfloat16_dot() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512_BF16 or AMX):
    without either, bfloat16 is widened to float32 in every kernel, ours and
    oneDNN's, and runs slower than float32 (oneDNN's dense bfloat16 conv took
    ~9x float32's time on AMD EPYC Zen 1, benchmarks/results/model_suite_zen1.md)."""
    features = cpu_info()["features"]
    return "avx512_bf16" in features or "amx_bf16" in features


def requested() -> Optional[str]:
    return os.environ.get(ENV_VAR) or None
