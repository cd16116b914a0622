"""A dense model against its accelerated decoupled twin, end to end, on real
test images, measured in one process, interleaved, medians over repeats.

The baseline is the dense twin a user would run: BN folded into the convs
(the same inference treatment the accelerated model gets), in the same
dtype, in its faster memory layout (NCHW or channels_last; ``--compile``
adds its torch.compile'd form): ``dense best``. Providers (one row each per
dtype and batch size; pydecouple.benchmarking.benchmark_models):

- ``dense``: the dense model as PyTorch runs it (eval, BN unfolded).
- ``dense folded`` / ``dense folded cl``: the twin in each layout.
- ``decoupled masked-dense`` (float32): the decoupled model's eval forward with
  dense kernels (conv, BN, then the mask: what the paper's code does).
- ``accelerated masked-dense``: folded, gates computed, dense conv + mask.
- ``accelerated nchw`` / ``accelerated cl``: ``accelerate(decoupled)``, the
  gated layers skipping deselected filters and input channels; ``accelerated``
  is the faster of the two.
- ``accelerated all-on``: every gate forced on by its ACM's bias (gates still
  computed): the cost of gating when nothing is skipped.

Columns: latency per batch (ms), throughput (images/s), the FLOPs ratio
(``pydecouple.flops``: gated MACs, ACMs included, over the dense model's),
the ideal speedup (its inverse), the measured speedup against ``dense best``
(and against ``dense``), the efficiency (measured speedup x FLOPs ratio) and,
for bfloat16, the agreement of predictions with the float32 decoupled model.

``--suite`` runs the issue-13 set (vgg16, resnet56, resnet47_bottleneck,
small_vgg at kept 0.5 and 0.7; random weights, gates calibrated to the kept
fraction) and writes one summary table, model_suite.md.

Then a per-layer profile (``pydecouple.accelerate.profile``) of the accelerated
and the dense-folded model: conv, gate and other time per layer.

Usage::

    python benchmarks/bench_model.py --checkpoint runs/small_vgg_dec/last.pt \
        [--dense-checkpoint runs/small_vgg_dense/last.pt]
    python benchmarks/bench_model.py --dense-checkpoint runs/small_vgg_dense/last.pt --kept 0.5  # untrained gates
    python benchmarks/bench_model.py --arch resnet20 --kept 0.5      # random weights, gates set to keep ~50%

Writes ``benchmarks/results/model_<name>.csv`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn

from pydecouple.accelerate import accelerate, profile
from pydecouple.benchmarking import (PROVIDERS, accuracy, all_gates_on, benchmark_models, machine_description,
                                     machine_header, markdown_table, masked_dense, median_times, write_csv)
from pydecouple.flops import flops
from pydecouple.nn import gate_modules

log = logging.getLogger("bench_model")
RESULTS = Path(__file__).resolve().parent / "results"
# The CIFAR-10 subset lies in ../shared beside the repository; PYDECOUPLE_CIFAR overrides.
CIFAR = Path(os.environ.get("PYDECOUPLE_CIFAR",
                            Path(__file__).resolve().parents[1].parent / "shared/data/cifar10/cifar10-subset.npz"))

def _synced(f):
    def run():
        out = f()
        torch.cuda.synchronize()
        return out

    return run


def layer_profiles(dense_model: nn.Module, decoupled_model: nn.Module, x: torch.Tensor, repeats: int = 20
                   ) -> List[Dict[str, object]]:
    """Per-layer time of the accelerated model beside the dense-folded one."""
    acc = accelerate(decoupled_model)
    den = accelerate(dense_model)
    pa = profile(acc, x, repeats=repeats)
    pd = profile(den, x, repeats=repeats)
    dense_conv = {lay.name: lay.conv_s for lay in pd.layers}
    rows = []
    for lay in pa.layers:
        d = dense_conv.get(lay.name, float("nan"))
        rows.append(dict(batch=int(x.shape[0]), layer=lay.name, gated="yes" if lay.gated else "", kept=lay.kept,
                         dense_conv_us=d * 1e6, conv_us=lay.conv_s * 1e6, gate_us=lay.gate_s * 1e6,
                         conv_speedup=d / lay.conv_s if lay.conv_s else float("nan"),
                         ideal=1.0 / lay.kept if lay.kept else float("inf"),
                         layer_speedup=d / (lay.conv_s + lay.gate_s) if lay.conv_s else float("nan")))
    rows.append(dict(batch=int(x.shape[0]), layer="(other: pool, adds, head, Python)", gated="", kept=1.0,
                     dense_conv_us=pd.other_s * 1e6, conv_us=pa.other_s * 1e6, gate_us=0.0,
                     conv_speedup=pd.other_s / pa.other_s if pa.other_s else float("nan"), ideal=1.0,
                     layer_speedup=float("nan")))
    rows.append(dict(batch=int(x.shape[0]), layer="total", gated="", kept=float("nan"), dense_conv_us=pd.total_s * 1e6,
                     conv_us=pa.conv_s * 1e6, gate_us=pa.gate_s * 1e6,
                     conv_speedup=pd.conv_s / pa.conv_s if pa.conv_s else float("nan"), ideal=float("nan"),
                     layer_speedup=pd.total_s / pa.total_s))
    return rows


def profile_summary(rows: List[Dict[str, object]]) -> str:
    tot = rows[-1]
    other = rows[-2]
    total_acc = tot["conv_us"] + tot["gate_us"] + other["conv_us"]
    gated = [r for r in rows[:-2] if r["gated"]]
    worst = sorted(gated, key=lambda r: r["conv_speedup"] * r["kept"])[:3]
    def pct(v):
        return f"{100 * v / total_acc:.0f}%"

    return (f"batch {tot['batch']}: accelerated forward {total_acc:.0f} us = conv {tot['conv_us']:.0f} "
            f"({pct(tot['conv_us'])}) + gates {tot['gate_us']:.0f} ({pct(tot['gate_us'])}) "
            f"+ other {other['conv_us']:.0f} ({pct(other['conv_us'])}); "
            f"dense folded {tot['dense_conv_us']:.0f} us. "
            "Least efficient gated layers (conv speedup x kept): "
            + ", ".join(f"{r['layer']} (kept {r['kept']:.2f}, conv {r['conv_speedup']:.2f}x of ideal {r['ideal']:.2f}x)"
                        for r in worst))


# ----------------------------------------------------------------------------- synthetic models


def randomize_bn(model: nn.Module, gen: torch.Generator) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=gen) * 0.8 + 0.6)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.2)


@torch.no_grad()
def calibrate_gates(decoupled: nn.Module, images: torch.Tensor, kept: float, gen: torch.Generator) -> None:
    """Input-dependent gates keeping about ``kept`` of each layer's filters:
    W2 of unit scale, then layer by layer (in forward order) each channel's b2
    set to the (1 - kept) quantile of its logits over ``images``."""
    decoupled.eval()
    gates = gate_modules(decoupled)
    for _, g in gates:
        g.fc2.weight.copy_(torch.randn(g.fc2.weight.shape, generator=gen) / g.hidden ** 0.5)
        g.fc2.bias.zero_()
    for _, g in gates:
        decoupled(images)
        g.fc2.bias.sub_(torch.quantile(g.last_logits, 1.0 - kept, dim=0))


def synthetic_pair(arch: str, kept: float, images: torch.Tensor, seed: int = 0):
    from pydecouple.models import build

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cin = images.shape[1]
    dense = build(arch, in_channels=cin)
    randomize_bn(dense, gen)
    dec = build(arch, decoupled=True, in_channels=cin)
    dec.load_state_dict(dense.state_dict(), strict=False)
    calibrate_gates(dec, images[:128], kept, gen)
    return dense.eval(), dec.eval()


def dense_twin_of(decoupled: nn.Module, meta: dict) -> nn.Module:
    """The dense model with the decoupled model's weights (its function with every gate open)."""
    from pydecouple.models import build

    dense = build(meta["arch"], num_classes=int(meta.get("num_classes", 10)),
                  in_channels=int(meta.get("in_channels", 3)),
                  mean=meta.get("mean"), std=meta.get("std"))
    dense.load_state_dict(decoupled.state_dict(), strict=False)
    return dense.eval()


