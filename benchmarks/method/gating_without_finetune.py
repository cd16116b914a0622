"""How much accuracy a dense network keeps when its filters are gated per image
with no fine-tuning (docs/method.md, "Gate warm start").

    python benchmarks/method/gating_without_finetune.py --ckpt runs/cifar/dense/last.pt \
        --data ../shared/data/cifar10/cifar10-subset.npz --keep 0.6 [--warm-start-steps 200]

Rows, each at kept fraction --keep in every gated layer:

* ``random``: freshly initialised ACMs (logit norm), threshold set for --keep:
  input-dependent but uninformed gates, what fine-tuning starts from without
  a warm start.
* ``warm_start``: the same ACMs after :func:`pydecouple.warmstart.warm_start_gates`.
* ``oracle_*``: no ACM: each gated layer keeps, per image, the filters with the
  largest mean response of its own (masked-input) output: ``pre`` = mean of the
  BN output, ``post`` = mean after ReLU; ``static`` = the same filters for every
  image (largest BN gamma + beta). An upper bound on what a gate that sees only
  the layer's input can pick; ``_bn_recalibrated`` uses batch statistics in BN,
  what fine-tuning's BN update recovers.
"""

import argparse
import json
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from pydecouple import checkpoint as ckpt  # noqa: E402
from pydecouple.data import load_dataset  # noqa: E402
from pydecouple.nn import decouple  # noqa: E402
from pydecouple.nn.gate import gate_modules  # noqa: E402
from pydecouple.nn.modules import GatedBatchNorm2d  # noqa: E402
from pydecouple.train import evaluate  # noqa: E402
from pydecouple.warmstart import _probit, saliency_targets, warm_start_gates  # noqa: E402


class _OracleBN(nn.Module):
    """Wraps a GatedBatchNorm2d: keeps, per image, its top-``keep`` filters by ``score``."""

    def __init__(self, bn: GatedBatchNorm2d, keep: float, score: str) -> None:
        super().__init__()
        self.bn, self.keep, self.score = bn, keep, score

    def forward(self, x):
        out = nn.BatchNorm2d.forward(self.bn, x)
        if self.score == "pre":
            s = out.mean((2, 3))
        elif self.score == "post":
            s = out.clamp(min=0).mean((2, 3))
        else:  # static
            s = (self.bn.weight.detach() + self.bn.bias.detach())[None].expand(out.shape[0], -1)
        return out * saliency_targets(s, self.keep)[:, :, None, None]


def _oracle_accuracy(dense: nn.Module, x, y, keep: float, score: str, recalibrate: bool) -> float:
    model = decouple(dense).eval()
    for name, m in list(model.named_modules()):
        for cname, child in list(m.named_children()):
            if isinstance(child, GatedBatchNorm2d):
                setattr(m, cname, _OracleBN(child, keep, score))
    if recalibrate:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.train()
                m.track_running_stats = False
                m.running_mean = m.running_var = None
    with torch.no_grad():
        acc = sum(int((model(x[i:i + 500]).argmax(1) == y[i:i + 500]).sum()) for i in range(0, len(x), 500))
    return acc / len(x)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--keep", type=float, default=0.6)
    p.add_argument("--test-images", type=int, default=2000)
    p.add_argument("--warm-start-steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    xtr, _, _ = load_dataset(a.data, "train")
    xte, yte, _ = load_dataset(a.data, "test")
    xte, yte = xte[:a.test_images], yte[:a.test_images]
    dense, _ = ckpt.load_model(a.ckpt)
    dense.eval()
    res = {"ckpt": a.ckpt, "keep": a.keep, "test_images": len(xte), "dense": evaluate(dense, xte, yte)["acc"]}
    torch.manual_seed(0)
    model = decouple(dense, logit_norm=True, bias_init=2.0)
    model.train()
    for _, g in gate_modules(model):  # threshold for `keep`, logit-norm statistics from 10 batches
        g.norm.bias.data.fill_(_probit(a.keep))
        g.force_open = True
    with torch.no_grad():
        for i in range(10):
            model(xtr[i * 128:(i + 1) * 128])
    for _, g in gate_modules(model):
        g.force_open = False
    ev = evaluate(model, xte, yte)
    res["random"] = {"acc": ev["acc"], "flops_ratio": ev["flops_ratio"], "kept": ev["kept"]}
    warm_start_gates(model, xtr, a.keep, steps=a.warm_start_steps)
    ev = evaluate(model, xte, yte)
    res["warm_start"] = {"acc": ev["acc"], "flops_ratio": ev["flops_ratio"], "kept": ev["kept"]}
    for score in ("pre", "post", "static"):
        res[f"oracle_{score}"] = _oracle_accuracy(dense, xte, yte, a.keep, score, False)
    res["oracle_post_bn_recalibrated"] = _oracle_accuracy(dense, xte, yte, a.keep, "post", True)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
