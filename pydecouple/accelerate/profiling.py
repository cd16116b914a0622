"""Where an accelerated model's forward spends its time, per layer.

The timers ride on :func:`~pydecouple.accelerate.modules.probing`: a probe on
each :class:`~pydecouple.accelerate.AccelConv` while :func:`profile` runs, none
after it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Dict, List

import torch
import torch.nn as nn

from .modules import AccelConv, accel_layers, probing

__all__ = ["LayerProfile", "ModelProfile", "profile"]


@dataclass
class LayerProfile:
    name: str
    gated: bool
    kept: float  # mean kept fraction f_in * f_out (1 for dense layers)
    gate_s: float  # per forward (0 where the layer ran as one fused call: its gate is inside conv_s)
    conv_s: float  # per forward (backend choice, kernel or dense conv, epilogue)


@dataclass
class ModelProfile:
    layers: List[LayerProfile] = field(default_factory=list)
    total_s: float = 0.0  # per forward, with the timers on
    batch: int = 0

    @property
    def gate_s(self) -> float:
        return sum(lay.gate_s for lay in self.layers)

    @property
    def conv_s(self) -> float:
        return sum(lay.conv_s for lay in self.layers)

    @property
    def other_s(self) -> float:
        """Everything outside the convs and gates: normalisation, pooling,
        residual adds and ReLUs, the head, Python between layers."""
        return max(self.total_s - self.gate_s - self.conv_s, 0.0)

    def rows(self) -> List[Dict[str, object]]:
        out = [dict(layer=lay.name, gated=lay.gated, kept=round(lay.kept, 3), gate_us=lay.gate_s * 1e6,
                    conv_us=lay.conv_s * 1e6, other_us=0.0) for lay in self.layers]
        out.append(dict(layer="(other)", gated=False, kept=1.0, gate_us=0.0, conv_us=0.0, other_us=self.other_s * 1e6))
        out.append(dict(layer="total", gated=False, kept=1.0, gate_us=self.gate_s * 1e6, conv_us=self.conv_s * 1e6,
                        other_us=self.other_s * 1e6))
        return out

    def table(self) -> str:
        lines = [f"{'layer':<24}{'gated':>6}{'kept':>7}{'gate us':>10}{'conv us':>10}{'other us':>10}"]
        for r in self.rows():
            lines.append(f"{r['layer']:<24}{'yes' if r['gated'] else '':>6}{r['kept']:>7.2f}{r['gate_us']:>10.1f}"
                         f"{r['conv_us']:>10.1f}{r['other_us']:>10.1f}")
        t = self.total_s or 1.0
        lines.append(f"shares of {self.total_s * 1e6:.0f} us: conv {100 * self.conv_s / t:.0f}%, "
                     f"gate {100 * self.gate_s / t:.0f}%, other {100 * self.other_s / t:.0f}%")
        return "\n".join(lines)


@torch.no_grad()
def profile(accel: nn.Module, x: torch.Tensor, repeats: int = 20, warmup: int = 3) -> ModelProfile:
    """Where an accelerated model's forward spends its time, per layer.

    Times each :class:`AccelConv`'s gate (GAP + ACM MLP + compare) and conv
    (kept-fraction count, backend choice, kernel or dense conv, fused epilogue)
    with the wall clock around each call, and the whole forward. Each figure is
    the median over ``repeats`` forwards (robust to a loaded machine); ``other``
    (pooling, residual adds, the head, Python between layers) is the median
    total minus the per-layer medians. Eager only (not under torch.compile); on
    CUDA the timers would need synchronisation, so this is a CPU tool.
    """
    for _ in range(warmup):
        accel(x)
    totals = []
    recs: List[Dict[int, list]] = []

    def record(layer: AccelConv, x, mask, in_mask, y, gate_s: float, conv_s: float) -> None:
        # Only the clock readings here; kept fractions are computed after the timed runs.
        recs[-1].setdefault(id(layer), []).append((gate_s, conv_s, mask, in_mask))

    with probing(accel, record):
        for _ in range(repeats):
            recs.append({})
            t0 = time.perf_counter()
            accel(x)
            totals.append(time.perf_counter() - t0)
    prof = ModelProfile(total_s=statistics.median(totals), batch=int(x.shape[0]))
    for name, m in accel_layers(accel):
        calls = [r[id(m)] for r in recs if id(m) in r]
        if not calls:
            continue
        gate_s = statistics.median(sum(c[0] for c in per) for per in calls)
        conv_s = statistics.median(sum(c[1] for c in per) for per in calls)
        kept = []
        for _, _, mask, in_mask in calls[-1]:
            if mask is None:
                kept.append(1.0)
                continue
            fin = in_mask.float().mean(dim=1) if in_mask is not None else 1.0
            kept.append(float((fin * mask.float().mean(dim=1)).mean()))
        prof.layers.append(LayerProfile(m.name or name, m.gate is not None, sum(kept) / len(kept), gate_s, conv_s))
    return prof