def load_images(in_channels: int, n: int, upsample: int = 1):
    x, y, desc = _load_images(in_channels, n)
    if upsample > 1:  # as the demo and compare.py train on digits: bilinear, clamped back to [0, 1]
        x = torch.nn.functional.interpolate(x, scale_factor=upsample, mode="bilinear",
                                            align_corners=False).clamp_(0, 1)
        desc += f", upsampled {upsample}x"
    return x, y, desc


def _load_images(in_channels: int, n: int):
    from pydecouple.data import load_dataset

    if in_channels == 3 and CIFAR.is_file():
        x, y, _ = load_dataset(str(CIFAR), "test")
        return x[:n], y[:n], f"CIFAR-10 subset test ({CIFAR.name})"
    if in_channels == 1:
        x, y, _ = load_dataset("digits", "test")
        return x[:n], y[:n], "digits test (sklearn)"
    raise SystemExit(f"bench_model: no test images for {in_channels}-channel models ({CIFAR} absent); "
                     "set PYDECOUPLE_CIFAR to the CIFAR-10 .npz")


def find_checkpoints(root: Path = Path(__file__).resolve().parents[1] / "runs"):
    """The newest decoupled checkpoint under ``runs/`` and the newest dense one of
    the same architecture (None, None when there is none)."""
    found = []
    for path in root.glob("**/*.pt"):
        try:
            meta = torch.load(path, map_location="cpu", weights_only=True).get("meta", {})
        except Exception:  # a checkpoint being written, or not ours
            continue
        found.append((path.stat().st_mtime, path, meta))
    found.sort(key=lambda t: t[0], reverse=True)
    dec = next(((p, m) for _, p, m in found if m.get("decoupled")), None)
    if dec is None:
        return None, None
    dense = next((p for _, p, m in found if not m.get("decoupled") and m.get("arch") == dec[1].get("arch")), None)
    return str(dec[0]), (str(dense) if dense else None)


