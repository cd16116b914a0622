"""Measuring, shared by benchmarks/ and the demo: interleaved median timing,
the machine's description, CSV and markdown tables, and the kernel benchmark
of one layer."""

from __future__ import annotations

import csv
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F


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


def fixed_count_mask(n: int, c: int, f: float, gen: torch.Generator) -> torch.Tensor:
    """Bool (n, c): round(c * f) (at least 1) channels on per row, at random positions."""
    k = max(1, round(c * f))
    m = torch.zeros(n, c, dtype=torch.bool)
    for i in range(n):
        m[i, torch.randperm(c, generator=gen)[:k]] = True
    return m


def bench_layer(name: str, cin: int, cout: int, h: int, k: int, batch: int, f: float, repeats: int,
                gen: torch.Generator) -> Dict[str, object]:
    """Time one layer: dense conv + mask, gated_conv2d (automatic dispatch), the
    CPU kernel forced, and dense conv on the problem cut to the kept counts."""
    import pydecouple
    from pydecouple.reference import gated_conv2d_reference

    pad = k // 2
    x = torch.randn(batch, cin, h, h, generator=gen)
    w = torch.randn(cout, cin, k, k, generator=gen) / (cin * k * k) ** 0.5
    b = torch.randn(cout, generator=gen)
    om, im = fixed_count_mask(batch, cout, f, gen), fixed_count_mask(batch, cin, f, gen)
    ki, ko = int(im[0].sum()), int(om[0].sum())
    x_cut, w_cut = torch.randn(batch, ki, h, h, generator=gen), torch.randn(ko, ki, k, k, generator=gen)
    omf = om[:, :, None, None].float()
    kernel = torch.ops.pydecouple.gated_conv2d_cpu

    def dense():
        return F.conv2d(x, w, b, padding=pad) * omf

    def gated():
        return pydecouple.gated_conv2d(x, w, b, om, im, padding=pad)

    def forced():
        return kernel(x, w, b, om, im, [1, 1], [pad] * 4, [1, 1], 1, False)

    def cut():
        return F.conv2d(x_cut, w_cut, padding=pad)

    # A benchmark of a wrong result is worthless: check before timing.
    torch.testing.assert_close(forced(), gated_conv2d_reference(x, w, b, om, im, (1, 1), (pad,) * 4, (1, 1), 1),
                               atol=1e-3, rtol=1e-3)
    t_dense, t_gated, t_kernel, t_cut = median_times([dense, gated, forced, cut], repeats=repeats, min_time=0.02)
    backend = pydecouple._backend.choose(x, w, om, im, 1)
    flops_dense = 2.0 * batch * cin * cout * k * k * h * h
    return {
        "layer": name, "batch": batch, "f": f, "kept_in": ki, "kept_out": ko,
        "dense_ms": t_dense * 1e3, "gated_ms": t_gated * 1e3, "kernel_ms": t_kernel * 1e3, "cut_ms": t_cut * 1e3,
        "speedup": t_dense / t_gated, "kernel_speedup": t_dense / t_kernel, "ideal": (cin * cout) / (ki * ko),
        "cut_limit": t_dense / t_cut, "backend": backend,
        "dense_gflops": flops_dense / t_dense / 1e9,
        "kernel_gflops": flops_dense * ki * ko / (cin * cout) / t_kernel / 1e9,
    }
