"""gated_conv2d on a CUDA GPU against cuDNN's dense convolution.

For every layer, batch, kept fraction f (= f_in = f_out: a fixed count of
channels per sample, at random positions) and dtype it times, with
``triton.testing.do_bench`` (median, L2 flushed between runs):

- dense:  cuDNN F.conv2d followed by the out-mask (what gating codebases do);
          the baseline of every speedup
- triton: the Triton kernel, autotuned (pydecouple.gated_conv2d(..., backend="triton"));
          triton_compact / triton_gather force one input strategy of its launcher
- cuda:   the CUDA C++ kernel (pydecouple.gated_conv2d(..., backend="cuda")), where built
- cut:    cuDNN on the problem already cut to the kept channel counts: the
          practical limit of skipping
- ideal:  1 / (f_in * f_out)

and the achieved TFLOP/s of each (dense and its mask: the dense FLOPs; the
others: the kept FLOPs). Inputs are channels_last (``--layout nchw`` for the
other). Every gated output is checked once against the reference (the masked
dense convolution in the same dtype).

Writes <out>/<name>.csv and <name>.md with the GPU, versions and the command,
and prints a short summary table last, with the targets of issue 3.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import pydecouple
from pydecouple.benchmarking import fixed_count_mask, markdown_table, write_csv

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESNET_IMAGENET, VGG16_CIFAR  # noqa: E402  (the layer sets, shared with the CPU benchmark)

# (name, Cin, Cout, H, kernel, stride): ResNet-50's ImageNet layers (v1.5, the
# stride in the 3x3), one of each distinct shape.
RESNET50 = [
    ("r50 1x1 64-64 56x56", 64, 64, 56, 1, 1),
    ("r50 3x3 64 56x56", 64, 64, 56, 3, 1),
    ("r50 1x1 64-256 56x56", 64, 256, 56, 1, 1),
    ("r50 1x1 256-64 56x56", 256, 64, 56, 1, 1),
    ("r50 3x3 128 56x56 s2", 128, 128, 56, 3, 2),
    ("r50 1x1 512-128 28x28", 512, 128, 28, 1, 1),
    ("r50 3x3 128 28x28", 128, 128, 28, 3, 1),
    ("r50 1x1 128-512 28x28", 128, 512, 28, 1, 1),
    ("r50 3x3 256 28x28 s2", 256, 256, 28, 3, 2),
    ("r50 1x1 1024-256 14x14", 1024, 256, 14, 1, 1),
    ("r50 3x3 256 14x14", 256, 256, 14, 3, 1),
    ("r50 1x1 256-1024 14x14", 256, 1024, 14, 1, 1),
    ("r50 1x1 2048-512 7x7", 2048, 512, 7, 1, 1),
    ("r50 3x3 512 7x7", 512, 512, 7, 3, 1),
    ("r50 1x1 512-2048 7x7", 512, 2048, 7, 1, 1),
]
ALL_LAYERS = [(*lay, 1) for lay in VGG16_CIFAR + RESNET_IMAGENET] + RESNET50
# The quick set of gpu_check.sh: every family, small to large spatial sizes.
QUICK_NAMES = [
    "vgg16 64-64 32x32", "vgg16 128-128 16x16", "vgg16 256-256 8x8", "vgg16 512-512 4x4",
    "resnet 64 56x56 3x3", "resnet 128 28x28 3x3", "resnet 256 14x14 3x3", "resnet 512 7x7 3x3",
    "r50 1x1 256-64 56x56", "r50 3x3 128 56x56 s2", "r50 1x1 1024-256 14x14", "r50 1x1 512-2048 7x7",
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# A CPU dry run (--dry-run-cpu, under TRITON_INTERPRET=1) checks this script's
# plumbing on a machine without a GPU; its times mean nothing.
DEVICE = "cuda"
DRY_LAYERS = [("dry 3x3 16-16 6x6", 16, 16, 6, 3, 1), ("dry 1x1 32-16 4x4", 32, 16, 4, 1, 1)]


def _time_ms(fn, warmup, rep):
    if DEVICE == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def gpu_description() -> dict:
    if DEVICE != "cuda":
        return {"gpu": "none (CPU dry run under the Triton interpreter: times mean nothing)",
                "torch": torch.__version__}
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    props = torch.cuda.get_device_properties(0)
    import pydecouple

    return {
        "gpu": f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, "
               f"sm_{props.major}{props.minor})",
        "cuda (torch)": str(torch.version.cuda),
        "cudnn": str(torch.backends.cudnn.version()),
        "torch": torch.__version__,
        "triton": triton_version,
        "pydecouple": pydecouple.__version__,
        "cuda extension": "built" if hasattr(torch.ops.pydecouple, "gated_conv2d_cuda") else "not built",
        "tf32 (cudnn.allow_tf32)": str(torch.backends.cudnn.allow_tf32),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def bench_case(layer, batch, f, dtype_name, layout, gen, warmup, rep, providers):
    from pydecouple.kernels.gated_conv2d import gated_conv2d_fwd

    name, cin, cout, h, k, stride = layer
    dtype = DTYPES[dtype_name]
    dev = DEVICE
    pad = k // 2
    mf = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(batch, cin, h, h, generator=gen).to(dev, dtype).contiguous(memory_format=mf)
    w = (torch.randn(cout, cin, k, k, generator=gen) / (cin * k * k) ** 0.5).to(dev, dtype).contiguous(
        memory_format=mf)
    b = torch.randn(cout, generator=gen).to(dev, dtype)
    om = fixed_count_mask(batch, cout, f, gen).to(dev)
    im = fixed_count_mask(batch, cin, f, gen).to(dev)
    ki, ko = int(im[0].sum()), int(om[0].sum())
    x_cut = torch.randn(batch, ki, h, h, generator=gen).to(dev, dtype).contiguous(memory_format=mf)
    w_cut = torch.randn(ko, ki, k, k, generator=gen).to(dev, dtype).contiguous(memory_format=mf)
    omf = om[:, :, None, None].to(dtype)
    s2, p4, d2 = (stride, stride), (pad, pad, pad, pad), (1, 1)
    has_cuda = hasattr(torch.ops.pydecouple, "gated_conv2d_cuda")

    fns = {
        "dense": lambda: F.conv2d(x, w, b, stride, pad) * omf,
        # The public op with its backend pinned (the one dispatch point); the
        # two triton_* rows below force one of the Triton launcher's input strategies.
        "triton": lambda: pydecouple.gated_conv2d(x, w, b, om, im, stride, pad, backend="triton"),
        "cuda": (lambda: pydecouple.gated_conv2d(x, w, b, om, im, stride, pad, backend="cuda")) if has_cuda else None,
        "cut": lambda: F.conv2d(x_cut, w_cut, None, stride, pad),
        "triton_compact": lambda: gated_conv2d_fwd(x, w, b, om, im, s2, p4, d2, 1, False, compact=True),
        "triton_gather": lambda: gated_conv2d_fwd(x, w, b, om, im, s2, p4, d2, 1, False, compact=False),
    }
    ho = (h + 2 * pad - k) // stride + 1
    flops_dense = 2.0 * batch * cin * cout * k * k * ho * ho
    flops_kept = flops_dense * ki * ko / (cin * cout)
    row = {"layer": name, "dtype": dtype_name, "batch": batch, "f": f, "kept_in": ki, "kept_out": ko}
    from pydecouple.reference import gated_conv2d_reference

    want = gated_conv2d_reference(x, w, b, om, im, s2, p4, d2, 1)
    scale = max(1.0, want.abs().max().item())
    tol = {"bf16": 3e-2, "fp16": 4e-3, "fp32": 1e-2}[dtype_name] * scale
    times = {}
    for p in providers:
        fn = fns.get(p)
        if fn is None:
            row[f"{p}_ms"] = float("nan")
            continue
        if p != "dense" and p != "cut":
            err = (fn().float() - want.float()).abs().max().item()
            row[f"{p}_ok"] = bool(err <= tol)
        times[p] = _time_ms(fn, warmup, rep)
        row[f"{p}_ms"] = times[p]
    for p, t in times.items():
        row[f"{p}_tflops"] = (flops_dense if p == "dense" else flops_kept) / (t * 1e-3) / 1e12
        if p != "dense":
            row[f"{p}_speedup"] = times["dense"] / t
    row["ideal"] = (cin * cout) / (ki * ko)
    return row


def _target_set(r):
    """Issue 3's first target: 3x3 layers, >= 64 channels, 14x14 and larger."""
    lay = next(lay for lay in ALL_LAYERS + DRY_LAYERS if lay[0] == r["layer"])
    return lay[4] == 3 and min(lay[1], lay[2]) >= 64 and lay[3] // lay[5] >= 14


