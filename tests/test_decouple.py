"""decouple(): weights kept, dense equivalence with gates forced on, what stays dense."""

import pytest
import torch
import torch.nn as nn

from pydecouple.models import build
from pydecouple.nn import GatedConv2d, decouple, gate_modules, set_gates_open


class TVBottleneck(nn.Module):
    """torchvision's Bottleneck, reproduced (torchvision is not a dependency)."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class TVStyleNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        ds = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        self.layer1 = nn.Sequential(TVBottleneck(16, 8, 2, ds), TVBottleneck(32, 8))
        self.head = nn.Conv2d(32, 10, 1)  # conv without BN: gate applied by the conv itself
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.pool(self.head(x)).flatten(1)


def _randomize_bn(model):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)


@pytest.mark.parametrize("arch", ["small_vgg", "resnet20", "tiny_cnn"])
def test_zoo_state_dict_loads_and_forced_open_equals_dense(arch):
    cin, hw = (1, 8) if arch == "tiny_cnn" else (3, 32)
    dense = build(arch, in_channels=cin)
    _randomize_bn(dense)
    dense.eval()
    dec = decouple(dense)
    assert dec is not dense
    fresh = build(arch, in_channels=cin, decoupled=True)
    res = fresh.load_state_dict(dense.state_dict(), strict=False)
    assert not res.unexpected_keys and all(".gate." in k for k in res.missing_keys)
    x = torch.rand(3, cin, hw, hw)
    set_gates_open(dec, True)
    torch.testing.assert_close(dec.eval()(x), dense(x), rtol=1e-4, atol=1e-5)
    set_gates_open(dec, False)
    torch.testing.assert_close(dec(x), dense(x), rtol=1e-4, atol=1e-5)  # "open" init: every gate on


def test_torchvision_style_model():
    net = TVStyleNet()
    _randomize_bn(net)
    net.eval()
    dec = decouple(net)
    s = dec.decouple_summary
    assert "conv1" in dict(s.dense) and "layer1.0.downsample.0" in dict(s.dense)
    assert "layer1.0.conv1" in s.gated and "head" in s.gated and "layer1.1.conv3" in s.gated
    assert dec.layer1[0].conv2.in_mask_source is dec.layer1[0].conv1
    assert dec.head.apply_gate
    x = torch.rand(2, 3, 16, 16)
    set_gates_open(dec, True)
    torch.testing.assert_close(dec.eval()(x), net(x), rtol=1e-4, atol=1e-5)
    dec2 = decouple(net, gate_downsample=True, exclude=["head"])
    assert isinstance(dec2.layer1[0].downsample[0], GatedConv2d) and not isinstance(dec2.head, GatedConv2d)
    assert dict(dec2.decouple_summary.dense)["head"] == "excluded"


def test_first_conv_dense_and_summary():
    dec = build("small_vgg", decoupled=True)
    s = dec.decouple_summary
    assert s.dense == [("features.0", "first conv of the network (never gated, as in the paper)")]
    assert len(s.gated) == 5 and s.params_added > 0 and "5 conv layers gated" in str(s)
    assert len(gate_modules(dec)) == 5
    assert not isinstance(dec.features[0], GatedConv2d)


def test_decouple_twice_and_no_conv_fail():
    dec = build("tiny_cnn", in_channels=1, decoupled=True)
    with pytest.raises(ValueError, match="already"):
        decouple(dec)
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        decouple(nn.Linear(3, 3))


def test_inplace_shares_weights():
    dense = build("tiny_cnn", in_channels=1)
    w = dense.features[3].weight
    dec = decouple(dense, inplace=True)
    assert dec is dense and dec.features[3].weight is w
