"""The whole story in minutes: `python -m pydecouple demo` (`make demo`).

On the embedded data set (scikit-learn's handwritten digits, nothing
downloaded) or the CIFAR-10 subset, it trains a dense CNN, decouples it,
and then measures and shows, in order: accuracy dense and decoupled; the FLOPs
ratio; the accelerated model's speedup over its dense twin at batch 1 and a
larger batch; the kernel's speedup on realistic layer shapes at f = 0.5; the
path analysis; FGSM and PGD detection. It writes ``<out>/report.md`` and
``<out>/report.json``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import statistics
import time
from typing import Any, Dict, List

import torch

log = logging.getLogger("pydecouple.demo")

# Per data set: the model, the schedules, and the decoupling setting of
# docs/method.md (batch-normalised gate logits, detached gate input, gates and
# MI classifiers at 10x the learning rate, L_S with a target kept fraction rho).
SETTINGS: Dict[str, Dict[str, Any]] = {
    # Digits are 8x8: upsampled to 16x16 so the layers (64 to 256 channels at
    # 16x16 down to 4x4) are not toy-sized and the timings mean something.
    # rho = 0.65 measured here: 92.0% against 95.9% dense at 0.47 of the FLOPs,
    # 0.1% of the gates constant (rho = 0.55: 88.5% at 0.36).
    "digits": dict(arch="small_vgg", in_channels=1, upsample=2, dense_epochs=10, decouple_epochs=12, batch_size=64,
                   lr=0.05, speed_batch=64, analysis_limit=None, detect_limit=None,
                   gate=dict(logit_norm=True, bias_init=2.0),
                   loss=dict(lam_k=1.0, lam_m=1.0, lam_s=0.5, rho=0.65),
                   train=dict(gate_lr_mult=10.0)),
    # docs/method.md's full-budget recipe (gate warm start, noise annealed to 0):
    # measured there with 10 dense epochs, 76.5% dense -> 61.1% at 0.45 of the FLOPs
    # after 4 fine-tuning epochs. Longer: see the README for its time here.
    "cifar10": dict(arch="small_vgg", in_channels=3, upsample=1, dense_epochs=10, decouple_epochs=4, batch_size=128,
                    lr=0.05, speed_batch=32, analysis_limit=2000, detect_limit=1000,
                    gate=dict(logit_norm=True, bias_init=2.0),
                    loss=dict(lam_k=1.0, lam_m=1.0, lam_s=0.5, rho=0.63),
                    train=dict(gate_lr_mult=10.0, gate_warm_start_steps=300, gate_noise_final=0.0)),
}

# Realistic layer shapes for the kernel figure, so the headline does not rest
# on the demo's toy-sized layers: (name, Cin, Cout, H, kernel).
KERNEL_SHAPES = [
    ("vgg 64-64 32x32", 64, 64, 32, 3),
    ("vgg 128-128 16x16", 128, 128, 16, 3),
    ("vgg 256-256 8x8", 256, 256, 8, 3),
    ("resnet 256 14x14", 256, 256, 14, 3),
]


class Step:
    """Prints `[i/n] what ... done in s` so a person sees where the time goes."""

    def __init__(self, total: int) -> None:
        self.i, self.total, self.t0 = 0, total, time.perf_counter()
        self.times: Dict[str, float] = {}

    def __call__(self, what: str):
        self.i += 1
        print(f"[{self.i}/{self.total}] {what} ...", flush=True)
        step, t = self, time.perf_counter()

        class _Ctx:
            def __enter__(self_inner):
                return self_inner

            def __exit__(self_inner, *exc):
                dt = time.perf_counter() - t
                step.times[what] = dt
                if exc[0] is None:
                    print(f"      done in {dt:.1f} s", flush=True)
                return False

        return _Ctx()


def _machine(backend: str) -> Dict[str, str]:
    from .benchmarking import machine_description

    m = machine_description()
    m["backend"] = backend
    m["platform"] = platform.platform()
    return m


def kernel_speedups(batch: int, repeats: int) -> List[Dict[str, Any]]:
    from .benchmarking import bench_layer

    gen = torch.Generator().manual_seed(0)
    return [bench_layer(name, cin, cout, h, k, batch, 0.5, repeats, gen) for name, cin, cout, h, k in KERNEL_SHAPES]


def run(data: str = "digits", out: str = "demo-out", quick: bool = False, seed: int = 0) -> Dict[str, Any]:
    from . import flops as count_flops
    from .accelerate import accelerate
    from .adversarial import detect
    from .benchmarking import benchmark_models
    from .data import load_dataset
    from .losses import DecouplingLoss
    from .models import build
    from .nn import decouple
    from .paths import analyze
    from .train import evaluate, gate_statistics, train

    import warnings

    from sklearn.exceptions import ConvergenceWarning

    # The detectors' logistic regressions stop at their iteration cap on purpose
    # (their C is chosen by validation); the warning would drown the story.
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    t_start = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(seed)
    key = "digits" if data == "digits" else "cifar10"
    cfg = copy.deepcopy(SETTINGS[key])
    if quick:  # for tests: the same code path in seconds
        cfg.update(dense_epochs=1, decouple_epochs=1, analysis_limit=200, detect_limit=100)
        if cfg["train"].get("gate_warm_start_steps"):
            cfg["train"]["gate_warm_start_steps"] = 5
    step = Step(8)
    report: Dict[str, Any] = {"dataset": data}

    with step(f"load {data}"):
        train_x, train_y, classes = load_dataset(data, "train")
        test_x, test_y, _ = load_dataset(data, "test")
        if cfg["upsample"] > 1:
            up = lambda t: torch.nn.functional.interpolate(  # noqa: E731
                t, scale_factor=cfg["upsample"], mode="bilinear", align_corners=False).clamp_(0, 1)
            train_x, test_x = up(train_x), up(test_x)
        print(f"      {len(train_x)} training and {len(test_x)} test images, {len(classes)} classes, "
              f"{tuple(train_x.shape[1:])} each")

    with step(f"train a dense {cfg['arch']} ({cfg['dense_epochs']} epochs)"):
        dense = build(cfg["arch"], num_classes=len(classes), in_channels=cfg["in_channels"])
        train(dense, (train_x, train_y), (test_x, test_y), epochs=cfg["dense_epochs"], batch_size=cfg["batch_size"],
              lr=cfg["lr"], seed=seed, progress=True)
        acc_dense = evaluate(dense, test_x, test_y)["acc"]
        print(f"      dense test accuracy {acc_dense:.1%}")

    with step(f"decouple and fine-tune ({cfg['decouple_epochs']} epochs, {cfg['loss']})"):
        decoupled = decouple(copy.deepcopy(dense), **cfg["gate"])
        loss = DecouplingLoss(decoupled, len(classes), **cfg["loss"])
        train(decoupled, (train_x, train_y), (test_x, test_y), epochs=cfg["decouple_epochs"],
              batch_size=cfg["batch_size"], lr=cfg["lr"] / 5, loss=loss, seed=seed, progress=True, **cfg["train"])
        acc_dec = evaluate(decoupled, test_x, test_y)["acc"]
        with torch.no_grad():
            ratio = count_flops(decoupled, test_x).ratio
        stats = gate_statistics(decoupled, train_x, train_y, test_x, test_y)
        print(f"      decoupled test accuracy {acc_dec:.1%} at {ratio:.2f} of the dense FLOPs")
        report.update(accuracy_dense=acc_dense, accuracy_decoupled=acc_dec, flops_ratio=ratio,
                      gates_never_changing=stats.get("constant_gates"), gate_statistics=stats)

    with step("accelerate and time against the dense twin"):
        rows = benchmark_models(dense, decoupled, test_x, batch_sizes=(1, cfg["speed_batch"]),
                                repeats=3 if quick else 7)
        by = {(r["provider"], r["batch"]): r for r in rows}
        sp1 = by[("accelerated", 1)]["speedup"]
        spb = by[("accelerated", cfg["speed_batch"])]["speedup"]
        report.update(speedup_batch1=sp1, speedup_batched=spb, speed_batch=cfg["speed_batch"], model_speed=rows)
        print(f"      accelerated / dense twin: {sp1:.2f}x at batch 1, {spb:.2f}x at batch {cfg['speed_batch']} "
              f"(ideal {1 / ratio:.2f}x from FLOPs)")

    with step("kernel speedup on realistic layer shapes, f = 0.5"):
        krows = kernel_speedups(batch=8 if quick else 32, repeats=3 if quick else 5)
        kmed = statistics.median(r["speedup"] for r in krows)
        report.update(kernel_speedup_f05=kmed, kernel_layers=krows)
        for r in krows:
            print(f"      {r['layer']:<20} batch {r['batch']}: {r['speedup']:.2f}x (ideal {r['ideal']:.1f}x, "
                  f"dense on the cut problem {r['cut_limit']:.2f}x)")

    with step("path analysis"):
        sel = slice(None) if cfg["analysis_limit"] is None else slice(0, cfg["analysis_limit"])
        ana = analyze(decoupled, test_x[sel], test_y[sel], classes, os.path.join(out, "analysis"),
                      ref_images=train_x, ref_labels=train_y, progress=True)
        report.update(path_template_accuracy=ana.get("template_accuracy"), analysis=ana)
        print(f"      nearest-template accuracy from paths alone: {_fmt(ana.get('template_accuracy'), '.1%')} "
              f"(network {_fmt(ana.get('network_accuracy'), '.1%')})")

    with step("FGSM and PGD, detected from paths"):
        sel = slice(None) if cfg["detect_limit"] is None else slice(0, cfg["detect_limit"])
        det = detect(decoupled, test_x[sel], test_y[sel], os.path.join(out, "detection"),
                     ref_images=train_x, ref_labels=train_y, progress=True)
        report.update(detection_auc_fgsm=det["headline"]["fgsm"]["learned_auc"],
                      detection_auc_pgd=det["headline"]["pgd"]["learned_auc"],
                      detection_auc_fgsm_unsupervised=det["headline"]["fgsm"]["unsupervised_auc"],
                      detection_auc_pgd_unsupervised=det["headline"]["pgd"]["unsupervised_auc"], detection=det)
        print(f"      learned detector ROC-AUC: FGSM {_fmt(report['detection_auc_fgsm'], '.3f')}, "
              f"PGD {_fmt(report['detection_auc_pgd'], '.3f')}")

    with step("write the report"):
        from ._backend import choose

        report["seconds_total"] = time.perf_counter() - t_start
        report["seconds_by_step"] = step.times
        # The backend a gated layer gets (half of its channels on), not the dense fallback.
        half = torch.arange(8).expand(2, 8) < 4
        report["machine"] = _machine(choose(torch.zeros(2, 8, 16, 16), None, half, half, 1))
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(_jsonable(report), f, indent=2)
        with open(os.path.join(out, "report.md"), "w") as f:
            f.write(_markdown(report, cfg))
    print(f"\nwrote {out}/report.md and {out}/report.json in {report['seconds_total']:.0f} s")
    return report


def _fmt(v, spec: str) -> str:
    """A figure, or 'n/a' where an analysis had nothing to measure (e.g. every gate constant)."""
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    return format(v, spec)


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item") and callable(o.item):
        return o.item()
    return o


def _markdown(r: Dict[str, Any], cfg: Dict[str, Any]) -> str:
    def pct(v):
        return "n/a" if v is None else f"{v:.1%}"

    lines = [
        f"# pydecouple demo on {r['dataset']}",
        "",
        f"Machine: {r['machine']['cpu']}, {r['machine']['threads']} threads, torch {r['machine']['torch']}, "
        f"triton {r['machine']['triton']}, backend `{r['machine']['backend']}`. Total {r['seconds_total']:.0f} s.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| accuracy, dense {cfg['arch']} | {pct(r['accuracy_dense'])} |",
        f"| accuracy, decoupled | {pct(r['accuracy_decoupled'])} |",
        f"| FLOPs, decoupled / dense | {r['flops_ratio']:.3f} |",
        f"| gates that never change over the training images | {pct(r.get('gates_never_changing'))} |",
        f"| accelerated vs dense twin, batch 1 | {r['speedup_batch1']:.2f}x |",
        f"| accelerated vs dense twin, batch {r['speed_batch']} | {r['speedup_batched']:.2f}x |",
        f"| kernel speedup at f = 0.5, median of {len(r['kernel_layers'])} realistic layers | "
        f"{r['kernel_speedup_f05']:.2f}x |",
        f"| nearest-template accuracy from paths alone | {_fmt(r['path_template_accuracy'], '.1%')} |",
        f"| detection ROC-AUC, FGSM: learned detector / unsupervised template score | "
        f"{_fmt(r['detection_auc_fgsm'], '.3f')} / {_fmt(r['detection_auc_fgsm_unsupervised'], '.3f')} |",
        f"| detection ROC-AUC, PGD: learned detector / unsupervised template score | "
        f"{_fmt(r['detection_auc_pgd'], '.3f')} / {_fmt(r['detection_auc_pgd_unsupervised'], '.3f')} |",
        "",
        "The decoupled network keeps its accuracy within "
        f"{(r['accuracy_dense'] - r['accuracy_decoupled']) * 100:.1f} points of the dense one at "
        f"{r['flops_ratio']:.0%} of its FLOPs; the accelerated model turns that into "
        f"{r['speedup_batched']:.2f}x measured time at batch {r['speed_batch']} "
        f"(the demo's layers are small: the kernel figure below is on realistic shapes).",
        "",
        "## Kernel on realistic layers (f_in = f_out = 0.5)",
        "",
        "| layer | batch | dense ms | gated ms | speedup | ideal | dense on cut problem |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in r["kernel_layers"]:
        lines.append(f"| {k['layer']} | {k['batch']} | {k['dense_ms']:.2f} | {k['gated_ms']:.2f} | "
                     f"{k['speedup']:.2f}x | {k['ideal']:.1f}x | {k['cut_limit']:.2f}x |")
    lines += ["", "## Model speed", "", "| provider | batch | latency ms | images/s | speedup |", "|---|---|---|---|---|"]
    for m in r["model_speed"]:
        lines.append(f"| {m['provider']} | {m['batch']} | {m['latency_ms']:.3f} | {m['images_per_s']:.0f} | "
                     f"{m['speedup']:.2f}x |")
    lines += ["", "## Paths and detection", "",
              "The path analysis is in [analysis/report.md](analysis/report.md) and the adversarial detection in "
              "[detection/report.md](detection/report.md), each with its pictures and one sentence per picture.", ""]
    return "\n".join(lines)
