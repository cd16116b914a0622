"""gated_conv2d on the CPU against PyTorch's dense convolution (oneDNN).

For every layer, batch and kept fraction f (= f_in = f_out, a fixed count of
channels per sample at random positions) it reports, measured in this one
process, interleaved, medians over repeats:

- dense:  F.conv2d followed by the out-mask (what gating codebases do)
- gated:  pydecouple.gated_conv2d, automatic dispatch (may choose dense)
- kernel: the C++ kernel forced (torch.ops.pydecouple.gated_conv2d_cpu)
- cut:    F.conv2d on a problem already cut to the kept channel counts: the
          practical limit of skipping
- ideal:  1 / (f_in * f_out)

Writes benchmarks/results/cpu_kernel.csv and .md (machine, threads and
versions on top). `--device cuda` runs the GPU benchmark instead
(benchmarks/bench_gated_conv_cuda.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from tqdm import tqdm

import pydecouple
from pydecouple.benchmarking import bench_layer, machine_description, machine_header, markdown_table, write_csv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESNET_IMAGENET, VGG16_CIFAR  # noqa: E402  (the layer sets, shared with the CUDA benchmark)


def summarize(rows, layers):
    names = {lay[0] for lay in layers}
    out = []
    for batch in sorted({r["batch"] for r in rows}):
        for f in sorted({r["f"] for r in rows}, reverse=True):
            sel = [r for r in rows if r["batch"] == batch and r["f"] == f and r["layer"] in names]
            if not sel:
                continue
            sp = [r["speedup"] for r in sel]
            out.append({"batch": batch, "f": f, "median_speedup": statistics.median(sp), "worst_speedup": min(sp),
                        "worst_layer": min(sel, key=lambda r: r["speedup"])["layer"],
                        "median_kernel_speedup": statistics.median(r["kernel_speedup"] for r in sel),
                        "median_cut_limit": statistics.median(r["cut_limit"] for r in sel),
                        "ideal": statistics.median(r["ideal"] for r in sel)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes (default 1,32)")
    p.add_argument("--fractions", default="1.0,0.75,0.5,0.25", help="kept fractions f = f_in = f_out")
    p.add_argument("--layers", default="all", choices=["all", "vgg", "resnet"])
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
    layers = {"all": VGG16_CIFAR + RESNET_IMAGENET, "vgg": VGG16_CIFAR, "resnet": RESNET_IMAGENET}[args.layers]
    batches = [int(b) for b in args.batches.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    gen = torch.Generator().manual_seed(0)
    desc = machine_description()
    rows = []
    jobs = [(lay, b, f) for b in batches for lay in layers for f in fractions]
    for (name, cin, cout, h, k), batch, f in tqdm(jobs, desc="layers", unit="case"):
        rows.append(bench_layer(name, cin, cout, h, k, batch, f, args.repeats, gen))
    write_csv(os.path.join(args.out, f"{args.name}.csv"), rows)
    cols = ["layer", "batch", "f", "dense_ms", "gated_ms", "speedup", "kernel_speedup", "ideal", "cut_limit", "backend"]
    summary_cols = ["batch", "f", "median_speedup", "worst_speedup", "worst_layer", "median_kernel_speedup",
                    "median_cut_limit", "ideal"]
    md = [f"# gated_conv2d on CPU vs dense F.conv2d (oneDNN)\n", machine_header(desc), "",
          "Command: `" + " ".join(["python benchmarks/bench_gated_conv.py"] + (argv if argv is not None else sys.argv[1:])) + "`",
          "", "speedup = dense / gated (automatic dispatch); kernel_speedup = dense / C++ kernel forced; "
          "cut_limit = dense / dense-on-the-cut-problem.", ""]
    for title, lays in (("VGG-16 3x3 layers, 32x32 CIFAR input", VGG16_CIFAR), ("ResNet-style ImageNet layers", RESNET_IMAGENET)):
        s = summarize(rows, [lay for lay in lays if lay in layers])
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
