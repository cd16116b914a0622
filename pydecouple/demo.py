"""The whole story in minutes: `python -m pydecouple demo` (`make demo`).

On the embedded data set (scikit-learn's handwritten digits, nothing
downloaded) or the CIFAR-10 subset, it trains a dense CNN, decouples it,
and then measures and shows, in order: accuracy dense and decoupled; the FLOPs
ratio; the accelerated model's speedup over its dense twin at batch 1 and a
larger batch; the kernel's speedup on realistic layer shapes at f = 0.5; the
path analysis; FGSM and PGD detection. It writes ``<out>/report.md`` and
``<out>/report.json``.

Deterministic: the same seed gives the same accuracy, FLOPs, gate, template
and AUC figures on every run on the same machine (timings aside). Every step
that draws random numbers is seeded from ``seed`` on entry (a step's figures
do not depend on what an earlier, timed step drew), and the whole run uses a
fixed number of intra-op threads (``threads``, default
:func:`default_threads`): a float reduction split over another number of
threads sums in another order, and training drifts apart within an epoch
(1 and 2 threads gave 64.6% and 66.2% decoupled accuracy for the same seed in
the quick demo).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import platform
import statistics
import time
from typing import Any, Dict, List, Optional

import torch

log = logging.getLogger("pydecouple.demo")

# Per data set: the model, the schedules, and the decoupling setting of
# docs/method.md (batch-normalised gate logits, detached gate input, gates and
# MI classifiers at 10x the learning rate, L_S with a target kept fraction rho).
SETTINGS: Dict[str, Dict[str, Any]] = {
    # Digits are 8x8: upsampled to 16x16 so the layers (64 to 256 channels at
    # 16x16 down to 4x4) are not toy-sized and the timings mean something.
    # rho = 0.65 measured here: 92.0% against 95.9% dense at 0.47 of the FLOPs,
    # 0.1% of the gates constant (rho = 0.55: 88.5% at 0.36). kd: distillation
    # from the dense model (weight 0.5, temperature 4), the best equal-budget try
    # of benchmarks/prune/compare.py in this setting, and 24 fine-tuning epochs
    # instead of 12: together 95.1% against 95.9% dense at 0.48 FLOPs there
    # (seed 0), where 12 epochs gave 92.5% (docs/pruning.md).
    "digits": dict(arch="small_vgg", in_channels=1, upsample=2, dense_epochs=10, decouple_epochs=24, batch_size=64,
                   lr=0.05, speed_batch=64, analysis_limit=None, detect_limit=None,
                   gate=dict(logit_norm=True, bias_init=2.0),
                   loss=dict(lam_k=1.0, lam_m=1.0, lam_s=0.5, rho=0.65), kd=dict(kd_weight=0.5, kd_temperature=4.0),
                   train=dict(gate_lr_mult=10.0)),
    # docs/method.md's full-budget recipe (gate warm start, noise annealed to 0):
    # measured there with 10 dense epochs, 76.5% dense -> 61.1% at 0.45 of the FLOPs
    # after 4 fine-tuning epochs. Longer: see the README for its time here.
    "cifar10": dict(arch="small_vgg", in_channels=3, upsample=1, dense_epochs=10, decouple_epochs=4, batch_size=128,
                    lr=0.05, speed_batch=32, analysis_limit=2000, detect_limit=1000,
                    gate=dict(logit_norm=True, bias_init=2.0),
                    loss=dict(lam_k=1.0, lam_m=1.0, lam_s=0.5, rho=0.63), kd=None,
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



def auc_interval(auc: Optional[float], n_pos: int, n_neg: int) -> Dict[str, Any]:
    """The sampling error of a ROC-AUC measured on ``n_pos`` positives and
    ``n_neg`` negatives: Hanley & McNeil's (1982) standard error and the normal
    95% interval ``auc +- 1.96 se``, clipped to [0, 1]. A closed form of the
    AUC and the counts: as deterministic as the AUC itself."""
    if auc is None or auc != auc or n_pos < 1 or n_neg < 1:
        return {"auc": auc, "se": None, "ci95": None, "n_pos": n_pos, "n_neg": n_neg}
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc)) / (n_pos * n_neg)
    se = math.sqrt(max(var, 0.0))
    return {"auc": auc, "se": se, "ci95": [max(0.0, auc - 1.96 * se), min(1.0, auc + 1.96 * se)],
            "n_pos": n_pos, "n_neg": n_neg}


def default_threads() -> int:
    """2, or 1 on a one-core machine: a constant per machine, so that every run sums in the same order."""
    return max(1, min(2, os.cpu_count() or 1))


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# The figures a seed fixes on a given machine (what the determinism check compares between runs).
DETERMINISTIC_KEYS = ("accuracy_dense", "accuracy_decoupled", "flops_ratio", "gates_never_changing",
                      "path_template_accuracy", "detection_auc_fgsm", "detection_auc_pgd",
                      "detection_auc_fgsm_unsupervised", "detection_auc_pgd_unsupervised")


def run(data: str = "digits", out: str = "demo-out", quick: bool = False, seed: int = 0,
        threads: Optional[int] = None, timing: bool = True) -> Dict[str, Any]:
    """The demo (see the module docstring). ``threads``: intra-op threads for the
    whole run (default :func:`default_threads`; the figures depend on it, so it
    is in the report). ``timing=False`` leaves out the two timed steps (the
    determinism test)."""
    threads = threads or default_threads()
    with _threads(threads):
        return _run(data, out, quick, seed, threads, timing)


def _run(data: str, out: str, quick: bool, seed: int, threads: int, timing: bool) -> Dict[str, Any]:
    from . import flops as count_flops
    from .adversarial import detect
    from .benchmarking import benchmark_models
    from .data import load_dataset
    from .losses import DecouplingLoss
    from .models import build
    from .report import jsonable
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
    step = Step(8 if timing else 6)
    report: Dict[str, Any] = {"dataset": data, "seed": seed, "threads": threads}

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
        torch.manual_seed(seed)
        dense = build(cfg["arch"], num_classes=len(classes), in_channels=cfg["in_channels"])
        train(dense, (train_x, train_y), (test_x, test_y), epochs=cfg["dense_epochs"], batch_size=cfg["batch_size"],
              lr=cfg["lr"], seed=seed, progress=True)
        acc_dense = evaluate(dense, test_x, test_y)["acc"]
        print(f"      dense test accuracy {acc_dense:.1%}")

    kd = cfg.get("kd") or {}
    with step(f"decouple and fine-tune ({cfg['decouple_epochs']} epochs, {dict(cfg['loss'], **kd)})"):
        torch.manual_seed(seed + 1)
        decoupled = decouple(copy.deepcopy(dense), **cfg["gate"])
        # kd: distillation from the dense model (frozen, eval mode) on the same augmented batches
        teacher = copy.deepcopy(dense).eval() if kd else None
        loss = DecouplingLoss(decoupled, len(classes), **cfg["loss"], **(dict(teacher=teacher, **kd) if kd else {}))
        train(decoupled, (train_x, train_y), (test_x, test_y), epochs=cfg["decouple_epochs"],
              batch_size=cfg["batch_size"], lr=cfg["lr"] / 5, loss=loss, seed=seed, progress=True, **cfg["train"])
        acc_dec = evaluate(decoupled, test_x, test_y)["acc"]
        with torch.no_grad():
            ratio = count_flops(decoupled, test_x).ratio
        stats = gate_statistics(decoupled, train_x, train_y, test_x, test_y)
        print(f"      decoupled test accuracy {acc_dec:.1%} at {ratio:.2f} of the dense FLOPs")
        report.update(accuracy_dense=acc_dense, accuracy_decoupled=acc_dec, flops_ratio=ratio,
                      accuracy_drop_points=100 * (acc_dense - acc_dec), distillation=kd or None,
                      gates_never_changing=stats.get("constant_gates"), gate_statistics=stats)

    if timing:
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
        torch.manual_seed(seed + 2)
        sel = slice(None) if cfg["analysis_limit"] is None else slice(0, cfg["analysis_limit"])
        ana = analyze(decoupled, test_x[sel], test_y[sel], classes, os.path.join(out, "analysis"),
                      ref_images=train_x, ref_labels=train_y, progress=True)
        report.update(path_template_accuracy=ana.get("template_accuracy"), analysis=ana)
        print(f"      nearest-template accuracy from paths alone: {_fmt(ana.get('template_accuracy'), '.1%')} "
              f"(network {_fmt(ana.get('network_accuracy'), '.1%')})")

    with step("FGSM and PGD, detected from paths"):
        torch.manual_seed(seed + 3)
        sel = slice(None) if cfg["detect_limit"] is None else slice(0, cfg["detect_limit"])
        det = detect(decoupled, test_x[sel], test_y[sel], os.path.join(out, "detection"),
                     ref_images=train_x, ref_labels=train_y, progress=True, seed=seed)
        report.update(detection_auc_fgsm=det["headline"]["fgsm"]["learned_auc"],
                      detection_auc_pgd=det["headline"]["pgd"]["learned_auc"],
                      detection_auc_fgsm_unsupervised=det["headline"]["fgsm"]["unsupervised_auc"],
                      detection_auc_pgd_unsupervised=det["headline"]["pgd"]["unsupervised_auc"], detection=det)
        # Sampling error: the AUCs are measured on the held-out half's successful attacks
        # (positives) and its correctly classified clean images (negatives): often a few dozen.
        errs = {}
        for a in ("fgsm", "pgd"):
            learned = det["detectors"]["learned"].get(f"trained_on_{a}", {}).get(a, {})
            unsup = det["detectors"]["unsupervised"].get(a, {})
            errs[a] = auc_interval(report[f"detection_auc_{a}"], learned.get("n_adv", 0), learned.get("n_clean", 0))
            errs[f"{a}_unsupervised"] = auc_interval(report[f"detection_auc_{a}_unsupervised"], unsup.get("n_adv", 0),
                                                     unsup.get("n_clean", 0))
        report["detection_auc_error"] = errs
        print(f"      learned detector ROC-AUC: FGSM {_auc(errs['fgsm'])}, PGD {_auc(errs['pgd'])} "
              "(95% interval, Hanley-McNeil)")

    with step("write the report"):
        from ._backend import choose

        report["seconds_total"] = time.perf_counter() - t_start
        report["seconds_by_step"] = step.times
        # The backend a gated layer gets (half of its channels on), not the dense fallback.
        half = torch.arange(8).expand(2, 8) < 4
        report["machine"] = _machine(choose(torch.zeros(2, 8, 16, 16), torch.zeros(8, 8, 3, 3), half, half, 1))
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(jsonable(report), f, indent=2)
        with open(os.path.join(out, "report.md"), "w") as f:
            f.write(_markdown(report, cfg))
    print(f"\nwrote {out}/report.md and {out}/report.json in {report['seconds_total']:.0f} s")
    return report


def _auc(e: Dict[str, Any]) -> str:
    """``0.714 (0.61-0.82, n = 28 / 166)``: an AUC, its 95% interval and its counts (positives / negatives)."""
    if e.get("ci95") is None:
        return _fmt(e.get("auc"), ".3f")
    lo, hi = e["ci95"]
    return f"{e['auc']:.3f} ({lo:.2f}-{hi:.2f}, n = {e['n_pos']} / {e['n_neg']})"


def _drop(points: float, what: str = "dense") -> str:
    return f"{abs(points):.1f} points {'below' if points >= 0 else 'above'} {what}"


def _fmt(v, spec: str) -> str:
    """A figure, or 'n/a' where an analysis had nothing to measure (e.g. every gate constant)."""
    if v is None or (isinstance(v, float) and v != v):
        return "n/a"
    return format(v, spec)


def _markdown(r: Dict[str, Any], cfg: Dict[str, Any]) -> str:
    def pct(v):
        return "n/a" if v is None else f"{v:.1%}"

    timed = "speedup_batch1" in r
    err = r.get("detection_auc_error", {})
    kd = r.get("distillation")
    lines = [
        f"# pydecouple demo on {r['dataset']}",
        "",
        f"Machine: {r['machine']['cpu']}, {r['threads']} intra-op threads, torch {r['machine']['torch']}, "
        f"triton {r['machine']['triton']}, backend `{r['machine']['backend']}`. Seed {r['seed']}. "
        f"Total {r['seconds_total']:.0f} s.",
        "",
        f"Every figure but the timings is fixed by the seed and the thread count ({r['threads']}): a rerun on this "
        "machine gives the same accuracies, FLOPs, gate, template and AUC figures.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| accuracy, dense {cfg['arch']} | {pct(r['accuracy_dense'])} |",
        f"| accuracy, decoupled{' (distilled from the dense model, kd weight %g, T %g)' % (kd['kd_weight'], kd['kd_temperature']) if kd else ''} | "
        f"{pct(r['accuracy_decoupled'])} ({_drop(r['accuracy_drop_points'])}) |",
        f"| FLOPs, decoupled / dense | {r['flops_ratio']:.3f} |",
        f"| gates that never change over the training images | {pct(r.get('gates_never_changing'))} |",
    ]
    if timed:
        lines += [
            f"| accelerated vs dense twin, batch 1 (float32) | {r['speedup_batch1']:.2f}x |",
            f"| accelerated vs dense twin, batch {r['speed_batch']} (float32) | {r['speedup_batched']:.2f}x |",
            f"| kernel speedup at f = 0.5, median of {len(r['kernel_layers'])} realistic layers (float32) | "
            f"{r['kernel_speedup_f05']:.2f}x |",
        ]
    lines += [
        f"| nearest-template accuracy from paths alone | {_fmt(r['path_template_accuracy'], '.1%')} |",
        f"| detection ROC-AUC, FGSM, learned detector | {_auc(err.get('fgsm', {'auc': r['detection_auc_fgsm']}))} |",
        f"| detection ROC-AUC, PGD, learned detector | {_auc(err.get('pgd', {'auc': r['detection_auc_pgd']}))} |",
        f"| detection ROC-AUC, FGSM, unsupervised template score | "
        f"{_auc(err.get('fgsm_unsupervised', {'auc': r['detection_auc_fgsm_unsupervised']}))} |",
        f"| detection ROC-AUC, PGD, unsupervised template score | "
        f"{_auc(err.get('pgd_unsupervised', {'auc': r['detection_auc_pgd_unsupervised']}))} |",
        "",
        "AUCs: in brackets the 95% interval (Hanley & McNeil's standard error, normal approximation) and the counts "
        "they rest on: successful attacks / correctly classified clean images of the held-out half.",
        "",
        f"The decoupled network is {_drop(r['accuracy_drop_points'], 'the dense one')} at "
        f"{r['flops_ratio']:.0%} of its FLOPs."
        + (f" The accelerated model turns that into {r['speedup_batched']:.2f}x measured time at batch "
           f"{r['speed_batch']} (the demo's layers are small: the kernel figure below is on realistic shapes)."
           if timed else ""),
        "",
    ]
    if not timed:
        lines += ["(Timing steps left out.)", ""]
        return "\n".join(lines)
    lines += [
        "## Speed: what every figure is against",
        "",
        "- **Model speedups** (`accelerated vs dense twin`): the accelerated decoupled model "
        "(`pydecouple.accelerate`: BN folded, gated kernels), in its fastest form (NCHW, channels_last or traced; "
        "`best of` below), against the **dense twin**: the dense model it came from with BN folded the same way, "
        "float32, in its fastest form of the same three (`dense best` below; `baseline` names the one that won). "
        "Medians of interleaved repeats.",
        "- **Kernel speedups**: `pydecouple.gated_conv2d` (automatic dispatch, its faster layout) against dense "
        "`F.conv2d` + the out-mask in float32 on the same layer, the faster of NCHW and channels_last input "
        "(`dense layout`); `dense on cut problem`: dense conv on the channels kept, the bound a static cut reaches.",
        "- Timings vary run to run (a shared machine, load from other processes); every other figure does not.",
        "",
        "## Kernel on realistic layers (f_in = f_out = 0.5)",
        "",
        "| layer | batch | dense ms (layout) | gated ms | speedup | ideal | dense on cut problem |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in r["kernel_layers"]:
        lines.append(f"| {k['layer']} | {k['batch']} | {k['dense_ms']:.2f} ({k.get('dense_layout', 'nchw')}) | "
                     f"{k['gated_ms']:.2f} | {k['speedup']:.2f}x | {k['ideal']:.1f}x | {k['cut_limit']:.2f}x |")
    lines += ["", "## Model speed (float32)", "",
              "| provider | batch | latency ms | images/s | speedup vs dense twin | the twin's layout | best of |",
              "|---|---|---|---|---|---|---|"]
    for m in r["model_speed"]:
        lines.append(f"| {m['provider']} | {m['batch']} | {m['latency_ms']:.3f} | {m['images_per_s']:.0f} | "
                     f"{m['speedup']:.2f}x | {m.get('baseline', '')} | {m.get('best_of', '')} |")
    lines += ["", "## Paths and detection", "",
              "The path analysis is in [analysis/report.md](analysis/report.md) and the adversarial detection in "
              "[detection/report.md](detection/report.md), each with its pictures and one sentence per picture.", ""]
    return "\n".join(lines)