def summarize(rows, providers):
    gated = [p for p in providers if p not in ("dense",)]
    out = []
    for dtype in sorted({r["dtype"] for r in rows}):
        for batch in sorted({r["batch"] for r in rows}):
            for f in sorted({r["f"] for r in rows}, reverse=True):
                sel = [r for r in rows if r["dtype"] == dtype and r["batch"] == batch and r["f"] == f]
                if not sel:
                    continue
                s = {"dtype": dtype, "batch": batch, "f": f, "ideal": statistics.median(r["ideal"] for r in sel)}
                for p in gated:
                    sp = [r[f"{p}_speedup"] for r in sel if f"{p}_speedup" in r]
                    s[f"{p} median"] = statistics.median(sp) if sp else float("nan")
                    s[f"{p} worst"] = min(sp) if sp else float("nan")
                tgt = [r for r in sel if _target_set(r)]
                for p in ("triton", "cuda"):
                    sp = [r[f"{p}_speedup"] for r in tgt if f"{p}_speedup" in r]
                    s[f"{p} median (3x3>=64ch>=14x14)"] = statistics.median(sp) if sp else float("nan")
                out.append(s)
    return out


def target_lines(rows):
    """The three targets of issue 3, best of the Triton and CUDA kernels per case."""
    def best(r):
        return max(r.get("triton_speedup", 0.0), r.get("cuda_speedup", 0.0))

    lines = []
    t1 = [best(r) for r in rows if r["dtype"] == "bf16" and r["batch"] in (32, 128) and r["f"] == 0.5
          and _target_set(r)]
    if t1:
        lines.append(f"- bf16, batch 32/128, f=0.5, 3x3 >=64ch >=14x14: median speedup {statistics.median(t1):.2f}x "
                     f"(target >= 2.5x, ideal 4x) over {len(t1)} cases")
    t2 = [best(r) for r in rows if r["f"] == 1.0]
    if t2:
        lines.append(f"- f=1.0: worst speedup {min(t2):.2f}x (target: no slower than 1/1.15 = 0.87x; "
                     "where below, dispatch to cuDNN)")
    t3 = [best(r) for r in rows if r["batch"] == 1 and r["f"] <= 0.75]
    if t3:
        lines.append(f"- batch 1, f<=0.75: worst speedup {min(t3):.2f}x (target >= 1.0x), "
                     f"median {statistics.median(t3):.2f}x")
    bad = [f"{r['layer']}/{r['dtype']}/b{r['batch']}/f{r['f']}/{k[:-3]}" for r in rows for k, v in r.items()
           if k.endswith("_ok") and not v]
    lines.append(f"- correctness against dense: {'all ok' if not bad else 'FAILED: ' + ', '.join(bad[:10])}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="the gpu_check.sh set: 12 layers, bf16 at every batch, fp32 at batch 32, short timings")
    p.add_argument("--layers", default="all", help="all, quick, or comma-separated layer names")
    p.add_argument("--batches", default="1,32,128")
    p.add_argument("--fractions", default="1.0,0.75,0.5,0.25", help="kept fractions f = f_in = f_out")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma-separated from bf16, fp16, fp32")
    p.add_argument("--layout", default="channels_last", choices=["channels_last", "nchw"])
    p.add_argument("--providers", default="dense,triton,cuda,cut")
    p.add_argument("--compare-compaction", action="store_true",
                   help="also time the Triton kernel with the input compaction forced on and off "
                        "(bf16, batch 32, f=0.5, the 3x3 stride-1 layers)")
    p.add_argument("--warmup", type=float, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=float, default=100, help="do_bench repetition time, ms")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--name", default="cuda_kernel", help="file stem of the CSV and markdown written to --out")
    p.add_argument("--time-budget", type=float, default=0,
                   help="seconds; past it no new case starts and the tables are written from what ran (0: none)")
    p.add_argument("--dry-run-cpu", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    global DEVICE
    if args.dry_run_cpu:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--dry-run-cpu needs TRITON_INTERPRET=1", file=sys.stderr)
            return 2
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("no CUDA GPU found (torch.cuda.is_available() is False): nothing to benchmark", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError as e:
        print(f"Triton is not installed ({e}): the CUDA benchmark times it with triton.testing.do_bench",
              file=sys.stderr)
        return 2
    import pydecouple

    pydecouple.extension_available()  # loads the compiled ops (gated_conv2d_cuda) if they were built
    if args.quick:
        args.layers, args.warmup, args.rep = "quick", 5, 20
    if args.dry_run_cpu:
        layers = DRY_LAYERS
    elif args.layers == "all":
        layers = ALL_LAYERS
    else:
        names = QUICK_NAMES if args.layers == "quick" else [s.strip() for s in args.layers.split(",")]
        layers = [lay for lay in ALL_LAYERS if lay[0] in names]
        missing = set(names) - {lay[0] for lay in layers}
        if missing:
            print(f"unknown layers {sorted(missing)}; known: {[lay[0] for lay in ALL_LAYERS]}", file=sys.stderr)
            return 2
    batches = [int(b) for b in args.batches.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    providers = [q.strip() for q in args.providers.split(",")]
    if "dense" not in providers:
        providers.insert(0, "dense")
    # The cases of the targets first (batch 32 and 128 before batch 1), so that a
    # time budget cuts the least informative ones.
    batch_order = sorted(batches, key=lambda bt: (bt == 1, -bt))
    jobs = [(lay, bt, f, dt) for dt in dtypes for bt in batch_order for lay in layers for f in fractions
            if not (args.quick and dt == "fp32" and bt != 32)]
    gen = torch.Generator().manual_seed(0)
    desc = gpu_description()
    rows, t0 = [], time.time()
    skipped = 0
    for i, (lay, bt, f, dt) in enumerate(jobs):
        if args.time_budget and time.time() - t0 > args.time_budget:
            skipped = len(jobs) - i
            print(f"  time budget of {args.time_budget:.0f} s spent: {skipped} cases not run", file=sys.stderr)
            break
        rows.append(bench_case(lay, bt, f, dt, args.layout, gen, args.warmup, args.rep, providers))
        if (i + 1) % 24 == 0 or i + 1 == len(jobs):
            print(f"  {i + 1}/{len(jobs)} cases, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    compaction_rows = []
    if args.compare_compaction and not skipped:
        # 3x3 stride-1 layers only: forcing the pass the other way compiles new
        # kernel variants per layer family.
        for lay in [lay for lay in layers if lay[4] == 3 and lay[5] == 1]:
            if args.time_budget and time.time() - t0 > args.time_budget:
                break
            compaction_rows.append(bench_case(lay, 32, 0.5, "bf16", args.layout, gen, args.warmup, args.rep,
                                              ["dense", "triton", "triton_compact", "triton_gather"]))

    if not rows:
        print("no case ran (time budget too small?)", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, f"{args.name}.csv"), rows)
    if compaction_rows:
        write_csv(os.path.join(args.out, f"{args.name}_compaction.csv"), compaction_rows)
    summary = summarize(rows, providers)
    gated = [q for q in providers if q != "dense"]
    summary_cols = ["dtype", "batch", "f", "ideal"] + [f"{q} median" for q in gated] + \
        [f"{q} worst" for q in gated if q != "cut"] + \
        [c for c in ("triton median (3x3>=64ch>=14x14)", "cuda median (3x3>=64ch>=14x14)") if c in summary[0]]
    case_cols = ["layer", "dtype", "batch", "f", "dense_ms"] + [f"{q}_ms" for q in gated] + \
        [f"{q}_speedup" for q in gated] + ["ideal", "dense_tflops"] + [f"{q}_tflops" for q in gated if q != "cut"]
    case_cols = [c for c in case_cols if c in rows[0]]
    command = " ".join(["python benchmarks/bench_gated_conv_cuda.py"] + (argv if argv is not None else sys.argv[1:]))
    md = ["# gated_conv2d on CUDA vs cuDNN dense\n", "\n".join(f"- {k}: {v}" for k, v in desc.items()), "",
          f"Command: `{command}`", "",
          *([f"**{skipped} of {len(jobs)} cases were not run (time budget).**", ""] if skipped else []),
          f"Layout {args.layout}; times are do_bench medians in ms; speedup = (cuDNN dense + mask) / provider; "
          "cut = cuDNN on the problem cut to the kept channels (the practical limit); TFLOP/s on the FLOPs each "
          "provider needs (dense for dense, kept for the others).", "",
          "## Targets (issue 3)", "", *target_lines(rows), "",
          "## Summary (median and worst speedup over the layers)", "", markdown_table(summary, summary_cols), ""]
    if compaction_rows:
        md += ["## Triton input compaction (bf16, batch 32, f=0.5, 3x3 layers)", "",
               markdown_table(compaction_rows, ["layer", "dense_ms", "triton_ms", "triton_compact_ms",
                                                "triton_gather_ms", "triton_compact_speedup",
                                                "triton_gather_speedup"]), ""]
    md += ["## Every case", "", markdown_table(rows, case_cols), ""]
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as fh:
        fh.write("\n".join(md))
    # The short table, last.
    short_cols = ["dtype", "batch", "f", "ideal"] + [c for c in ("triton median", "cuda median", "cut median",
                                                                 "triton median (3x3>=64ch>=14x14)")
                                                     if c in summary[0]]
    print("\n== short table")
    print(f"{desc['gpu']}, torch {desc['torch']}, triton {desc.get('triton', '-')}, layout {args.layout}")
    print(f"full results: {os.path.join(args.out, args.name + '.md')}\n")
    print("\n".join(target_lines(rows)) + "\n")
    print(markdown_table(summary, short_cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())
