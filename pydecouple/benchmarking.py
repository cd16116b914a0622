"""Measuring, shared by benchmarks/ and the demo: interleaved median timing,
the machine's description, CSV and markdown tables, and the kernel benchmark
of one layer."""

from __future__ import annotations

import csv
import os
import platform
import statistics
import time
import copy
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
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
                gen: torch.Generator, dtype: torch.dtype = torch.float32, peak: float = 0.0) -> Dict[str, object]:
    """Time one layer against the dense conv a user would run (the one
    implementation behind benchmarks/bench_gated_conv.py and the demo).

    The baseline of ``speedup`` is dense ``F.conv2d`` (+ the out-mask) in
    ``dtype`` on NCHW *and* on channels_last input, the faster of the two
    (``dense_layout``). Timed alongside: gated_conv2d (automatic dispatch) and
    the same with the CPU kernel pinned (``backend="cpu"``), each in its faster
    layout, and dense conv on the problem cut to the kept counts
    (``cut_limit``). ``peak``: the machine's GFLOP/s in ``dtype`` for
    ``kernel_peak_frac`` (0: not reported)."""
    import pydecouple
    from pydecouple.reference import gated_conv2d_reference

    pad = k // 2
    x = torch.randn(batch, cin, h, h, generator=gen).to(dtype)
    w = (torch.randn(cout, cin, k, k, generator=gen) / (cin * k * k) ** 0.5).to(dtype)
    b = torch.randn(cout, generator=gen).to(dtype)
    om, im = fixed_count_mask(batch, cout, f, gen), fixed_count_mask(batch, cin, f, gen)
    ki, ko = int(im[0].sum()), int(om[0].sum())
    x_cut = torch.randn(batch, ki, h, h, generator=gen).to(dtype)
    w_cut = torch.randn(ko, ki, k, k, generator=gen).to(dtype)
    cl = torch.channels_last
    xc, wc, xcc, wcc = x.to(memory_format=cl), w.to(memory_format=cl), x_cut.to(memory_format=cl), \
        w_cut.to(memory_format=cl)
    omf = om[:, :, None, None].to(dtype)

    # A benchmark of a wrong result is worthless: check the pinned kernel first, in both layouts.
    ref = gated_conv2d_reference(x.double(), w.double(), b.double(), om, im, (1, 1), (pad,) * 4, (1, 1), 1)
    for xin in (x, xc):
        got = pydecouple.gated_conv2d(xin, w, b, om, im, padding=pad, backend="cpu").double()
        tol = 1e-3 if dtype == torch.float32 else 0.1 * float(ref.abs().max()) / 8
        torch.testing.assert_close(got, ref, atol=tol, rtol=tol if dtype == torch.float32 else 0.02)

    fns = {
        "dense_nchw": lambda: F.conv2d(x, w, b, padding=pad) * omf,
        "dense_cl": lambda: F.conv2d(xc, wc, b, padding=pad) * omf,
        "gated_nchw": lambda: pydecouple.gated_conv2d(x, w, b, om, im, padding=pad),
        "gated_cl": lambda: pydecouple.gated_conv2d(xc, w, b, om, im, padding=pad),
        # the same public op with the CPU kernel pinned: only the choice differs from gated
        "kernel_nchw": lambda: pydecouple.gated_conv2d(x, w, b, om, im, padding=pad, backend="cpu"),
        "kernel_cl": lambda: pydecouple.gated_conv2d(xc, w, b, om, im, padding=pad, backend="cpu"),
        "cut_nchw": lambda: F.conv2d(x_cut, w_cut, padding=pad),
        "cut_cl": lambda: F.conv2d(xcc, wcc, padding=pad),
    }
    with torch.no_grad():
        t = dict(zip(fns, median_times(list(fns.values()), repeats=repeats, min_time=0.02)))

    def best(prefix):
        a, c = t[prefix + "_nchw"], t[prefix + "_cl"]
        return (a, "nchw") if a <= c else (c, "channels_last")

    (t_dense, dense_layout), (t_gated, gated_layout) = best("dense"), best("gated")
    (t_kernel, kernel_layout), (t_cut, _) = best("kernel"), best("cut")
    useful = 2.0 * batch * ki * ko * k * k * h * h
    dt = str(dtype).replace("torch.", "")
    return {
        "layer": name, "dtype": dt, "batch": batch, "f": f, "kept_in": ki, "kept_out": ko,
        "dense_ms": t_dense * 1e3, "dense_layout": dense_layout, "dense_nchw_ms": t["dense_nchw"] * 1e3,
        "dense_cl_ms": t["dense_cl"] * 1e3,
        "baseline": f"dense F.conv2d {dt}, {dense_layout} (faster of NCHW and channels_last)",
        "gated_ms": t_gated * 1e3, "gated_layout": gated_layout, "kernel_ms": t_kernel * 1e3,
        "kernel_layout": kernel_layout, "cut_ms": t_cut * 1e3,
        "speedup": t_dense / t_gated, "kernel_speedup": t_dense / t_kernel, "ideal": (cin * cout) / (ki * ko),
        "cut_limit": t_dense / t_cut, "backend": pydecouple._backend.choose(x, w, om, im, 1),
        "dense_gflops": 2.0 * batch * cin * cout * k * k * h * h / t_dense / 1e9,
        "kernel_gflops": useful / t_kernel / 1e9,
        "kernel_peak_frac": useful / t_kernel / 1e9 / peak if peak > 0 else float("nan"),
    }


