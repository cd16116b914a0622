"""Accuracy against FLOPs ratio for decoupled small VGGs (docs/method.md).

    python benchmarks/method/tradeoff_plot.py benchmarks/results/method/tradeoff.csv \
        benchmarks/results/method/tradeoff.png [--dense-acc 0.75] [--dense-control-acc 0.8]

Reads the CSV written by gate_stats.py (columns label, test_acc, flops_ratio,
constant_gates, ...); rows whose label starts with "paper" are drawn apart.
"""

import argparse
import csv
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _plotting import dense_reference_lines, finish_accuracy_figure  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("csv")
    p.add_argument("png")
    p.add_argument("--dense-acc", type=float, default=None)
    p.add_argument("--dense-control-acc", type=float, default=None,
                   help="the dense model trained on with the longest fine-tune's schedule (full.sh dense_control)")
    p.add_argument("--title", default="small_vgg, CIFAR-10 subset: decoupled fine-tuning")
    a = p.parse_args()
    rows = list(csv.DictReader(open(a.csv)))
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    groups = {}
    for r in rows:
        if r["label"].startswith("paper"):
            key = "paper settings (static masks)"
        elif r["label"].startswith("ours_"):
            key = "ours: logit-normalised gates, rho sweep"
        elif r["label"].startswith("ws_"):
            st = json.loads(r["settings"])
            if st["epochs"] == 4 and st["lr"] == 0.01:
                key = "ours + warm start + noise anneal, 4 epochs: rho sweep"
            else:
                key = f"the same, {st['epochs']} fine-tuning epochs, lr {st['lr']:g}"
        else:
            key = "ablations"
        groups.setdefault(key, []).append(r)
    for (name, rs), mk in zip(sorted(groups.items()), ["^", "o", "s", "D", "v", "P"]):
        rs = sorted(rs, key=lambda r: float(r["flops_ratio"]))
        xs = [float(r["flops_ratio"]) for r in rs]
        ys = [100 * float(r["test_acc"]) for r in rs]
        # A line joins the runs of one schedule that differ only in rho; ablations and
        # the paper's settings stay points.
        is_sweep = "sweep" in name or (name.startswith("the same") and len(rs) > 1)
        if is_sweep and "sweep" not in name:
            name += ": rho " + " / ".join(f"{json.loads(r['settings'])['rho']:g}" for r in rs)
        ax.plot(xs, ys, marker=mk, label=name, ls="-" if is_sweep else "none")
        for i, (r, x, y) in enumerate(zip(rs, xs, ys)):
            if name == "ablations":
                # They sit on top of the run they ablate: one label line each, stacked on the left.
                ax.annotate(r["label"], (x, y), fontsize=6, textcoords="axes fraction", xytext=(0.3, 0.55 - 0.05 * i),
                            ha="right", va="center", arrowprops=dict(arrowstyle="-", lw=0.4, color="gray"))
                continue
            ax.annotate(f"{r['label']}\nconst {100 * float(r['constant_gates']):.0f}%", (x, y), fontsize=6,
                        textcoords="offset points", xytext=(4, -10))
    dense_reference_lines(ax, a.dense_acc)
    if a.dense_control_acc is not None:
        ax.axhline(100 * a.dense_control_acc, color="black", ls="-.", lw=1,
                   label=f"dense, trained on with the 24-epoch schedule {100 * a.dense_control_acc:.1f}%")
    ax.axvline(0.5, color="red", ls=":", lw=1, label="50% of dense FLOPs")
    finish_accuracy_figure(fig, ax, "FLOPs ratio (decoupled / dense, input and output skipping, gate overhead included)",
                           a.title, a.png)

if __name__ == "__main__":
    main()
