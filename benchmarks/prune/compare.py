"""Dynamic gating against static pruning at equal training budget (issue 14).

Trains (or loads) the arms of the comparison on one data set, then measures
each one's accuracy, FLOPs and CPU latency and writes one table (CSV +
markdown) and one PNG.

Arms (one run folder each under ``--runs``, ``<arm>_s<seed>``):

* ``dense``            the base: a dense model trained from scratch (every other arm starts from it)
* ``dense_ft``         the base trained on for the fine-tuning budget, no change: the equal-budget control
* ``prune@F``          the base statically pruned to F x its FLOPs (network slimming: global BN-gamma
                       ranking), then fine-tuned for the budget
* ``slim@F``           network slimming proper: ``sep`` epochs of L1 on the BN gammas (strength ``l1``),
                       then pruning to F, then the rest of the budget
* ``dec@R``            the base decoupled (gates, per-image paths) with target kept fraction R, fine-tuned
                       for the budget with the decoupling loss (docs/method.md's recipe)

Options after ``+`` (e.g. ``dec@0.63+kd=0.5/4+lr=0.05``): ``kd=W/T`` distillation from the
base (weight W, temperature T); ``lr=X``; ``ep=N`` (fine-tuning epochs); for ``prune``/``slim``:
``crit=l1``, ``scope=layer``, ``l1=S``, ``sep=N``; for ``dec``: ``lamk=X``, ``anneal=0|1``,
``ws=STEPS`` (gate warm start), ``hard=N`` (the last N epochs train with every gate hard, as at
inference, instead of half of them soft). ``dense_ft`` takes ``kd``, ``lr``, ``ep``.

Every arm but ``dense`` also reports ``test_acc_recal``: the accuracy after its BatchNorm
statistics are re-estimated on the training images under the eval-time function
(``pydecouple.prune.recalibrate_bn``: pruned channels, hard gates); a forward pass, no training.

Every fine-tuning arm gets the same number of epochs over the same images
(``ep``, default the data set's budget), so the comparison is at equal training.

Latency (``--time``, the default after training; ``--time-only`` skips training
and reads the saved checkpoints, so the table can be re-timed later on a quiet
machine): every model's inference form is ``pydecouple.accelerate(model)`` (BN
folded into the convs for all; the gated kernel for decoupled models), timed
at batch 1 and 32, float32 and bfloat16, NCHW and channels_last, all arms
interleaved in one process (medians of ``--repeats`` rounds); a model's
latency is its best layout. Seed 0 of each arm is timed; accuracy is the mean
over the seeds found.

Examples::

    # digits, 3 seeds, every default arm, then the table
    python benchmarks/prune/compare.py --data digits --seeds 0 1 2
    # CIFAR: train one arm (one thread, in the background), no timing
    python benchmarks/prune/compare.py --data cifar --arms dec@0.63 --no-time
    # re-time every saved CIFAR arm and rewrite the table and plot
    python benchmarks/prune/compare.py --data cifar --time-only --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

log = logging.getLogger("compare")

DATASETS: Dict[str, Dict[str, Any]] = {
    # docs/method.md's full-budget setting: small VGG, 10 dense epochs on the 20,000 images,
    # fine-tuning at lr 0.03 (the rate that made 24 epochs reach 78.0%), wd 1e-4, batch 128.
    "cifar": dict(data=str(ROOT.parent / "shared/data/cifar10/cifar10-subset.npz"), arch="small_vgg", in_channels=3,
                  upsample=1, base=dict(epochs=10, lr=0.05, batch_size=128, weight_decay=5e-4),
                  ft=dict(epochs=12, lr=0.03, batch_size=128, weight_decay=1e-4),
                  gate=dict(logit_norm=True, bias_init=2.0),
                  loss=dict(lam_k=1.0, lam_m=1.0, lam_s=0.5), dec_train=dict(gate_lr_mult=10.0, gate_noise_final=0.0),
                  arms=["dense", "dense_ft", "prune@0.32", "prune@0.47", "prune@0.67",
                        "dec@0.5", "dec@0.63", "dec@0.8"]),
    # The demo's setting (pydecouple/demo.py): digits upsampled to 16x16, small VGG, 10 dense
    # epochs at lr 0.05, 12 fine-tuning epochs at lr 0.01, batch 64.
    "digits": dict(data="digits", arch="small_vgg", in_channels=1, upsample=2,
                   base=dict(epochs=10, lr=0.05, batch_size=64, weight_decay=5e-4),
                   ft=dict(epochs=12, lr=0.01, batch_size=64, weight_decay=5e-4),
                   gate=dict(logit_norm=True, bias_init=2.0),
                   loss=dict(lam_k=1.0, lam_m=1.0, lam_s=0.5), dec_train=dict(gate_lr_mult=10.0),
                   arms=["dense", "dense_ft", "prune@0.3", "prune@0.47", "prune@0.65",
                         "dec@0.5", "dec@0.65", "dec@0.8"]),
}

ARM_RE = re.compile(r"^(dense|dense_ft|prune|slim|dec)(?:@([0-9.]+))?((?:\+[a-z0-9]+(?:=[^+]+)?)*)$")
OPTIONS = {"dense": set(), "dense_ft": {"kd", "lr", "ep"},
           "prune": {"kd", "lr", "ep", "crit", "scope"}, "slim": {"kd", "lr", "ep", "crit", "scope", "l1", "sep"},
           "dec": {"kd", "lr", "ep", "lamk", "anneal", "ws", "hard"}}


def parse_arm(arm: str) -> Tuple[str, Optional[float], Dict[str, str]]:
    """``"dec@0.63+kd=0.5/4"`` -> ``("dec", 0.63, {"kd": "0.5/4"})``; errors name the arm."""
    m = ARM_RE.match(arm)
    if not m:
        raise SystemExit(f"compare: arm {arm!r} is not KIND[@VALUE][+OPT[=V]]... with KIND in {sorted(OPTIONS)}")
    kind, value, rest = m.group(1), m.group(2), m.group(3)
    if kind in ("prune", "slim", "dec") and value is None:
        raise SystemExit(f"compare: arm {arm!r} needs a value: {kind}@F (FLOPs ratio) / dec@RHO")
    if kind in ("dense", "dense_ft") and value is not None:
        raise SystemExit(f"compare: arm {arm!r}: {kind} takes no @value")
    opts = {}
    for part in filter(None, rest.split("+")):
        k, _, v = part.partition("=")
        if k not in OPTIONS[kind]:
            raise SystemExit(f"compare: arm {arm!r}: option {k!r} is not one of {sorted(OPTIONS[kind])} for {kind}")
        opts[k] = v
    return kind, (float(value) if value is not None else None), opts


def run_dir(runs: Path, arm: str, seed: int) -> Path:
    return runs / (re.sub(r"[^A-Za-z0-9.]+", "_", arm.replace("@", "_").replace("/", "-")).strip("_") + f"_s{seed}")


# ----------------------------------------------------------------------------- data


def load_data(cfg: Dict[str, Any], data_path: Optional[str]):
    from pydecouple.data import load_dataset

    spec = data_path or cfg["data"]
    xtr, ytr, classes = load_dataset(spec, "train")
    xte, yte, _ = load_dataset(spec, "test")
    if cfg["upsample"] > 1:  # as the demo: bilinear, clamped back to [0, 1]
        up = lambda t: torch.nn.functional.interpolate(  # noqa: E731
            t, scale_factor=cfg["upsample"], mode="bilinear", align_corners=False).clamp_(0, 1)
        xtr, xte = up(xtr), up(xte)
    return (xtr, ytr), (xte, yte), classes


# ----------------------------------------------------------------------------- training the arms


def _macs(model, x) -> float:
    from pydecouple.flops import flops

    return flops(model, x[:2]).total


def _result_path(d: Path) -> Path:
    return d / "result.json"


def _base_meta(cfg, classes) -> Dict[str, Any]:
    return {"arch": cfg["arch"], "num_classes": len(classes), "in_channels": cfg["in_channels"], "decoupled": False,
            "decouple_kwargs": {}}


def recal_figures(model, train_data, test_data) -> Dict[str, Any]:
    """Test accuracy (and FLOPs) after BN recalibration on up to 10,000 training images."""
    from pydecouple.prune import recalibrate_bn
    from pydecouple.train import evaluate

    recal = recalibrate_bn(copy.deepcopy(model), train_data[0][:10000])
    evr = evaluate(recal, *test_data)
    return {"test_acc_recal": evr["acc"], "flops_ratio_recal": evr.get("flops_ratio")}


def train_arm(cfg: Dict[str, Any], arm: str, seed: int, runs: Path, train_data, test_data, classes,
              progress: bool) -> Dict[str, Any]:
    """Train one arm for one seed (resuming a partial run), evaluate it, write result.json."""
    from pydecouple import checkpoint as ckpt
    from pydecouple.losses import DecouplingLoss, DistillationLoss
    from pydecouple.models import build
    from pydecouple.nn import decouple
    from pydecouple.prune import keep_for_flops, parameter_count, prune, pruned_meta, slimming_l1
    from pydecouple.train import evaluate, train

    kind, value, opts = parse_arm(arm)
    out = run_dir(runs, arm, seed)
    if _result_path(out).is_file():
        log.info("%s seed %d: done (%s)", arm, seed, _result_path(out))
        return json.loads(_result_path(out).read_text())
    xte = test_data[0]
    t0 = time.time()
    torch.manual_seed(seed)
    base_meta = _base_meta(cfg, classes)
    ft = dict(cfg["ft"])
    if "lr" in opts:
        ft["lr"] = float(opts["lr"])
    if "ep" in opts:
        ft["epochs"] = int(opts["ep"])
    common = dict(batch_size=ft["batch_size"], weight_decay=ft["weight_decay"], seed=seed, progress=progress,
                  max_steps_per_epoch=ft.get("max_steps_per_epoch"))
    res: Dict[str, Any] = {"arm": arm, "kind": kind, "value": value, "options": opts, "seed": seed,
                           "dataset": cfg["name"], "run_dir": str(out)}

    if kind == "dense":
        model = build(cfg["arch"], len(classes), in_channels=cfg["in_channels"])
        hist = train(model, train_data, test_data, epochs=cfg["base"]["epochs"], lr=cfg["base"]["lr"],
                     batch_size=cfg["base"]["batch_size"], weight_decay=cfg["base"]["weight_decay"], seed=seed,
                     progress=progress, out_dir=str(out), meta=base_meta, resume=True,
                     max_steps_per_epoch=cfg["base"].get("max_steps_per_epoch"))
        res["train_epochs"] = cfg["base"]["epochs"]
    else:
        base_ckpt = run_dir(runs, "dense", seed) / "last.pt"
        if not base_ckpt.is_file():
            raise SystemExit(f"compare: {arm} seed {seed} needs the base {base_ckpt}: train arm 'dense' first")
        base, _ = ckpt.load_model(base_ckpt)
        teacher = None
        if "kd" in opts:
            w, _, temp = opts["kd"].partition("/")
            teacher = copy.deepcopy(base).eval()
            kd = dict(kd_weight=float(w), kd_temperature=float(temp or 4.0))
        model = copy.deepcopy(base).train()
        meta = dict(base_meta, init=str(base_ckpt))
        loss = None
        extra_train: Dict[str, Any] = {}
        epochs = ft["epochs"]
        if kind in ("prune", "slim"):
            crit, scope = opts.get("crit", "bn_gamma"), opts.get("scope", "global")
            # No layer below a tenth of its width: a global threshold on a net trained without
            # sparsity can empty the last layers (their gammas are small) and the model collapses.
            pk = dict(criterion=crit, scope=scope, min_fraction=0.1)
            if kind == "slim":
                sep, strength = int(opts.get("sep", 2)), float(opts.get("l1", 1e-3))
                handles = slimming_l1(model, strength)
                hs = train(model, train_data, test_data, epochs=sep, lr=ft["lr"], out_dir=str(out / "slimming"),
                           meta=meta, resume=True, **common)
                handles.remove()
                res["slimming_history"] = hs
                epochs -= sep
            keep = keep_for_flops(model, value, xte[:2], **pk)
            model = prune(model, keep, **pk)
            res["keep"], res["widths"] = keep, model.prune_plan.widths
            res["before_finetune_acc"] = evaluate(model, *test_data)["acc"]
            meta = pruned_meta(model, meta)
            if teacher is not None:
                loss = DistillationLoss(teacher, **kd)
        elif kind == "dense_ft":
            if teacher is not None:
                loss = DistillationLoss(teacher, **kd)
        elif kind == "dec":
            lam = dict(cfg["loss"])
            if "lamk" in opts:
                lam["lam_k"] = float(opts["lamk"])
            model = decouple(model, inplace=True, **cfg["gate"])
            meta.update(decoupled=True, decouple_kwargs=dict(cfg["gate"]))
            loss = DecouplingLoss(model, len(classes), rho=value, **lam,
                                  **(dict(teacher=teacher, **kd) if teacher is not None else {}))
            extra_train = dict(cfg["dec_train"])
            if "anneal" in opts:
                extra_train.pop("gate_noise_final", None)
                if opts["anneal"] not in ("0", "no"):
                    extra_train["gate_noise_final"] = 0.0
            if "ws" in opts:
                extra_train["gate_warm_start_steps"] = int(opts["ws"])
        if "hard" in opts:  # the same schedule, cut in two: the last N epochs with hard gates
            from pydecouple.nn import gate_modules

            train(model, train_data, test_data, epochs=epochs, lr=ft["lr"], loss=loss, out_dir=str(out), meta=meta,
                  resume=True, stop_after_epochs=epochs - int(opts["hard"]), **common, **extra_train)
            for _, g in gate_modules(model):
                g.hard_fraction = 1.0
        hist = train(model, train_data, test_data, epochs=epochs, lr=ft["lr"], loss=loss, out_dir=str(out),
                     meta=meta, resume=True, **common, **extra_train)
        res["train_epochs"] = ft["epochs"]
        res["lr"] = ft["lr"]
    model.eval()
    ev = evaluate(model, *test_data)
    # Training accuracy of the inference-time function (no augmentation, hard gates): with the
    # test accuracy it says whether an arm under-fits or over-fits.
    n_fit = min(5000, len(train_data[0]))
    res["train_acc_eval"] = evaluate(model, train_data[0][:n_fit], train_data[1][:n_fit])["acc"]
    dense_macs = _macs(build(cfg["arch"], len(classes), in_channels=cfg["in_channels"]), xte)
    res.update(test_acc=ev["acc"], params=parameter_count(model), train_seconds=round(time.time() - t0, 1),
               seconds_per_epoch=statistics.median([h["seconds"] for h in hist if "seconds" in h] or [0]),
               train_acc=hist[-1].get("train_acc") if hist else None, history=hist,
               checkpoint=str(out / "last.pt"))
    if kind != "dense":
        res.update(recal_figures(model, train_data, test_data))
    if kind == "dec":
        res["flops_ratio"] = ev["flops_ratio"]
        res["constant_gates"] = ev["constant_gates"]
        res["kept"] = ev["kept"]
    else:
        res["flops_ratio"] = _macs(model, xte) / dense_macs
    out.mkdir(parents=True, exist_ok=True)
    _result_path(out).write_text(json.dumps(res, indent=1))
    log.info("%s seed %d: test %.4f at %.3f FLOPs (%s)", arm, seed, res["test_acc"], res["flops_ratio"], out)
    return res


# ----------------------------------------------------------------------------- timing


def load_arm_model(res: Dict[str, Any]):
    from pydecouple import checkpoint as ckpt
    from pydecouple.prune import load_pruned

    path = res["checkpoint"]
    if res["kind"] in ("prune", "slim"):
        return load_pruned(path)[0]
    return ckpt.load_model(path)[0]


def time_arms(results: Dict[str, Dict[str, Any]], images: torch.Tensor, labels: torch.Tensor, batches=(1, 32),
              dtypes=("float32", "bfloat16"), repeats: int = 7, min_time: float = 0.2,
              acc_images: int = 2000) -> List[Dict[str, Any]]:
    """Latency of every arm (its seed-0 model through ``accelerate``) at each
    (dtype, batch), NCHW and channels_last, all interleaved in one process."""
    import pydecouple
    from pydecouple.benchmarking import median_times
    from tqdm.auto import tqdm

    models = {arm: load_arm_model(r).eval() for arm, r in results.items()}
    rows = []
    for dt_name in dtypes:
        dt = getattr(torch, dt_name)
        forms = {}
        for arm, model in models.items():
            for layout in ("nchw", "channels_last"):
                # accelerate's own dtype/layout conversion: weights rounded once from the folded float32
                # values, a gate's MLP kept float32 (a plain .to(bfloat16) of the accelerated model is refused)
                forms[(arm, layout)] = pydecouple.accelerate(
                    model, dtype=None if dt == torch.float32 else dt, channels_last=layout == "channels_last")
        fmt = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
        acc_at: Dict[Tuple[str, str], float] = {}
        n_acc = min(acc_images, len(images))
        for key, m in tqdm(forms.items(), desc=f"accuracy {dt_name}", leave=False):
            with torch.no_grad():
                correct = 0
                for i in range(0, n_acc, 250):
                    x = images[i:i + 250].to(dt).contiguous(memory_format=fmt[key[1]])
                    correct += int((m(x).argmax(1) == labels[i:i + 250]).sum())
            acc_at[key] = correct / n_acc
        for b in batches:
            fns, keys = [], []
            for key, m in forms.items():
                xs = [images[i:i + b].to(dt).contiguous(memory_format=fmt[key[1]])
                      for i in range(0, min(len(images), 8 * b), b)]
                state = {"i": 0}

                def run(m=m, xs=xs, state=state):
                    with torch.no_grad():
                        x = xs[state["i"] % len(xs)]
                        state["i"] += 1
                        return m(x)

                fns.append(run)
                keys.append(key)
            log.info("timing %s batch %d: %d models x layouts, %d interleaved rounds", dt_name, b, len(fns), repeats)
            ts = median_times(fns, repeats=repeats, min_time=min_time)
            for (arm, layout), t in zip(keys, ts):
                rows.append({"arm": arm, "dtype": dt_name, "batch": b, "layout": layout, "latency_ms": t * 1e3,
                             "accuracy_subset": acc_at[(arm, layout)], "accuracy_images": n_acc})
    return rows


# ----------------------------------------------------------------------------- table and plot


def _label(arm: str) -> str:
    return arm


def summarize(results_by_arm: Dict[str, List[Dict[str, Any]]], timing: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    best: Dict[Tuple[str, str, int], Dict[str, Any]] = {}
    for r in timing:
        k = (r["arm"], r["dtype"], r["batch"])
        if k not in best or r["latency_ms"] < best[k]["latency_ms"]:
            best[k] = r
    dense_key = next((a for a in results_by_arm if a == "dense"), None)
    rows = []
    for arm, rs in results_by_arm.items():
        accs = [r["test_acc"] for r in rs]
        r0 = min(rs, key=lambda r: r["seed"])
        row = {"arm": arm, "kind": r0["kind"], "seeds": len(rs),
               "acc_mean": statistics.mean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
               "acc_seeds": " ".join(f"{100 * a:.1f}" for a in accs),
               "flops_ratio": statistics.mean(r["flops_ratio"] for r in rs),
               "acc_recal_mean": (statistics.mean(r["test_acc_recal"] for r in rs)
                                  if all("test_acc_recal" in r for r in rs) else float("nan")),
               "params": r0["params"], "ft_epochs": r0.get("train_epochs"),
               "s_per_epoch": r0.get("seconds_per_epoch")}
        for dt in ("float32", "bfloat16"):
            for b in (1, 32):
                t = best.get((arm, dt, b))
                row[f"{dt}_b{b}_ms"] = t["latency_ms"] if t else float("nan")
                row[f"{dt}_b{b}_layout"] = t["layout"] if t else ""
                if t and dense_key and (dense_key, dt, b) in best:
                    row[f"{dt}_b{b}_speedup"] = best[(dense_key, dt, b)]["latency_ms"] / t["latency_ms"]
                else:
                    row[f"{dt}_b{b}_speedup"] = float("nan")
            t = best.get((arm, dt, 32))
            row[f"{dt}_acc_subset"] = t["accuracy_subset"] if t else float("nan")
        rows.append(row)
    return rows


def _pct(v: float) -> str:
    return "-" if v != v else f"{100 * v:.1f}"


def write_table(rows: List[Dict[str, Any]], out: Path, header: str) -> None:
    from pydecouple.benchmarking import write_csv

    write_csv(str(out.with_suffix(".csv")), rows)

    def lat(r, dt, b):
        v = r[f"{dt}_b{b}_ms"]
        if v != v:
            return "-"
        lay = "CL" if r[f"{dt}_b{b}_layout"] == "channels_last" else "NCHW"
        return f"{v:.2f} ({r[f'{dt}_b{b}_speedup']:.2f}x, {lay})"

    lines = [header, "",
             "| arm | seeds | test acc % (mean ± sd) | per seed | after BN recal | FLOPs | params | fp32 b1 ms | "
             "fp32 b32 ms | bf16 b1 ms | bf16 b32 ms | bf16 acc (subset) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {r['seeds']} | {100 * r['acc_mean']:.2f} ± {100 * r['acc_std']:.2f} | "
                     f"{r['acc_seeds']} | {_pct(r['acc_recal_mean'])} | {r['flops_ratio']:.3f} | {r['params'] / 1e6:.3f}M | "
                     f"{lat(r, 'float32', 1)} | {lat(r, 'float32', 32)} | {lat(r, 'bfloat16', 1)} | "
                     f"{lat(r, 'bfloat16', 32)} | {_pct(r['bfloat16_acc_subset'])} |")
    lines += ["", "Latency: median ms per batch, best of NCHW / channels_last (CL); in brackets the speedup over "
              "the `dense` base model (BN folded too) at the same dtype and batch."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.md')}")


def _short(arm: str) -> str:
    """The point label: the arm without its kind (the legend gives that): ``0.47``, ``0.65 kd0.5/4``."""
    kind, value, opts = parse_arm(arm)
    if kind in ("dense", "dense_ft"):
        return arm
    tail = " ".join(f"{k}{v}" for k, v in opts.items())
    return f"{value:g}" + (f" {tail}" if tail else "")


def plot(rows: List[Dict[str, Any]], png: Path, title: str, note: str = "") -> None:
    """Accuracy against FLOPs and against measured latency (fp32 / bf16, batch 1 / 32):
    five panels sharing the accuracy axis, the legend (and ``note``) in the sixth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("flops_ratio", "FLOPs / dense FLOPs"), ("float32_b1_ms", "latency ms, float32, batch 1"),
              ("float32_b32_ms", "latency ms, float32, batch 32"), ("bfloat16_b1_ms", "latency ms, bfloat16, batch 1"),
              ("bfloat16_b32_ms", "latency ms, bfloat16, batch 32")]
    style = {"dense": ("k", "*"), "dense_ft": ("dimgray", "P"), "prune": ("tab:blue", "s"), "slim": ("tab:cyan", "D"),
             "dec": ("tab:red", "o")}
    # label offsets (points) per series, so labels of arms at the same FLOPs do not overprint
    offset = {("prune", False): (4, 4), ("prune", True): (-34, -11), ("slim", False): (4, -11), ("slim", True): (4, -11),
              ("dec", False): (5, 2), ("dec", True): (5, -10), ("dense", False): (-30, 4), ("dense_ft", False): (-36, 4),
              ("dense_ft", True): (-36, -10)}
    fig, grid = plt.subplots(2, 3, figsize=(15, 9), sharey=True)
    axes = [grid[0, 0], grid[0, 1], grid[0, 2], grid[1, 1], grid[1, 2]]
    grid[1, 0].axis("off")
    dense = next((r for r in rows if r["arm"] == "dense"), None)
    for ax, (key, xl) in zip(axes, panels):
        if dense is not None:
            ax.axhline(100 * dense["acc_mean"], color="k", lw=0.8, ls=":", label="dense base accuracy")
        for kind in style:
            for kd in (False, True):
                # The grid and its distilled twins; the one-off tries (lr=, hard=, ...) stay in the table.
                rs = [r for r in rows if r["kind"] == kind and ("+kd" in r["arm"]) == kd and r[key] == r[key]
                      and set(parse_arm(r["arm"])[2]) <= {"kd", "ep"}]
                if not rs:
                    continue
                rs.sort(key=lambda r: r[key])
                c, mk = style[kind]
                # a line through one kind's widths; distilled tries are points (they differ in kd settings)
                ax.errorbar([r[key] for r in rs], [100 * r["acc_mean"] for r in rs],
                            yerr=[100 * r["acc_std"] for r in rs], color=c, marker=mk, ls="none" if kd else "-",
                            mfc="white" if kd else c, ms=7, capsize=3, label=kind + (" + KD" if kd else ""))
                for r in rs:
                    ax.annotate(_short(r["arm"]), (r[key], 100 * r["acc_mean"]), fontsize=6, color=c,
                                xytext=offset.get((kind, kd), (3, 3)), textcoords="offset points")
        ax.set_xlabel(xl)
        ax.grid(alpha=0.3)
    for ax in (grid[0, 0], grid[1, 1]):
        ax.set_ylabel("test accuracy (%)")
        ax.tick_params(labelleft=True)
    handles, labels = axes[0].get_legend_handles_labels()
    grid[1, 0].legend(handles, labels, loc="upper center", fontsize=9,
                      title="arms (error bars: sd over seeds)\nlabels: FLOPs target (prune) / rho (dec)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if note:  # after tight_layout, which would otherwise squeeze the panels to make room for it
        box = grid[1, 0].get_position()
        fig.text(box.x0, box.y0, note, ha="left", va="bottom", fontsize=7.5)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    print(f"wrote {png}")


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", choices=sorted(DATASETS), required=True)
    p.add_argument("--data-path", default=None, help="override the data set's file (CIFAR: the subset .npz)")
    p.add_argument("--arms", nargs="+", default=None, help="arms to train / report (default: the data set's grid)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--runs", default=None, help="run folders (default runs/prune/<data>)")
    p.add_argument("--out", default=None, help="table and plot prefix (default benchmarks/results/prune/<data>)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-time", action="store_true", help="train only")
    p.add_argument("--time-only", action="store_true", help="no training: re-time the saved checkpoints, rewrite the table")
    p.add_argument("--refresh-recal", action="store_true",
                   help="recompute every finished run's accuracy after BN recalibration (no training)")
    p.add_argument("--repeats", type=int, default=7, help="interleaved timing rounds")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds per timed sample")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--progress", action="store_true", help="tqdm bars during training")
    p.add_argument("--quick", type=int, default=None, metavar="STEPS",
                   help="smoke test: 1 base and 2 fine-tuning epochs of STEPS steps each (use with --runs/--out elsewhere)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    cfg = copy.deepcopy(dict(DATASETS[args.data], name=args.data))
    if args.quick:
        cfg["base"].update(epochs=1, max_steps_per_epoch=args.quick)
        cfg["ft"].update(epochs=2, max_steps_per_epoch=args.quick)
    runs = Path(args.runs or ROOT / "runs/prune" / args.data)
    out = Path(args.out or ROOT / "benchmarks/results/prune" / args.data)
    arms = args.arms or cfg["arms"]
    for a in arms:
        parse_arm(a)
    train_data, test_data, classes = load_data(cfg, args.data_path)
    results: Dict[str, List[Dict[str, Any]]] = {}
    if not args.time_only:
        ordered = sorted(arms, key=lambda a: a != "dense")  # the base first: every other arm starts from it
        for seed in args.seeds:
            for arm in ordered:
                results.setdefault(arm, []).append(
                    train_arm(cfg, arm, seed, runs, train_data, test_data, classes, args.progress))
    else:  # every finished run of these arms on disk, any seed
        for arm in arms:
            for seed in range(100):
                f = _result_path(run_dir(runs, arm, seed))
                if f.is_file():
                    results.setdefault(arm, []).append(json.loads(f.read_text()))
        missing = [a for a in arms if a not in results]
        if missing:
            log.warning("no finished run for %s under %s: left out", missing, runs)
    if args.refresh_recal:  # recompute test_acc_recal of finished runs (after a fix to recalibrate_bn)
        for arm, rs in results.items():
            for r in rs:
                if r["kind"] == "dense":
                    continue
                r.update(recal_figures(load_arm_model(r), train_data, test_data))
                _result_path(Path(r["run_dir"])).write_text(json.dumps(r, indent=1))
                log.info("%s seed %d: after BN recalibration %.4f", arm, r["seed"], r["test_acc_recal"])
    if args.no_time:
        return 0
    if "dense" not in results:
        raise SystemExit("compare: the table's speedups are against the 'dense' arm: include it")
    from pydecouple.benchmarking import machine_description

    seed0 = {arm: min(rs, key=lambda r: r["seed"]) for arm, rs in results.items()}
    timing = time_arms(seed0, test_data[0], test_data[1], dtypes=args.dtypes, repeats=args.repeats,
                       min_time=args.min_time)
    rows = summarize(results, timing)
    desc = machine_description()
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}_timing.json").write_text(json.dumps({"machine": desc, "timing": timing}, indent=1))
    header = (f"# {args.data}: dense, statically pruned and decoupled at equal training budget\n\n"
              f"Machine: {desc['cpu']}, {desc['threads']} threads, torch {desc['torch']}, {desc['date']}. "
              f"Fine-tuning budget: {cfg['ft']['epochs']} epochs at lr {cfg['ft']['lr']} unless the arm says "
              f"`ep=`/`lr=`; base: {cfg['base']['epochs']} dense epochs.")
    seeds = sorted({r["seeds"] for r in rows})
    eps = sorted({r["ft_epochs"] for r in rows if r["kind"] != "dense" and r["ft_epochs"]})
    note = (f"accuracy: mean of {'/'.join(map(str, seeds))} seed(s) per arm;\nfine-tuning "
            f"{'/'.join(map(str, eps))} epoch(s) for every arm after {cfg['base']['epochs']} dense ones.\n"
            f"latency: seed 0's model through pydecouple.accelerate,\nmedian of {args.repeats} interleaved rounds, "
            f"best of NCHW / channels_last,\n{desc['threads']} thread(s) on a shared machine ({desc['date']}).")
    write_table(rows, out, header)
    plot(rows, out.with_suffix(".png"), f"{args.data}: accuracy against FLOPs and measured CPU latency "
         f"({desc['threads']} thread(s), {desc['cpu'][:40]}); open markers: distilled from the dense base", note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