# ----------------------------------------------------------------------------- models: dense vs accelerated

PROVIDERS = ["dense", "dense folded", "dense folded cl", "accelerated masked-dense", "accelerated nchw",
             "accelerated cl", "decoupled masked-dense", "dense folded traced", "accelerated traced",
             "accelerated all-on", "accelerated traced rule", "dense best", "accelerated"]


# ----------------------------------------------------------------------------- models


def masked_dense(decoupled: nn.Module) -> nn.Module:
    """The decoupled model's eval forward with dense kernels (conv, then mask)."""
    from .nn.modules import GatedConv2d

    m = copy.deepcopy(decoupled).eval()
    for mod in m.modules():
        if isinstance(mod, GatedConv2d):
            mod.use_sparse_op = False
    return m


def all_gates_on(decoupled: nn.Module) -> nn.Module:
    """A copy whose ACMs still run but whose every logit is far above 0."""
    from .nn import gate_modules

    m = copy.deepcopy(decoupled).eval()
    with torch.no_grad():
        for _, g in gate_modules(m):
            g.fc2.bias.add_(1e4)
    return m


def _cycle(model: nn.Module, batches: Sequence[torch.Tensor]):
    state = {"i": 0}

    @torch.no_grad()
    def run():
        x = batches[state["i"] % len(batches)]
        state["i"] += 1
        return model(x)

    return run


def _synced(fn):
    """``fn`` followed by a device synchronisation: a CUDA launch returns before
    the work is done, and the wall clock must see the work."""
    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> float:
    correct = 0
    for i in range(0, len(images), batch):
        correct += int((model(images[i:i + batch]).argmax(1) == labels[i:i + batch]).sum())
    return correct / max(len(images), 1)


def _to(model: nn.Module, dtype: torch.dtype, channels_last: bool) -> nn.Module:
    """A copy of a (dense) model in ``dtype`` taking ``channels_last`` input."""
    m = copy.deepcopy(model).to(dtype)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    return m


