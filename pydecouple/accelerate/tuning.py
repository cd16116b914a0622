"""The dense-or-kernel crossover of each gated layer, measured on this machine.

The fused layer (``pydecouple::accel_conv_cpu``) runs the GEMM kernel where
the kept fraction ``f_in * f_out`` of a call is at or below ``dense_above``,
else dense conv + mask. :func:`pydecouple._backend.gating_threshold` is a
rule fitted once, on one CPU (AMD Zen 4, AVX-512); crossovers move with the
instruction set, the core count and the cache sizes, so a rule fitted on one
machine sends layers the wrong way on another. :func:`tune` measures, for
each gated layer of an accelerated model, the two routes of the fused op on
the layer's own shapes at a few kept fractions and sets the layer's
``dense_above`` to the measured crossover. The figures are cached in a JSON
file per machine (CPU, instruction-set path, threads, torch and pydecouple
versions), so a second ``tune`` of the same shapes measures nothing.

What is timed, per layer and batch size: the fused op itself, with
``dense_above`` pinned to each route (so the epilogue, residual add and
layout are the model's), x random (its in-masked channels zero, as in the
model), and masks of exactly ``round(f * C)`` kept channels per sample at
random positions, produced by a gate whose parameters are built to give them
(:func:`_mask_gate`); the gate's means are passed in (``x_means``), since
both routes pay the gate alike. A layer chained to its producer's mask gets
``f_in = f_out = f`` (kept ``f**2``), others ``f_in = 1``.

Cache: ``$PYDECOUPLE_TUNING_CACHE`` if set, else
``$XDG_CACHE_HOME/pydecouple/crossovers.json`` (``~/.cache`` by default).
Written atomically (a temporary file, then a rename), merged with what
another process wrote meanwhile; a file that cannot be read is reported and
left as it is.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import logging
import math
import os
import platform
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .. import _backend
from .modules import AccelConv, AccelEntry, accel_layers, probing

__all__ = ["TuneReport", "TunedLayer", "cache_path", "machine_fingerprint", "measure_crossover", "tune"]

log = logging.getLogger(__name__)

CACHE_ENV = "PYDECOUPLE_TUNING_CACHE"
CACHE_VERSION = 1
# f_out (and f_in where the layer reads an in-mask) at which each route is timed.
FRACTIONS = (1.0, 0.8, 0.65, 0.5, 0.35, 0.2)


def cache_path() -> Path:
    """Where measured crossovers are kept (see the module docstring)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pydecouple" / "crossovers.json"


def _cpu_identity() -> str:
    """The CPU as /proc/cpuinfo names it, with family, model and stepping:
    the marketing name alone ('AMD EPYC') covers Zen 1 and Zen 4 alike."""
    fields: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    if not fields:
        return platform.processor() or platform.machine()
    return (f"{fields.get('vendor_id', '?')} {fields.get('model name', '?')} family {fields.get('cpu family', '?')} "
            f"model {fields.get('model', '?')} stepping {fields.get('stepping', '?')}")


@functools.lru_cache(maxsize=1)
def _extension_identity() -> str:
    """A digest of the compiled extension's file: a rebuilt kernel (a new
    commit, other compiler flags) makes earlier crossovers stale, and the
    package version does not change with every build."""
    try:
        from .. import _C

        with open(_C.__file__, "rb") as f:
            return hashlib.sha1(f.read()).hexdigest()[:12]
    except Exception:  # noqa: BLE001  (no extension: nothing is tuned anyway)
        return "none"


def machine_fingerprint() -> str:
    """What a crossover depends on besides the layer: the CPU, the kernel's
    instruction-set path in use, the thread count, torch, pydecouple and the
    build of its extension."""
    from .. import __version__, isa

    return (f"{_cpu_identity()} | path {isa.current_path()} | threads {torch.get_num_threads()} | "
            f"torch {torch.__version__} | pydecouple {__version__} | build {_extension_identity()}")


@dataclass(frozen=True)
class _Shape:
    """One gated layer's problem, as the fused op sees it."""

    batch: int
    channels: int
    height: int
    width: int
    dtype: torch.dtype
    channels_last: bool
    residual: bool  # the layer adds a residual block's shortcut in its epilogue
    layer: AccelConv = field(compare=False, hash=False, repr=False)

    def key(self) -> str:
        m = self.layer
        return (f"{str(self.dtype).replace('torch.', '')} {'nhwc' if self.channels_last else 'nchw'} "
                f"n{self.batch} c{self.channels} {self.height}x{self.width} -> o{m.out_channels} "
                f"k{m.kernel_size[0]}x{m.kernel_size[1]} s{m.stride[0]}x{m.stride[1]} p{','.join(map(str, m.pad4))} "
                f"d{m.dilation[0]}x{m.dilation[1]} relu{int(m.relu)} res{int(self.residual)} "
                f"in{int(m.uses_in_mask)}")


