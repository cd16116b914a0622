"""FLOPs accounting: dense = 1, kept inputs x kept outputs, groups, gate overhead."""

import pytest
import torch
import torch.nn as nn

from pydecouple.flops import flops
from pydecouple.models import build
from pydecouple.nn import GatedConv2d, gate_modules


def test_dense_model_ratio_one_and_conv_count():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, groups=4), nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
    r = flops(m, torch.rand(2, 3, 6, 6))
    assert r.ratio == pytest.approx(1.0)
    l0, l1, l2 = r.layers
    assert l0.dense == 3 * 8 * 9 * 36
    assert l1.dense == 2 * 8 * 9 * 16  # groups: Cin / groups per filter
    assert l2.dense == 128 * 10
    assert r.total == r.dense == l0.dense + l1.dense + l2.dense
    assert r["ratio"] == pytest.approx(1.0) and len(r.to_dict()["layers"]) == 3
    assert "total" in r.table()


def test_gated_counts_kept_in_times_kept_out():
    m = build("small_vgg", decoupled=True)
    with torch.no_grad():
        for _, g in gate_modules(m):
            g.fc2.weight.zero_()
            b = torch.full((g.out_channels,), -1.0)
            b[: g.out_channels // 2] = 1.0  # exactly half the filters on, for every sample
            g.fc2.bias.copy_(b)
    r = flops(m, torch.rand(4, 3, 32, 32))
    convs = {l.name: l for l in r.layers if l.kind in ("conv", "gated_conv")}
    assert convs["features.0"].ratio == 1.0
    assert convs["features.3"].kept_in == 1.0 and convs["features.3"].ratio == pytest.approx(0.5)
    for name in ("features.7", "features.10", "features.14", "features.17"):
        assert convs[name].kept_in == pytest.approx(0.5) and convs[name].ratio == pytest.approx(0.25)
    gate = [l for l in r.layers if l.kind == "gate"]
    assert gate and all(l.dense == 0 and l.gated > 0 for l in gate)
    conv_dense = sum(l.dense for l in convs.values())
    assert r.ratio < 0.35 and r.dense > conv_dense
    assert m.training  # mode restored


def test_per_sample_masks_average():
    g = GatedConv2d(4, 6, 1)
    with torch.no_grad():
        g.gate.fc2.weight.zero_()
        g.gate.fc2.bias.fill_(1.0)
    m = nn.Sequential(g)
    r1 = flops(m, torch.rand(3, 4, 2, 2))
    assert r1.layers[-1].ratio == 1.0
    with torch.no_grad():
        g.gate.fc2.bias.fill_(-1.0)
    assert flops(m, torch.rand(3, 4, 2, 2)).layers[-1].gated == 0
