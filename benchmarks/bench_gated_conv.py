"""gated_conv2d on the CPU against the dense convolution a user would run.

The baseline of every speedup is PyTorch's dense ``F.conv2d`` (oneDNN) in the
same dtype, timed on NCHW *and* channels_last input, taking the faster: a
user after speed picks the best layout, and in bfloat16 that is often
channels_last. For every layer, batch, dtype and kept fraction f (= f_in =
f_out: a fixed count of channels per sample, at random positions) it times,
in this one process, interleaved, medians over repeats:

- dense:  F.conv2d (+ the out-mask), NCHW and channels_last; the faster is the baseline
- gated:  pydecouple.gated_conv2d, automatic dispatch (may choose dense), its faster layout
- kernel: the same op with the CPU kernel pinned (``backend="cpu"``), its faster layout
- cut:    dense conv on the problem already cut to the kept channel counts
          (the practical limit of skipping), its faster layout
- ideal:  1 / (f_in * f_out)

and reports the kernel's useful GFLOP/s (2 * N * ki * ko * KH * KW * Ho * Wo
per second) and its fraction of the machine's peak in that dtype, measured
with a register-only multiply-add loop on every thread
(``torch.ops.pydecouple.cpu_peak_gflops``: 12 independent FMA chains of
AVX-512 / AVX2, or vdpbf16ps for bfloat16; AMX is not measured).

Writes benchmarks/results/<name>.csv and .md (machine, ISA path, threads and
versions on top). ``--layers heldout`` times shapes no threshold was tuned on.
``--device cuda`` runs the GPU benchmark instead (bench_gated_conv_cuda.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from tqdm import tqdm

import pydecouple
import pydecouple.isa
from pydecouple.benchmarking import bench_layer, machine_description, machine_header, markdown_table, write_csv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import HELDOUT, RESNET_IMAGENET, VGG16_CIFAR  # noqa: E402  (the layer sets, shared with the CUDA benchmark)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def measure_peak(dtype: torch.dtype) -> float:
    """GFLOP/s of the register-only multiply-add loop on every thread (0: not measurable here)."""
    kind = "bf16" if dtype == torch.bfloat16 else "f32"
    return float(torch.ops.pydecouple.cpu_peak_gflops(kind, 400))


def summarize(rows, names):
    out = []
    for dtype in DTYPES:
        for batch in sorted({r["batch"] for r in rows}):
            for f in sorted({r["f"] for r in rows}, reverse=True):
                sel = [r for r in rows if r["dtype"] == dtype and r["batch"] == batch and r["f"] == f
                       and r["layer"] in names]
                if not sel:
                    continue
                worst = min(sel, key=lambda r: r["speedup"])
                out.append({"dtype": dtype, "batch": batch, "f": f,
                            "median_speedup": statistics.median(r["speedup"] for r in sel),
                            "worst_speedup": worst["speedup"], "worst_layer": worst["layer"],
                            "median_kernel_speedup": statistics.median(r["kernel_speedup"] for r in sel),
                            "median_kernel_gflops": statistics.median(r["kernel_gflops"] for r in sel),
                            "median_peak_frac": statistics.median(r["kernel_peak_frac"] for r in sel),
                            "median_cut_limit": statistics.median(r["cut_limit"] for r in sel),
                            "ideal": statistics.median(r["ideal"] for r in sel)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batches", default="32,1", help="comma-separated batch sizes (default 32,1)")
    p.add_argument("--fractions", default="1.0,0.75,0.5,0.25", help="kept fractions f = f_in = f_out")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    p.add_argument("--layers", default="all", choices=["all", "vgg", "resnet", "heldout"])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--name", default="cpu_kernel", help="file stem of the CSV and markdown written to --out")
    args = p.parse_args(argv)
    if args.device == "cuda":
        from bench_gated_conv_cuda import main as cuda_main

        return cuda_main(["--out", args.out])
    if not pydecouple.extension_available():
        print("the compiled extension is not built (run `make test` or `pip install -e .`)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    sets = {"all": VGG16_CIFAR + RESNET_IMAGENET, "vgg": VGG16_CIFAR, "resnet": RESNET_IMAGENET, "heldout": HELDOUT}
    layers = sets[args.layers]
    batches = [int(b) for b in args.batches.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    peaks = {dt: measure_peak(dt) for dt in dtypes}
    gen = torch.Generator().manual_seed(0)
    desc = machine_description()
    info = pydecouple.isa.cpu_info()
    desc["cpu_kernel_path"] = f"{info['path']} (features: {', '.join(info['features'])})"
    for dt in dtypes:
        desc[f"peak_{str(dt)[6:]}"] = (f"{peaks[dt]:.0f} GFLOP/s on {torch.get_num_threads()} threads (register-only "
                                       "multiply-add loop)" if peaks[dt] > 0 else "not measured on this CPU")
    rows = []
    jobs = [(lay, b, f, dt) for dt in dtypes for b in batches for lay in layers for f in fractions]
    for (name, cin, cout, h, k), batch, f, dt in tqdm(jobs, desc="layers", unit="case"):
        rows.append(bench_layer(name, cin, cout, h, k, batch, f, args.repeats, gen, dt, peaks[dt]))
    write_csv(os.path.join(args.out, f"{args.name}.csv"), rows)
    cols = ["layer", "dtype", "batch", "f", "dense_ms", "dense_layout", "gated_ms", "speedup", "kernel_speedup",
            "kernel_gflops", "kernel_peak_frac", "ideal", "cut_limit", "backend"]
    summary_cols = ["dtype", "batch", "f", "median_speedup", "worst_speedup", "worst_layer", "median_kernel_speedup",
                    "median_kernel_gflops", "median_peak_frac", "median_cut_limit", "ideal"]
    cmd = " ".join(["python benchmarks/bench_gated_conv.py"] + (list(argv) if argv is not None else sys.argv[1:]))
    md = ["# gated_conv2d on CPU vs the best dense F.conv2d (oneDNN) of the same dtype\n", machine_header(desc), "",
          f"Command: `{cmd}`", "",
          "Baseline: dense F.conv2d in the same dtype, the faster of NCHW and channels_last input (dense_layout). "
          "speedup = baseline / gated_conv2d (automatic dispatch, its faster layout); kernel_speedup = baseline / "
          "the CPU kernel pinned; kernel_gflops = useful GFLOP/s of the pinned kernel; kernel_peak_frac = that over "
          "the measured peak; cut_limit = baseline / dense conv on the problem cut to the kept counts.", ""]
    groups = [("VGG-16 3x3 layers, 32x32 CIFAR input", VGG16_CIFAR), ("ResNet-style ImageNet layers", RESNET_IMAGENET),
              ("Held-out shapes (no threshold tuned on them)", HELDOUT)]
    for title, lays in groups:
        s = summarize(rows, {lay[0] for lay in lays if lay in layers})
        if s:
            md += [f"## Summary: {title}", "", markdown_table(s, summary_cols), ""]
    md += ["## Every case", "", markdown_table(rows, cols), ""]
    text = "\n".join(md)
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as fh:
        fh.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
