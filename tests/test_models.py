"""The model zoo: every arch builds dense and decoupled, normalises first, takes [0, 1] pixels."""

import pytest
import torch

from pydecouple.models import ARCHS, Normalize, build
from pydecouple.nn import gate_modules

GATED = {"small_vgg": 5, "vgg16": 12, "vgg_cfg_e": 15, "resnet20": 18, "resnet56": 54, "resnet47_bottleneck": 45,
         "tiny_cnn": 2}


@pytest.mark.parametrize("arch", sorted(GATED))
def test_build_dense_and_decoupled(arch):
    cin, hw = (1, 8) if arch == "tiny_cnn" else (3, 32)
    dense = build(arch, num_classes=7, in_channels=cin)
    assert isinstance(next(iter(dense.children())), Normalize)
    dec = build(arch, num_classes=7, in_channels=cin, decoupled=True)
    assert len(gate_modules(dec)) == GATED[arch]
    x = torch.rand(2, cin, hw, hw)
    with torch.no_grad():
        assert dense.eval()(x).shape == (2, 7)
        assert dec.eval()(x).shape == (2, 7)


def test_archs_listed_and_unknown_rejected():
    assert set(GATED) <= set(ARCHS)
    with pytest.raises(ValueError, match="unknown arch"):
        build("alexnet")


def test_normalize():
    n = Normalize((0.5, 0.25), (0.5, 0.25))
    x = torch.rand(2, 2, 3, 3)
    torch.testing.assert_close(n(x)[:, 0], (x[:, 0] - 0.5) / 0.5)
    assert "mean" in n.state_dict()
    with pytest.raises(ValueError):
        Normalize((0.5,), (0.5, 0.5))
