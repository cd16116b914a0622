"""Whether a decoupled checkpoint's paths depend on the input (docs/method.md).

    python benchmarks/method/gate_stats.py --ckpt runs/X/last.pt \
        --data ../shared/data/cifar10/cifar10-subset.npz [--train-images 20000] [--csv results.csv --label NAME]

Prints, and appends to --csv: test accuracy, FLOPs ratio (test set), fraction of
gates that never change over the training images, L_MI on hard gates against
chance (n_layers ln 10), and per-layer class predictability of the gate vector.
"""

import argparse
import csv
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from pydecouple import checkpoint as ckpt  # noqa: E402
from pydecouple.data import load_dataset  # noqa: E402
from pydecouple.losses import DecouplingLoss  # noqa: E402
from pydecouple.train import evaluate, gate_statistics  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--train-images", type=int, default=20000)
    p.add_argument("--test-images", type=int, default=10000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--csv", default=None)
    p.add_argument("--label", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    model, meta = ckpt.load_model(a.ckpt)
    blob = ckpt.load(a.ckpt)
    xtr, ytr, classes = load_dataset(a.data, "train")
    xte, yte, _ = load_dataset(a.data, "test")
    xtr, ytr, xte, yte = xtr[:a.train_images], ytr[:a.train_images], xte[:a.test_images], yte[:a.test_images]
    ev = evaluate(model, xte, yte)
    res = {"label": a.label or a.ckpt, "ckpt": a.ckpt, "test_acc": ev["acc"], "test_images": len(xte)}
    if meta.get("decoupled"):
        lossd = meta.get("loss") or {}
        loss = DecouplingLoss(model, len(classes))
        if blob["extra"].get("loss") is not None:
            loss.load_state_dict(blob["extra"]["loss"])
        st = gate_statistics(model, xtr, ytr, xte, yte, loss=loss)
        res.update({"flops_ratio": ev["flops_ratio"], "kept": ev["kept"], "train_images": len(xtr)})
        res.update(st)
        res["settings"] = {k: meta.get("train_args", {}).get(k) for k in (
            "lam_k", "lam_m", "lam_s", "rho", "normalize_sparsity", "gate_lr_mult", "gate_init", "gate_noise",
            "gate_bias_init", "gate_logit_norm", "epochs", "lr", "sparsity_warmup", "train_subset")}
    res["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(res, indent=1))
    if a.csv:
        new = not os.path.exists(a.csv)
        with open(a.csv, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["label", "test_acc", "flops_ratio", "constant_gates", "mi", "mi_chance",
                            "predictability_per_layer", "predictability_all_layers", "kept_per_layer", "settings"])
            w.writerow([res["label"], f"{res['test_acc']:.4f}", f"{res.get('flops_ratio', 1.0):.4f}",
                        f"{res.get('constant_gates', float('nan')):.4f}", f"{res.get('mi', float('nan')):.3f}",
                        f"{res.get('mi_chance', float('nan')):.3f}",
                        " ".join(f"{v:.3f}" for v in res.get("predictability", [])),
                        f"{res.get('predictability_all_layers', float('nan')):.3f}",
                        " ".join(f"{v:.3f}" for v in res.get("kept", [])), json.dumps(res.get("settings", {}))])
    return 0


if __name__ == "__main__":
    sys.exit(main())
