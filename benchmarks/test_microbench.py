"""Microbenchmarks under pytest-benchmark: `pytest benchmarks/ --benchmark-only`.

Grouped by op, shape, batch and dtype, so pytest-benchmark prints the dense
baselines (NCHW and channels_last: a user takes the faster) and the gated op
side by side. These measure; they assert nothing about speed (correctness is
tests/'s job). `make test` does not collect this folder.
"""

import pytest
import torch
import torch.nn.functional as F

import pydecouple

SHAPES = [  # (Cin, Cout, H, kernel)
    (64, 64, 32, 3),
    (128, 128, 16, 3),
    (256, 256, 8, 3),
    (256, 256, 14, 3),
    (256, 256, 14, 1),
]


def _problem(cin, cout, h, k, batch, f, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cin, h, h, generator=g).to(dtype)
    w = (torch.randn(cout, cin, k, k, generator=g) / (cin * k * k) ** 0.5).to(dtype)
    b = torch.randn(cout, generator=g).to(dtype)
    om = torch.stack([torch.randperm(cout, generator=g) < round(cout * f) for _ in range(batch)])
    im = torch.stack([torch.randperm(cin, generator=g) < round(cin * f) for _ in range(batch)])
    return x, w, b, om, im


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1]}@{s[2]}x{s[2]}k{s[3]}")
@pytest.mark.parametrize("provider", ["dense nchw", "dense channels_last", "gated f=0.5", "gated f=0.5 channels_last",
                                      "gated f=0.25"])
def test_gated_conv2d(benchmark, provider, shape, batch, dtype):
    cin, cout, h, k = shape
    f = 0.25 if "0.25" in provider else 0.5
    x, w, b, om, im = _problem(cin, cout, h, k, batch, f, dtype)
    if "channels_last" in provider:
        x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    benchmark.group = f"gated_conv2d {cin}-{cout} {h}x{h} k{k} batch {batch} {str(dtype)[6:]}"
    with torch.no_grad():
        if provider.startswith("dense"):
            omf = om[:, :, None, None].to(dtype)
            benchmark(lambda: F.conv2d(x, w, b, padding=k // 2) * omf)
        else:
            benchmark(lambda: pydecouple.gated_conv2d(x, w, b, om, im, padding=k // 2))