@dataclass
class TunedLayer:
    """One layer's crossover at one batch size."""

    name: str
    key: str
    batch: int
    dense_above: float
    rule: float  # what gating_threshold says for the same layer
    ratios: Dict[float, float]  # kept fraction -> kernel time / dense time
    source: str  # "measured", "cache", or "shared" (the problem of a layer measured earlier in this call)


@dataclass
class TuneReport:
    """What :func:`tune` did: one row per (layer, batch)."""

    fingerprint: str
    cache: Optional[Path]
    layers: List[TunedLayer] = field(default_factory=list)

    @property
    def measured(self) -> int:
        return sum(t.source == "measured" for t in self.layers)

    def table(self) -> str:
        lines = [f"machine: {self.fingerprint}",
                 "| layer | batch | problem | measured crossover | rule | kernel/dense at kept 0.25 / 0.5 | source |",
                 "|---|---|---|---|---|---|---|"]
        for t in self.layers:
            lines.append(f"| {t.name} | {t.batch} | {t.key} | {t.dense_above:.2f} | {t.rule:.2f} | "
                         f"{_ratio_at(t.ratios, 0.25):.2f} / {_ratio_at(t.ratios, 0.5):.2f} | {t.source} |")
        return "\n".join(lines)


def _ratio_at(ratios: Dict[float, float], kept: float) -> float:
    """kernel/dense time at ``kept``, interpolated between measured points."""
    pts = sorted(ratios.items())
    if not pts:
        return float("nan")
    if kept <= pts[0][0]:
        return pts[0][1]
    for (k0, r0), (k1, r1) in zip(pts, pts[1:]):
        if k0 <= kept <= k1:
            return r0 + (r1 - r0) * (kept - k0) / (k1 - k0)
    return pts[-1][1]


def crossover(ratios: Dict[float, float]) -> float:
    """The largest kept fraction at which the kernel is not slower than dense
    (ratio kernel/dense <= 1), interpolated linearly between measured points.
    The kernel slower everywhere: 0 (dense unless nothing is kept); faster
    everywhere: the largest fraction measured (1.0: the kernel always)."""
    pts = sorted(ratios.items())
    if not pts or pts[0][1] > 1.0:
        return 0.0
    best = pts[0][0]
    for (k0, r0), (k1, r1) in zip(pts, pts[1:]):
        if r1 <= 1.0:
            best = k1
            continue
        if r0 <= 1.0 < r1:
            best = k0 + (k1 - k0) * (1.0 - r0) / (r1 - r0)
        break
    return float(best)


def _kept_rows(n: int, c: int, f: float, gen: torch.Generator) -> torch.Tensor:
    """Bool (n, c): round(c * f) (at least 1) on per row, at random positions."""
    k = max(1, min(c, round(c * f)))
    order = torch.rand(n, c, generator=gen).argsort(dim=1)
    return order < k


def _mask_gate(mask: torch.Tensor, channels: int) -> Tuple[torch.Tensor, ...]:
    """Gate parameters and channel means (w1, b1, w2, b2, z) for which the
    fused op's gate ``W2 relu(W1 z + b1) + b2 > 0`` gives exactly ``mask``
    (bool (N, O)), for an input of ``channels`` >= 2 channels.

    Sample n's means are a point on the unit circle at angle 2 pi n / N (the
    other channels 0); hidden unit j fires only for the sample at its own
    angle (relu(cos(angle difference) - cos(half a step)) > 0 there and 0 for
    every other sample); its output weights are +1 where that sample keeps a
    filter and -1 where not, so each logit is +-(its one unit's value)."""
    n, o = mask.shape
    theta = torch.arange(n, dtype=torch.float64) * (2 * math.pi / max(n, 1))
    pts = torch.stack([theta.cos(), theta.sin()], dim=1)  # (N, 2)
    half = math.cos(math.pi / max(n, 2))  # cos of half the step between neighbours (n = 1: cos(pi / 2) = 0)
    z = torch.zeros(n, channels, dtype=torch.float64)
    z[:, :2] = pts
    w1 = z.clone()  # (hidden = N, C): unit j looks at sample j's direction
    b1 = torch.full((n,), -half, dtype=torch.float64)
    w2 = mask.t().to(torch.float64) * 2 - 1  # (O, N)
    b2 = torch.zeros(o, dtype=torch.float64)
    return w1, b1, w2, b2, z


