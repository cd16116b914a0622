"""How far a bfloat16 accelerated model agrees with its float32 decoupled model,
and why not further.

For each checkpoint, on its test images (digits upsampled 2x for 1-channel
models, the CIFAR-10 subset for 3-channel ones), the number of predictions
that differ from the float32 decoupled model's:

- ``bf16 accelerated``: ``accelerate(model, dtype=torch.bfloat16)``;
- ``bf16 dense twin`` (against the float32 dense twin): the same rounding
  without gates;
- ``fp32, bf16 weights``: the float32 decoupled model with its conv weights
  rounded to bfloat16 (before BN folding) and float32 arithmetic: the share
  of the weights' rounding alone;
- ``fp32 weights x (1 + u)``: the float32 decoupled model with every conv
  weight multiplied by ``1 + u``, ``u`` uniform in +-2^-8 (bfloat16's unit
  roundoff), median of three draws: how sensitive the model itself is to a
  random perturbation of that size.

and the fraction of gate decisions that flip between the float32 and the
bfloat16 accelerated model (all gated layers together).

If the perturbed float32 model disagrees about as often as the bfloat16 one,
the disagreement is the model's (hard gates: a logit near 0 flips under any
rounding, and the flip cascades through later gates), not the kernels'.

Usage::

    python benchmarks/bf16_agreement.py runs/prune/digits/*/last.pt [--name bf16_agreement]

Writes ``benchmarks/results/<name>.csv`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import RESULTS, dense_twin_of, load_images  # noqa: E402

from pydecouple.accelerate import accelerate  # noqa: E402
from pydecouple.accelerate.modules import probing  # noqa: E402
from pydecouple.benchmarking import machine_description, machine_header, markdown_table, write_csv  # noqa: E402
from pydecouple.checkpoint import load_model  # noqa: E402


def gate_masks(accel: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """Every gated layer's mask for ``x``, in forward order (through the
    accelerated model's own observer hook, :func:`pydecouple.accelerate.modules.probing`)."""
    masks: List[torch.Tensor] = []

    def record(layer, x_in, mask, in_mask, y, gate_s, conv_s):
        if mask is not None and layer.gate is not None:
            masks.append(mask.clone())

    with probing(accel, record):
        accel(x)
    return masks


@torch.no_grad()
def measure(path: str, trials: int = 3, seed: int = 0) -> Dict[str, object]:
    dec, meta = load_model(path)
    dec.eval()
    cin = int(meta.get("in_channels", 3))
    x, _, desc = load_images(cin, 10000, 2 if cin == 1 else 1)
    ref = dec(x).argmax(1)
    acc16 = accelerate(dec, dtype=torch.bfloat16)
    differ16 = int((acc16(x).argmax(1) != ref).sum())
    dense = dense_twin_of(dec, meta)
    dense_differ = int((accelerate(dense, dtype=torch.bfloat16)(x).argmax(1) != dense(x).argmax(1)).sum())
    gen = torch.Generator().manual_seed(seed)
    perturbed = []
    for _ in range(trials):
        m = copy.deepcopy(dec)
        for mod in m.modules():
            if isinstance(mod, nn.Conv2d):
                u = (torch.rand(mod.weight.shape, generator=gen) * 2 - 1) * 2.0 ** -8
                mod.weight.mul_(1 + u)
        perturbed.append(int((m(x).argmax(1) != ref).sum()))
    rounded = copy.deepcopy(dec)
    for mod in rounded.modules():
        if isinstance(mod, nn.Conv2d):
            mod.weight.copy_(mod.weight.to(torch.bfloat16).float())
    rounded_differ = int((rounded(x).argmax(1) != ref).sum())
    m32, m16 = gate_masks(accelerate(dec), x), gate_masks(acc16.inner, x.to(torch.bfloat16))
    flips = sum(int((a != b).sum()) for a, b in zip(m32, m16))
    gates = sum(a.numel() for a in m32)
    n = len(x)
    return {"checkpoint": path, "images": n, "data": desc, "bf16_differ": differ16,
            "bf16_agreement": 1 - differ16 / n, "dense_bf16_differ": dense_differ,
            "fp32_bf16_weights_differ": rounded_differ,
            "fp32_perturbed_differ": sorted(perturbed)[len(perturbed) // 2],
            "fp32_perturbed_agreement": 1 - sorted(perturbed)[len(perturbed) // 2] / n,
            "gate_flips": flips / gates if gates else 0.0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", help="decoupled checkpoints (pydecouple train)")
    p.add_argument("--name", default="bf16_agreement", help="results file stem")
    p.add_argument("--out", default=str(RESULTS), help="results directory")
    args = p.parse_args(argv)
    missing = [c for c in args.checkpoints if not Path(c).is_file()]
    if missing:
        p.error(f"argument checkpoints: no such file: {', '.join(missing)}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for c in args.checkpoints:
        rows.append(measure(c))
        r = rows[-1]
        print(f"{c}: bf16 differ {r['bf16_differ']}/{r['images']}, dense bf16 {r['dense_bf16_differ']}, "
              f"fp32 bf16 weights {r['fp32_bf16_weights_differ']}, fp32 perturbed {r['fp32_perturbed_differ']}, gate flips {r['gate_flips']:.2%}", flush=True)
    agree = sorted(r["bf16_agreement"] for r in rows)
    pert = sorted(r["fp32_perturbed_agreement"] for r in rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(str(out / f"{args.name}.csv"), rows)
    cols = ["checkpoint", "images", "bf16_differ", "bf16_agreement", "dense_bf16_differ", "fp32_bf16_weights_differ",
            "fp32_perturbed_differ",
            "fp32_perturbed_agreement", "gate_flips"]
    md = ["# bfloat16 accelerated vs float32 decoupled: prediction agreement", "",
          machine_header(machine_description()), "",
          f"- images: {rows[0]['data']}", f"- command: `python benchmarks/bf16_agreement.py {' '.join(sys.argv[1:])}`",
          "", f"{len(rows)} checkpoints: bf16 agreement median {agree[len(agree) // 2]:.4f} "
              f"(min {agree[0]:.4f}, max {agree[-1]:.4f}), {sum(a >= 0.99 for a in agree)} at >= 0.99; "
              f"float32 with weights x (1 + U(-2^-8, 2^-8)): median {pert[len(pert) // 2]:.4f} "
              f"(min {pert[0]:.4f}, max {pert[-1]:.4f}).", "",
          "Columns: predictions differing from the float32 decoupled model's (bf16 accelerated; the bf16 dense "
          "twin against the float32 dense twin; the float32 model with its conv weights rounded to bfloat16; the "
          "float32 model with conv weights x (1 + U(-2^-8, 2^-8)), median of 3 draws) and the fraction of gate decisions flipped between float32 and bfloat16.", "",
          markdown_table([{k: (f"{v:.4f}" if k.endswith(("agreement", "flips")) else v) for k, v in r.items()}
                          for r in rows], cols)]
    (out / f"{args.name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md[-1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
