"""Shared by the benchmark scripts: timing, machine description, table writing."""

from __future__ import annotations

import csv
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> Dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton is optional on CPU
        triton_version = "not installed"
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            txt = f.read()
        flags = "avx512f" if " avx512f " in txt else ("avx2" if " avx2 " in txt else "")
    except OSError:
        pass
    import pydecouple

    return {
        "cpu": f"{cpu_model()} ({os.cpu_count()} logical cores{', ' + flags if flags else ''})",
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "triton": triton_version,
        "pydecouple": pydecouple.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def median_times(fns: Sequence[Callable[[], object]], repeats: int = 9, warmup: int = 2,
                 min_time: float = 0.0) -> List[float]:
    """Median seconds of each function, measured interleaved (A, B, C, A, B, C, ...)
    so that a drift in machine load hits every provider alike."""
    for f in fns:
        for _ in range(warmup):
            f()
    samples: List[List[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            inner, t0 = 0, time.perf_counter()
            while True:
                f()
                inner += 1
                dt = time.perf_counter() - t0
                if dt >= min_time:
                    break
            samples[i].append(dt / inner)
    return [statistics.median(s) for s in samples]


def write_csv(path: str, rows: List[Dict[str, object]]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)


def markdown_table(rows: List[Dict[str, object]], columns: Sequence[str]) -> str:
    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def machine_header(desc: Dict[str, str]) -> str:
    return "\n".join(f"- {k}: {v}" for k, v in desc.items())