def measure_crossover(layer: AccelConv, shape: _Shape, fractions: Sequence[float] = FRACTIONS,
                      repeats: int = 5, seed: int = 0) -> Dict[float, float]:
    """kernel time / dense time of ``layer``'s fused op on ``shape``, per
    kept fraction (``f_in * f_out``), timed interleaved in this process."""
    from ..benchmarking import median_times

    if shape.channels < 2:
        raise ValueError(f"measure_crossover: layer {layer.name!r} reads {shape.channels} channel(s); the mask "
                         f"gate needs at least 2")
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = shape.batch, shape.channels, shape.height, shape.width
    fmt = torch.channels_last if shape.channels_last else torch.contiguous_format
    weight, bias = layer.weight.detach(), (layer.bias.detach() if layer.bias is not None else None)
    oh = (h + layer.pad4[0] + layer.pad4[1] - layer.dilation[0] * (layer.kernel_size[0] - 1) - 1) // layer.stride[0] + 1
    ow = (w + layer.pad4[2] + layer.pad4[3] - layer.dilation[1] * (layer.kernel_size[1] - 1) - 1) // layer.stride[1] + 1
    residual = (torch.randn(n, layer.out_channels, oh, ow, generator=gen).to(shape.dtype)
                .contiguous(memory_format=fmt) if shape.residual else None)
    cases = []
    for f in fractions:
        out_mask = _kept_rows(n, layer.out_channels, f, gen)
        in_mask = _kept_rows(n, c, f, gen) if layer.uses_in_mask else None
        x = torch.randn(n, c, h, w, generator=gen)
        if in_mask is not None:
            x = x * in_mask[:, :, None, None]  # the producer wrote zeros there
        x = x.to(shape.dtype).contiguous(memory_format=fmt)
        *gate, z = [t.float().contiguous() for t in _mask_gate(out_mask, c)]
        kept = float(out_mask.float().mean()) * (float(in_mask.float().mean()) if in_mask is not None else 1.0)
        args = (x, in_mask, weight, bias, tuple(gate), list(layer.stride), list(layer.pad4), list(layer.dilation),
                1, layer.relu, residual, residual is not None)
        cases.append((kept, args, z, out_mask))

    def call(args, z, dense_above):
        # Through the dispatcher's own entry, with the route pinned by the
        # threshold (-1: dense for every fraction, 2: the kernel for every one).
        out = _backend.run_gated_layer(*args, backend=_backend.AUTO, x_means=z, dense_above=dense_above)
        if out is None:
            raise RuntimeError("measure_crossover: the fused CPU layer cannot run here (extension not built?)")
        return out

    with torch.no_grad():
        for kept, args, z, out_mask in cases:  # the gate must give the intended mask, or the timing means nothing
            got = call(args, z, -1.0)[1]
            if not torch.equal(got, out_mask):
                raise RuntimeError(f"measure_crossover: the mask gate of layer {layer.name!r} gave another mask "
                                   f"({int((got != out_mask).sum())} of {out_mask.numel()} differ)")
        # The dense route costs the same at every kept fraction (conv, then one
        # masked pass): timed once, at the fraction closest to the crossovers.
        mid = cases[len(cases) // 2]
        fns = [lambda a=mid: call(a[1], a[2], -1.0)] + [lambda a=a: call(a[1], a[2], 2.0) for a in cases]
        times = median_times(fns, repeats=repeats, warmup=1, min_time=0.01)
    return {round(kept, 4): t / times[0] for (kept, _, _, _), t in zip(cases, times[1:])}


# ----------------------------------------------------------------------------- cache

def _read_cache(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {"version": CACHE_VERSION, "machines": {}}
    except (OSError, ValueError) as e:
        warnings.warn(f"pydecouple.tune: the crossover cache {path} could not be read ({type(e).__name__}: {e}); "
                      f"it is left as it is and nothing is cached this time", stacklevel=3)
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("machines"), dict):
        warnings.warn(f"pydecouple.tune: the crossover cache {path} is not version {CACHE_VERSION} of this format; "
                      f"it is left as it is and nothing is cached this time", stacklevel=3)
        return {}
    return data


def _write_cache(path: Path, fingerprint: str, entries: Dict[str, dict]) -> None:
    """Merge ``entries`` into the machine's section, re-reading the file first
    (another process may have written it), then replace it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _read_cache(path)
    if not data:
        return
    data["machines"].setdefault(fingerprint, {}).update(entries)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ----------------------------------------------------------------------------- tune

def _gated_shapes(accel: nn.Module, x: torch.Tensor) -> List[Tuple[AccelConv, Tuple[int, int, int], torch.dtype,
                                                                     bool, bool]]:
    """Each fused gated layer with the (channels, height, width), dtype and
    layout of its input in a forward of ``x`` (one sample is enough), and
    whether it adds a residual block's shortcut."""
    from .modules import AccelResidual

    ends_block = {id(m.convs[-1]) for m in accel.modules() if isinstance(m, AccelResidual)}
    seen: Dict[int, Tuple[AccelConv, Tuple[int, int, int], torch.dtype, bool, bool]] = {}

    def record(layer, xin, mask, in_mask, y, gate_s, conv_s):
        if layer.gate_params() is not None and layer.groups == 1 and id(layer) not in seen:
            cl = xin.dim() == 4 and xin.is_contiguous(memory_format=torch.channels_last) and not xin.is_contiguous()
            seen[id(layer)] = (layer, tuple(xin.shape[1:]), xin.dtype, cl, id(layer) in ends_block)

    with torch.no_grad(), probing(accel, record):
        accel(x[:1])
    return list(seen.values())


def tune(accel: nn.Module, x: torch.Tensor, batches: Optional[Iterable[int]] = None, *, cache: bool = True,
         repeats: int = 5, progress: bool = False) -> TuneReport:
    """Measure each gated layer's dense-or-kernel crossover on this machine
    (or read it from the cache) and set it on the layer.

    Args:
        accel: a model from :func:`~pydecouple.accelerate.accelerate`.
        x: an example input (its image size is the one tuned for; its
            values do not matter).
        batches: the batch sizes to measure at (default: ``x``'s). A call of
            another batch size uses the measured one nearest to it (in log
            scale); a call of another image size the rule.
        cache: read and write the cache file (:func:`cache_path`).
        repeats: timed repeats per route and fraction (medians).
        progress: a progress bar over the layers.

    Returns:
        A :class:`TuneReport` (``.table()`` for a markdown table). Layers
        with an input of one channel keep the rule.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] < 1:
        raise ValueError(f"tune: argument 'x' must be a batch (N, C, H, W) with N >= 1, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.is_cpu:
        raise ValueError(f"tune: the crossover is the CPU fused layer's; x is on {x.device}")
    batches = sorted({int(b) for b in (batches if batches is not None else [x.shape[0]])})
    if not batches or batches[0] < 1:
        raise ValueError(f"tune: argument 'batches' must hold positive batch sizes, got {batches}")
    if _backend._missing("accel_conv_cpu"):
        raise RuntimeError(f"tune: the fused CPU layer is not available: {_backend._missing('accel_conv_cpu')}")
    fingerprint = machine_fingerprint()
    path = cache_path() if cache else None
    cached = _read_cache(path).get("machines", {}).get(fingerprint, {}) if path is not None else {}
    report = TuneReport(fingerprint, path)
    names = {id(m): n for n, m in accel_layers(accel)}
    shapes = _gated_shapes(accel, x)
    new: Dict[str, dict] = {}
    from tqdm import tqdm

    todo = [(layer, chw, dt, cl, res, b) for layer, chw, dt, cl, res in shapes for b in batches]
    for layer, (c, h, w), dt, cl, res, b in tqdm(todo, desc="tune", disable=not progress, unit="layer"):
        if c < 2:
            continue
        shape = _Shape(b, c, h, w, dt, cl, res, layer)
        key = shape.key()
        entry, source = (new[key], "shared") if key in new else (cached.get(key), "cache")
        if entry is None or not isinstance(entry.get("ratios"), dict):
            ratios = measure_crossover(layer, shape, repeats=repeats)
            entry = {"ratios": {str(k): v for k, v in ratios.items()}, "dense_above": crossover(ratios),
                     "measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            new[key] = entry
            source = "measured"
        ratios = {float(k): float(v) for k, v in entry["ratios"].items()}
        dense_above = float(entry["dense_above"])
        layer.set_crossover(h, w, b, dense_above)
        kh, kw = layer.kernel_size
        rule = _backend.gating_threshold(b, h * w, c * kh * kw, layer.out_channels)
        report.layers.append(TunedLayer(names.get(id(layer), layer.name), key, b, dense_above, rule, ratios, source))
    if new and path is not None:
        _write_cache(path, fingerprint, new)
    for m in accel.modules():
        if isinstance(m, AccelEntry):
            m._traces = {}  # a trace holds the thresholds it was recorded with
    log.info("tune: %d layer problems, %d measured, %d from %s", len(report.layers), report.measured,
             len(report.layers) - report.measured, path)
    return report