# ----------------------------------------------------------------------------- the suite

SUITE = [("vgg16", 0.5), ("resnet56", 0.5), ("resnet47_bottleneck", 0.5), ("small_vgg", 0.5), ("small_vgg", 0.7)]


def run_suite(args, batch_sizes, dtypes) -> int:
    images, _, data_desc = load_images(3, args.images)
    rows = []
    for arch, kept in SUITE:
        dense, dec = synthetic_pair(arch, kept, images)
        for r in benchmark_models(dense, dec, images, batch_sizes, args.repeats, min_time=args.min_time,
                                  compile=args.compile, dtypes=dtypes, tune=args.tune):
            if r["provider"] in ("accelerated", "accelerated all-on", "dense best", "accelerated traced rule"):
                rows.append(dict(model=arch, kept=kept, **r))
        print(f"bench_model: {arch} kept {kept} done", file=sys.stderr)
    summary = []
    for arch, kept in SUITE:
        for dt in dtypes:
            for b in batch_sizes:
                sel = {r["provider"]: r for r in rows if r["model"] == arch and r["kept"] == kept
                       and r["dtype"] == str(dt).replace("torch.", "") and r["batch"] == b}
                a, on, base = sel["accelerated"], sel["accelerated all-on"], sel["dense best"]
                # The fastest dense twin in any dtype timed (a user picks the dtype too: on a
                # CPU without a bfloat16 dot product float32 is faster), from the same suite run.
                fastest = min((r for r in rows if r["model"] == arch and r["kept"] == kept and r["batch"] == b
                               and r["provider"] == "dense best"), key=lambda r: r["latency_ms"])
                rule = sel.get("accelerated traced rule")
                summary.append(dict(model=arch, kept=kept, dtype=a["dtype"], batch=b, flops_ratio=a["flops_ratio"],
                                    baseline=f"{base['best_of']} {base['latency_ms']:.2f} ms",
                                    accelerated_ms=a["latency_ms"], accelerated_layout=a["best_of"],
                                    speedup=a["speedup"], ideal=a["ideal_speedup"], efficiency=a["efficiency"],
                                    rule_speedup=rule["speedup"] if rule else float("nan"),
                                    all_on=on["speedup"],
                                    vs_fastest_dense=fastest["latency_ms"] / a["latency_ms"],
                                    fastest_dense=f"{fastest['dtype']} {fastest['best_of']}"))
    out = Path(args.out)
    name = args.name or "model_suite"
    write_csv(str(out / f"{name}.csv"), summary)
    desc = machine_description()
    cols = ["model", "kept", "dtype", "batch", "flops_ratio", "baseline", "accelerated_ms", "accelerated_layout",
            "speedup", "ideal", "efficiency"] + (["rule_speedup"] if args.tune else []) + \
        ["all_on", "vs_fastest_dense", "fastest_dense"]
    md = ["# Accelerated models against the best dense twin", "", machine_header(desc), "",
          f"- images: {data_desc}, {len(images)} images; random weights, BN statistics randomised, gates "
          "calibrated to the kept fraction per layer",
          f"- command: `python benchmarks/bench_model.py {' '.join(sys.argv[1:])}`", "",
          "baseline: the dense twin (BN folded) in the same dtype and its faster layout; speedup = baseline / "
          "accelerated (its faster layout); efficiency = speedup x FLOPs ratio; all_on = the same with every gate "
          "forced on, over the baseline. "
          + ("The accelerated models route each gated layer by its crossover measured on this machine "
             "(pydecouple.accelerate.tune, cached); rule_speedup is the traced model routed by the fitted rule "
             "instead, timed beside it. " if args.tune else "Gated layers route by the fitted rule (--no-tune). ")
          + "vs_fastest_dense: the accelerated model against the fastest dense twin of any dtype timed in this run "
          "(fastest_dense).", "", markdown_table(summary, cols)]
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="decoupled checkpoint (pydecouple.checkpoint format)")
    src.add_argument("--arch", help="zoo architecture with random weights (synthetic run)")
    p.add_argument("--dense-checkpoint",
                   help="dense twin checkpoint (default: the decoupled weights, gates removed); alone: its trained "
                        "weights decoupled, with untrained gates calibrated to --kept")
    p.add_argument("--kept", type=float, default=0.5,
                   help="--arch or --dense-checkpoint alone: kept fraction per gated layer (default 0.5)")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,32 on CPU, 1,32,128 on GPU)")
    p.add_argument("--images", type=int, default=1024, help="test images used (default 1024)")
    p.add_argument("--upsample", type=int, default=1,
                   help="upsample the test images by this factor (2 for the demo's and compare.py's digits models)")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--min-time", type=float, default=0.2, help="seconds per timed sample (default 0.2)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: PyTorch's, all cores)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--no-profile", action="store_true", help="skip the per-layer profile")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile'd dense-folded and accelerated models (slow to compile)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32, bfloat16")
    p.add_argument("--suite", action="store_true",
                   help="the issue-13 model set with random weights, one summary table (model_suite.md)")
    p.add_argument("--no-tune", dest="tune", action="store_false",
                   help="route gated layers by the fitted rule instead of crossovers measured on this machine "
                        "(pydecouple.accelerate.tune; measured once, then cached)")
    p.add_argument("--name", help="file stem under --out (default: model_<arch>[_kept<k>], model_suite)")
    p.add_argument("--out", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.upsample < 1:
        p.error(f"argument --upsample: must be an integer >= 1, got {args.upsample}")
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_model: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    batch_sizes = [int(b) for b in (args.batches or ("1,32,128" if args.device == "cuda" else "1,32")).split(",")]
    dtypes = [{"float32": torch.float32, "bfloat16": torch.bfloat16}[d] for d in args.dtypes.split(",")]
    if args.suite:
        return run_suite(args, batch_sizes, dtypes)

    if not (args.checkpoint or args.arch or args.dense_checkpoint):
        args.checkpoint, args.dense_checkpoint = find_checkpoints()
        if args.checkpoint is None:
            args.arch = "small_vgg"
        print(f"bench_model: no model given; using {args.checkpoint or '--arch small_vgg (random weights)'}"
              + (f" against {args.dense_checkpoint}" if args.dense_checkpoint else ""), file=sys.stderr)
    if args.checkpoint:
        from pydecouple.checkpoint import load_model

        dec, meta = load_model(args.checkpoint)
        if not meta.get("decoupled"):
            print(f"bench_model: {args.checkpoint} is a dense checkpoint; pass the decoupled one as --checkpoint "
                  "and the dense one as --dense-checkpoint", file=sys.stderr)
            return 2
        images, labels, data_desc = load_images(int(meta.get("in_channels", 3)), args.images, args.upsample)
        if args.dense_checkpoint:
            dense, dmeta = load_model(args.dense_checkpoint)
            dense_desc = f"dense checkpoint {args.dense_checkpoint}"
        else:
            dense = dense_twin_of(dec, meta)
            dense_desc = "the decoupled checkpoint's weights with the gates removed"
        arch = meta["arch"]
        model_desc = f"{arch}, decoupled checkpoint {args.checkpoint}"
        name = args.name or f"model_{arch}"
    elif args.dense_checkpoint and not args.arch:
        from pydecouple.checkpoint import load_model
        from pydecouple.models import build

        dense, meta = load_model(args.dense_checkpoint)
        if meta.get("decoupled"):
            print(f"bench_model: {args.dense_checkpoint} is decoupled; pass it as --checkpoint", file=sys.stderr)
            return 2
        arch = meta["arch"]
        images, labels, data_desc = load_images(int(meta.get("in_channels", 3)), args.images, args.upsample)
        dec = build(arch, num_classes=int(meta.get("num_classes", 10)), decoupled=True,
                    in_channels=int(meta.get("in_channels", 3)), mean=meta.get("mean"), std=meta.get("std"))
        dec.load_state_dict(dense.state_dict(), strict=False)
        with torch.no_grad():
            calibrate_gates(dec, images[:128], args.kept, torch.Generator().manual_seed(0))
        dec.eval()
        model_desc = (f"{arch}, trained dense checkpoint {args.dense_checkpoint} decoupled with untrained gates "
                      f"calibrated to keep ~{args.kept:.2f} per layer (timing only: accuracy is not the method's)")
        dense_desc = f"dense checkpoint {args.dense_checkpoint}"
        name = args.name or f"model_{arch}_trained_dense_kept{args.kept:g}"
        labels = None  # untrained gates: the decoupled accuracy would mean nothing
    else:
        from pydecouple.models import ARCHS

        if args.arch not in ARCHS:
            print(f"bench_model: unknown --arch {args.arch!r}; choose one of {sorted(ARCHS)}", file=sys.stderr)
            return 2
        images, labels, data_desc = load_images(1 if args.arch == "tiny_cnn" else 3, args.images)
        dense, dec = synthetic_pair(args.arch, args.kept, images)
        labels = None  # random weights: accuracy means nothing
        arch = args.arch
        model_desc = (f"{arch}, random weights, BN statistics randomised, gates calibrated to keep "
                      f"~{args.kept:.2f} per layer")
        dense_desc = "the same random weights, ungated"
        name = args.name or f"model_{arch}_kept{args.kept:g}"

    dev = torch.device(args.device)
    dense, dec, images = dense.to(dev), dec.to(dev), images.to(dev)
    labels = labels.to(dev) if labels is not None else None
    rows = benchmark_models(dense, dec, images, batch_sizes, args.repeats, labels=labels, min_time=args.min_time,
                            compile=args.compile, dtypes=dtypes, tune=args.tune and args.device == "cpu")
    for r in rows:
        r["arch"] = arch

    prof_rows: List[Dict[str, object]] = []
    summaries = []
    if not args.no_profile and args.device == "cpu":
        for b in batch_sizes:
            pr = layer_profiles(dense, dec, images[:b].contiguous())
            prof_rows += pr
            summaries.append(profile_summary(pr))

    desc = machine_description()
    try:
        desc["load average"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        pass
    out = Path(args.out)
    write_csv(str(out / f"{name}.csv"), rows)
    if prof_rows:
        write_csv(str(out / f"{name}_profile.csv"), prof_rows)
    cols = ["dtype", "provider", "batch", "latency_ms", "images_per_s", "flops_ratio", "ideal_speedup", "speedup",
            "speedup_vs_eager", "efficiency", "best_of"] + (["accuracy", "agreement"] if labels is not None else [])
    md = [f"# {arch}: dense vs accelerated decoupled", "", machine_header(desc), "",
          f"- model: {model_desc}", f"- dense twin: {dense_desc}", f"- images: {data_desc}, {len(images)} images",
          f"- command: `python benchmarks/bench_model.py {' '.join(argv if argv is not None else sys.argv[1:])}`", "",
          "speedup and efficiency are against `dense best`: the dense twin with BN folded, same dtype, its faster "
          "layout (best_of); `speedup_vs_eager` against the dense model as PyTorch runs it (BN unfolded, NCHW).", "",
          markdown_table(rows, cols)]
    if prof_rows:
        md += ["", "## Per-layer profile (us per forward; accelerated beside dense folded)", ""]
        md += [f"- {s}" for s in summaries]
        md += ["", markdown_table(prof_rows, ["batch", "layer", "gated", "kept", "dense_conv_us", "conv_us", "gate_us",
                                              "conv_speedup", "ideal", "layer_speedup"])]
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nwrote {out / (name + '.csv')} and {out / (name + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
