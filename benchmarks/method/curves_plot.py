"""Test accuracy against fine-tuning epoch for decoupling runs (docs/method.md, "Full budget").

    python benchmarks/method/curves_plot.py runs/cifar/ws_anneal_rho0.63 runs/cifar/ws_anneal_rho0.63_e8 \
        --csv benchmarks/results/method_full/curves.csv --png benchmarks/results/method_full/curves.png \
        [--dense-acc 0.765]

Each run folder holds the ``metrics.jsonl`` that ``python -m pydecouple train`` writes (epoch 0 is
the record after the gate warm start). Run folders are not committed, so the per-epoch values
are copied to the CSV: the PNG can be redrawn from it with ``--from-csv``.
"""

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from _plotting import dense_reference_lines, finish_accuracy_figure  # noqa: E402

COLUMNS = ("run", "epoch", "lr", "test_acc", "flops_ratio", "constant_gates", "mi", "train_acc")


def read_run(folder):
    """One row per epoch of ``folder/metrics.jsonl``, restricted to COLUMNS."""
    path = Path(folder) / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: no such file (expected the metrics.jsonl of a train run)")
    rows = []
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        rows.append({"run": Path(folder).name, **{k: rec.get(k, "") for k in COLUMNS[1:]}})
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="*", help="run folders with a metrics.jsonl")
    p.add_argument("--csv", required=True, help="CSV written from the runs, or read with --from-csv")
    p.add_argument("--png", required=True)
    p.add_argument("--from-csv", action="store_true", help="redraw from --csv instead of run folders")
    p.add_argument("--dense-acc", type=float, default=None)
    a = p.parse_args()
    if a.from_csv:
        rows = list(csv.DictReader(open(a.csv)))
    else:
        if not a.runs:
            raise SystemExit("runs: give at least one run folder, or --from-csv")
        rows = [r for folder in a.runs for r in read_run(folder)]
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {a.csv}")
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for run in dict.fromkeys(r["run"] for r in rows):
        rs = [r for r in rows if r["run"] == run]
        xs = [int(r["epoch"]) for r in rs]
        ys = [100 * float(r["test_acc"]) for r in rs]
        flops = rs[-1]["flops_ratio"]  # empty for a dense run: it has no gates
        cost = f"{float(flops):.2f} FLOPs" if flops not in ("", None) else "dense, no gates"
        ax.plot(xs, ys, marker=".", label=f"{run}: {ys[-1]:.1f}% ({cost})")
    dense_reference_lines(ax, a.dense_acc)
    finish_accuracy_figure(fig, ax, "fine-tuning epoch (0: after the gate warm start; cosine lr over each run)",
                           "small_vgg, CIFAR-10 subset: decoupled fine-tuning, learning curves", a.png)

if __name__ == "__main__":
    main()