class _Entry(nn.Module):
    """Input conversion for a dense twin in another dtype/layout (what a user
    of that configuration does once, at the top of the network)."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype, channels_last: bool) -> None:
        super().__init__()
        self.inner, self.dtype, self.channels_last = inner, dtype, channels_last

    def forward(self, x):
        x = x.to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.inner(x)


def benchmark_models(dense_model: nn.Module, decoupled_model: nn.Module, images: torch.Tensor,
                     batch_sizes: Sequence[int] = (1, 32), repeats: int = 9, *, labels: Optional[torch.Tensor] = None,
                     min_time: float = 0.2, flops_images: int = 512, compile: bool = False,
                     dtypes: Sequence[torch.dtype] = (torch.float32,), tune: bool = False
                     ) -> List[Dict[str, object]]:
    """Time the accelerated decoupled model against the dense twin a user would run.

    The baseline of every speedup is the dense model with BN folded (the same
    inference treatment) in the same dtype, in its faster memory layout
    (NCHW or channels_last; with ``compile``, its ``torch.compile``'d form
    too, where that is faster): ``dense best``. The accelerated model is
    likewise timed in both layouts and its faster one reported as
    ``accelerated``. Providers per (dtype, batch):

    - ``dense``: the dense model as PyTorch runs it (BN unfolded, NCHW);
    - ``dense folded`` / ``dense folded cl`` / ``dense folded traced`` (/
      ``... compiled``): the twin (traced: ``executor="trace"``, in its
      faster eager layout);
    - ``decoupled masked-dense`` (float32 only): the paper's way, conv then mask;
    - ``accelerated masked-dense``: folded, gates computed, dense conv + mask;
    - ``accelerated nchw`` / ``accelerated cl`` / ``accelerated traced`` (/
      ``compiled``): the gated kernels (traced: in the faster eager layout);
    - ``accelerated all-on``: every gate forced on by its ACM's bias, in the
      accelerated model's faster eager layout, traced.

    Args:
        dense_model: the dense twin (eval mode is set on a copy).
        decoupled_model: the decoupled model (not modified).
        images: test images (N, C, H, W) in [0, 1], on the device to measure on.
        batch_sizes: batch sizes to time; each provider cycles through
            consecutive batches of ``images`` of that size (same images for all).
        repeats: interleaved repeats (medians are reported).
        labels: optional test labels: adds each provider's top-1 accuracy and,
            for other dtypes, the agreement of its predictions with the
            float32 decoupled model's.
        min_time: seconds each timed sample runs for (many calls at batch 1).
        flops_images: images ``pydecouple.flops`` averages the FLOPs ratio over.
        compile: also time ``torch.compile(fullgraph=True)`` of the best
            dense and accelerated layouts (minutes of compilation on 2 cores).
        dtypes: float32 and/or bfloat16.
        tune: each accelerated model's gated layers route by crossovers
            measured on this machine at ``batch_sizes``
            (:func:`pydecouple.accelerate.tune`, cached per machine) instead
            of the fitted rule; ``accelerated traced rule`` is then the
            traced model with the rule, timed beside it.

    Returns:
        One dict per (dtype, batch size, provider): dtype, provider, batch,
        latency_ms, images_per_s, flops_ratio, ideal_speedup, speedup (against
        ``dense best``), baseline (which provider that was), speedup_vs_eager
        (against ``dense``), efficiency (speedup x flops_ratio), accuracy,
        agreement.
    """
    from .accelerate import accelerate
    from .accelerate import tune as tune_layers
    from .flops import flops

    def tuned(model: nn.Module) -> nn.Module:
        if tune:
            tune_layers(model, images[:max(batch_sizes)], batches=batch_sizes)
        return model

    dense = copy.deepcopy(dense_model).eval()
    dec = copy.deepcopy(decoupled_model).eval()
    ratio = flops(dec, images[:flops_images]).ratio
    all_on = all_gates_on(dec)
    all_on_ratio = flops(all_on, images[:min(flops_images, 64)]).ratio
    on_cuda = images.device.type == "cuda"
    rows: List[Dict[str, object]] = []
    ref_pred = None
    if labels is not None:
        with torch.no_grad():
            ref_pred = torch.cat([dec(images[i:i + 256]).argmax(1) for i in range(0, len(images), 256)])
    for dtype in dtypes:
        f32 = dtype == torch.float32
        folded = accelerate(dense)
        models: Dict[str, nn.Module] = {
            "dense": dense if f32 else _Entry(_to(dense, dtype, False), dtype, False),
            "dense folded": folded if f32 else _Entry(_to(folded, dtype, False), dtype, False),
            "dense folded cl": _Entry(_to(folded, dtype, True), dtype, True),
            "accelerated masked-dense": accelerate(dec, use_kernel=False, dtype=None if f32 else dtype),
            "accelerated nchw": tuned(accelerate(dec, dtype=None if f32 else dtype)),
            "accelerated cl": tuned(accelerate(dec, dtype=None if f32 else dtype, channels_last=True)),
        }
        if f32:
            models["decoupled masked-dense"] = masked_dense(dec)
        if compile:
            models["dense folded compiled"] = torch.compile(models["dense folded"], fullgraph=True, dynamic=False)
            models["accelerated compiled"] = torch.compile(tuned(accelerate(dec, dtype=None if f32 else dtype)),
                                                           fullgraph=True, dynamic=False)
        acc: Dict[str, float] = {}
        agree: Dict[str, float] = {}
        if labels is not None:
            for name in ("dense folded", "accelerated nchw", "decoupled masked-dense"):
                if name in models:
                    acc[name] = accuracy(models[name], images, labels)
            with torch.no_grad():
                pred = torch.cat([models["accelerated nchw"](images[i:i + 256]).argmax(1)
                                  for i in range(0, len(images), 256)])
            agree["accelerated nchw"] = float((pred == ref_pred).float().mean())
        providers = list(models)
        for b in batch_sizes:
            imgs = images
            if len(imgs) < b:  # too few images: repeat them to fill one batch
                imgs = imgs.repeat((b + len(imgs) - 1) // len(imgs), 1, 1, 1)[:max(b, len(imgs))]
            nb = max(1, min(len(imgs) // b, 64))
            batches = [imgs[i * b:(i + 1) * b].contiguous() for i in range(nb)]
            fns = [_cycle(models[p], batches) for p in providers]
            if on_cuda:
                fns = [_synced(f) for f in fns]
            t = dict(zip(providers, median_times(fns, repeats=repeats, warmup=2, min_time=min_time)))
            # The traced twins run in the layout that was faster eager (one more timing, not two).
            dense_cl = t["dense folded cl"] < t["dense folded"]
            acc_cl = t["accelerated cl"] < t["accelerated nchw"]
            traced = {"dense folded traced": accelerate(dense, dtype=None if f32 else dtype, channels_last=dense_cl,
                                                        executor="trace"),
                      "accelerated traced": tuned(accelerate(dec, dtype=None if f32 else dtype,
                                                             channels_last=acc_cl, executor="trace")),
                      # every gate on, in the accelerated model's faster layout, traced: what gating costs
                      # a user of that configuration when nothing can be skipped
                      "accelerated all-on": tuned(accelerate(all_on, dtype=None if f32 else dtype,
                                                             channels_last=acc_cl, executor="trace"))}
            if tune:  # the fitted rule beside the measured crossovers
                traced["accelerated traced rule"] = accelerate(dec, dtype=None if f32 else dtype,
                                                               channels_last=acc_cl, executor="trace")
            # The first round's faster dense twin runs again beside them, and the
            # traced times are scaled by its two timings: every ratio is then one
            # of times measured side by side (a second round alone drifted by tens
            # of percent against the first: all-on 0.59x in one run, 0.96x side by side).
            ref = "dense folded cl" if dense_cl else "dense folded"
            tfns = [_cycle(m, batches) for m in traced.values()] + [_cycle(models[ref], batches)]
            if on_cuda:
                tfns = [_synced(f) for f in tfns]
            times = median_times(tfns, repeats=repeats, warmup=2, min_time=min_time)
            scale = t[ref] / times[-1]
            t.update({p: v * scale for p, v in zip(traced, times[:-1])})
            base = min((p for p in t if p.startswith("dense folded")), key=lambda p: t[p])
            best_acc = min((p for p in ("accelerated nchw", "accelerated cl", "accelerated traced",
                                        "accelerated compiled") if p in t), key=lambda p: t[p])
            t["dense best"], t["accelerated"] = t[base], t[best_acc]
            for p in providers + list(traced) + ["dense best", "accelerated"]:
                fr = 1.0 if p.startswith("dense") else (all_on_ratio if p.endswith("all-on") else ratio)
                sp = t["dense best"] / t[p]
                rows.append(dict(dtype=str(dtype).replace("torch.", ""), provider=p, batch=b,
                                 latency_ms=t[p] * 1e3, images_per_s=b / t[p], flops_ratio=fr, ideal_speedup=1.0 / fr,
                                 speedup=sp, baseline=base, speedup_vs_eager=t["dense"] / t[p], efficiency=sp * fr,
                                 best_of=(base if p == "dense best" else best_acc if p == "accelerated" else ""),
                                 accuracy=acc.get("accelerated nchw" if p == "accelerated" else p, float("nan")),
                                 agreement=agree.get("accelerated nchw" if p == "accelerated" else p, float("nan"))))
    return rows


