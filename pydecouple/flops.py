"""FLOPs accounting for dense and decoupled models.

A conv's cost per sample is ``kept_in/groups x kept_out x kernel area x output
pixels`` multiply-adds (MACs, the convention of the paper's FLOPs); a dense conv
keeps everything. ``kept_in`` counts the input channels the op is told to skip
(the in-mask chained from the upstream gated layer), ``kept_out`` the sample's
gate. Linear layers count ``in x out`` and are never gated. ``ratio`` is the
gated total over the dense total, averaged over the batch.

An accelerated model (:func:`pydecouple.accelerate`) is counted the same way:
its folded convs report, through a probe, the masks they ran with (under the
names of the decoupled model's convs), and each gate's MLP counts as ``gate``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from .nn.modules import GatedConv2d

__all__ = ["flops", "FlopsCounter", "FlopsReport", "LayerFlops"]


@dataclass
class LayerFlops:
    name: str
    kind: str  # "conv", "gated_conv", "linear", "gate" (an ACM's layers: overhead absent from the dense model)
    dense: float  # MACs per sample, dense
    gated: float  # MACs per sample, mean over the samples seen
    kept_in: float  # mean kept fraction of input channels
    kept_out: float  # mean kept fraction of output channels

    @property
    def ratio(self) -> float:
        return self.gated / self.dense if self.dense else 1.0  # "gate" layers: pure overhead, see .gated


@dataclass
class FlopsReport:
    layers: List[LayerFlops] = field(default_factory=list)
    samples: int = 0

    @property
    def dense(self) -> float:
        return sum(l.dense for l in self.layers)

    @property
    def total(self) -> float:
        return sum(l.gated for l in self.layers)

    @property
    def ratio(self) -> float:
        return self.total / self.dense if self.dense else 1.0

    def __getitem__(self, key: str):  # dict-style access
        return self.to_dict()[key]

    def to_dict(self) -> Dict:
        return {"total": self.total, "dense": self.dense, "ratio": self.ratio, "samples": self.samples,
                "layers": [dict(asdict(l), ratio=l.ratio) for l in self.layers]}

    def table(self) -> str:
        rows = [f"{'layer':<28}{'kind':<12}{'dense MMAC':>12}{'gated MMAC':>12}{'in':>7}{'out':>7}{'ratio':>7}"]
        for l in self.layers:
            rows.append(f"{l.name:<28}{l.kind:<12}{l.dense / 1e6:>12.2f}{l.gated / 1e6:>12.2f}"
                        f"{l.kept_in:>7.2f}{l.kept_out:>7.2f}{l.ratio:>7.2f}")
        rows.append(f"{'total':<40}{self.dense / 1e6:>12.2f}{self.total / 1e6:>12.2f}{'':>14}{self.ratio:>7.3f}")
        return "\n".join(rows)


class FlopsCounter:
    """Counts MACs over every forward of ``model`` while active (use as a context manager)::

        with FlopsCounter(model) as fc:
            for x in batches: model(x)
        fc.report().ratio
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._acc: Dict[str, list] = {}
        self._order: List[str] = []
        self._handles = []
        self.samples = 0

    def _add(self, name: str, kind: str, dense: float, gated, fin: torch.Tensor, fout: torch.Tensor, n: int) -> None:
        if name not in self._acc:
            self._acc[name] = [kind, float(dense), 0.0, 0.0, 0.0, 0]
            self._order.append(name)
        a = self._acc[name]
        a[2] += float(gated.sum()) if torch.is_tensor(gated) else gated * n
        a[3] += float(fin.sum())
        a[4] += float(fout.sum())
        a[5] += n

    def _conv(self, name: str, kind: str, cin: int, cout: int, kernel_size, groups: int, out: torch.Tensor,
              n: int, out_mask: Optional[torch.Tensor], in_mask: Optional[torch.Tensor]) -> None:
        k = kernel_size[0] * kernel_size[1] * out.shape[-2] * out.shape[-1]
        dense = cin // groups * cout * k
        fout = out_mask.float().mean(dim=1).cpu() if out_mask is not None else torch.ones(n)
        fin = in_mask.float().mean(dim=1).cpu() if in_mask is not None else torch.ones(n)
        self._add(name, kind, dense, dense * fin * fout, fin, fout, n)

    def _hook(self, name: str):
        def hook(mod, inputs, out):
            x = inputs[0]
            n = x.shape[0] if x.dim() > 1 else 1
            if isinstance(mod, nn.Conv2d):
                gated = isinstance(mod, GatedConv2d)
                self._conv(name, "gated_conv" if gated else "conv", mod.in_channels, mod.out_channels,
                           mod.kernel_size, mod.groups, out, n, mod.gate.last_mask if gated else None,
                           mod.last_in_mask if gated else None)
                return
            fin, fout = torch.ones(n), torch.ones(n)
            gated = mod.in_features * mod.out_features * fin
            if id(mod) in self._gate_linears:
                self._add(name, "gate", 0, gated, fin, fout, n)
            else:
                self._add(name, "linear", mod.in_features * mod.out_features, gated, fin, fout, n)
        return hook

    def _probe(self, layer, x, mask, in_mask, y, gate_s, conv_s) -> None:
        """An accelerated layer (pydecouple.accelerate.AccelConv) after it ran."""
        n = x.shape[0]
        if layer.gate is not None and layer.gate.macs():
            ones = torch.ones(n)
            self._add(f"{layer.name}.gate", "gate", 0, layer.gate.macs() * ones, ones, ones, n)
        self._conv(layer.name, "gated_conv" if layer.gate is not None else "conv", layer.in_channels,
                   layer.out_channels, layer.kernel_size, layer.groups, y, n, mask, in_mask)

    def __enter__(self) -> "FlopsCounter":
        from .accelerate import probing
        from .nn.gate import ArchitectureControl

        self._gate_linears = {id(l) for m in self.model.modules() if isinstance(m, ArchitectureControl)
                              for l in m.modules() if isinstance(l, nn.Linear)}
        for name, m in self.model.named_modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                self._handles.append(m.register_forward_hook(self._hook(name)))
        self._probing = probing(self.model, self._probe)
        self._probing.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._probing.__exit__(*exc)

    def report(self) -> FlopsReport:
        layers = []
        samples = 0
        for name in self._order:
            kind, dense, gated, fin, fout, n = self._acc[name]
            if n == 0:  # only empty batches went through
                layers.append(LayerFlops(name, kind, dense, dense, 1.0, 1.0))
                continue
            layers.append(LayerFlops(name, kind, dense, gated / n, fin / n, fout / n))
            samples = max(samples, n)
        return FlopsReport(layers, samples)


@torch.no_grad()
def flops(model: nn.Module, x: torch.Tensor, batch_size: Optional[int] = 256) -> FlopsReport:
    """Per-layer and total MACs of ``model`` on the batch ``x`` (eval mode, hard
    gates), and their ``ratio`` to the dense model. ``model``'s mode is restored.

    Returns a :class:`FlopsReport`: ``.layers`` (name, kind, dense, gated,
    kept_in, kept_out, ratio), ``.total``, ``.dense``, ``.ratio``, ``.to_dict()``,
    ``.table()``.
    """
    was = model.training
    model.eval()
    try:
        with FlopsCounter(model) as fc:
            bs = batch_size or len(x)
            for i in range(0, len(x), bs):
                model(x[i:i + bs])
        return fc.report()
    finally:
        model.train(was)
