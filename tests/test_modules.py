"""Gated modules: dense equivalence, mask placement, sparse op in eval, mask chaining."""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from pydecouple.models import build
from pydecouple.nn import (ArchitectureControl, GatedBasicBlock, GatedBatchNorm2d, GatedBottleneck, GatedConv2d,
                           GatedConvBNReLU, ConvBNReLU, gate_modules)


def _random_gates(model, p=0.5):
    """Gates that close about a fraction p of the filters, varying per sample."""
    for _, g in gate_modules(model):
        with torch.no_grad():
            g.fc2.weight.normal_(0, 1.0)
            g.fc2.bias.fill_(0.0)


def test_gated_conv_is_a_conv_with_same_keys():
    c = nn.Conv2d(6, 10, 3, padding=1)
    g = GatedConv2d.from_conv(c)
    assert isinstance(g, nn.Conv2d) and g.weight is c.weight and g.bias is c.bias
    assert set(c.state_dict()) < set(g.state_dict())
    assert all(k.startswith("gate.") for k in set(g.state_dict()) - set(c.state_dict()))


def test_gated_conv_eval_matches_formula():
    g = GatedConv2d(5, 7, 3, padding=1).eval()
    _random_gates(g)
    x = torch.randn(4, 5, 6, 6)
    out = g(x)
    m = g.gate.last_mask
    assert 0 < m.float().mean() < 1
    ref = F.conv2d(x, g.weight, g.bias, padding=1) * m[:, :, None, None]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_gated_conv_train_multiplies_by_gate():
    g = GatedConv2d(5, 7, 3, padding=1).train()
    x = torch.randn(4, 5, 6, 6)
    out = g(x)
    ref = F.conv2d(x, g.weight, g.bias, padding=1) * g.gate.last_gate[:, :, None, None]
    torch.testing.assert_close(out, ref)


def test_conv_bn_relu_block_masks_after_bn():
    blk = GatedConvBNReLU(4, 8).eval()
    _random_gates(blk[0])
    with torch.no_grad():
        blk[1].running_mean.uniform_(-1, 1)
        blk[1].bias.uniform_(0.5, 1)  # BN would turn zeroed channels positive without the mask
    x = torch.randn(3, 4, 5, 5)
    out = blk(x)
    m = blk.gate.last_mask
    dense = ConvBNReLU(4, 8).eval()
    dense.load_state_dict(blk.state_dict(), strict=False)
    ref = dense(x) * m[:, :, None, None]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert (out[~m] == 0).all()


def test_sparse_eval_equals_dense_masked_path_and_chains_masks():
    m = build("small_vgg", decoupled=True).eval()
    _random_gates(m)
    x = torch.rand(3, 3, 32, 32)
    out = m(x)
    convs = [mod for mod in m.modules() if isinstance(mod, GatedConv2d)]
    # every gated conv after the first reads its upstream mask
    assert convs[0].last_in_mask is None
    for prev, cur in zip(convs, convs[1:]):
        assert cur.in_mask_source is prev
        assert torch.equal(cur.last_in_mask, prev.gate.last_mask)
    masks = [c.gate.last_mask.clone() for c in convs]
    for c in convs:
        c.use_sparse_op = False
    ref = m(x)
    assert all(torch.equal(a, c.gate.last_mask) for a, c in zip(masks, convs))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_no_stale_mask_outside_root_forward():
    m = build("small_vgg", decoupled=True).eval()
    m(torch.rand(2, 3, 32, 32))
    conv = m.features[7]
    conv(torch.rand(2, 64, 16, 16))  # called alone: no mask chain active
    assert conv.last_in_mask is None


def test_deepcopy_keeps_its_own_chain():
    m = build("small_vgg", decoupled=True).eval()
    m2 = copy.deepcopy(m)
    m2(torch.rand(2, 3, 32, 32))
    assert m2.features[7].in_mask_source is m2.features[3]
    assert torch.equal(m2.features[7].last_in_mask, m2.features[3].gate.last_mask)
    assert m.features[7].last_in_mask is None


def test_gated_basic_block_places_masks():
    blk = GatedBasicBlock(8, 8).eval()
    _random_gates(blk)
    x = torch.randn(2, 8, 6, 6)
    out = blk(x)
    m1, m2 = blk.conv1.gate.last_mask, blk.conv2.gate.last_mask
    h = F.relu(blk.bn1.__class__.__mro__[1].forward(blk.bn1, F.conv2d(x, blk.conv1.weight, padding=1))) * m1[:, :, None, None]
    h = nn.BatchNorm2d.forward(blk.bn2, F.conv2d(h, blk.conv2.weight, padding=1)) * m2[:, :, None, None]
    torch.testing.assert_close(out, F.relu(h + x), rtol=1e-4, atol=1e-5)
    assert blk.gate is blk.conv2.gate
    assert isinstance(blk.bn1, GatedBatchNorm2d)


def test_gated_bottleneck_and_downsample_option():
    blk = GatedBottleneck(8, 4, stride=2, gate_downsample=True)
    assert isinstance(blk.downsample[0], GatedConv2d)
    assert blk.conv3.in_mask_source is blk.conv2 and blk.conv2.in_mask_source is blk.conv1
    out = blk.train()(torch.randn(2, 8, 6, 6))
    assert out.shape == (2, 16, 3, 3)
    assert len([g for g in blk.modules() if isinstance(g, ArchitectureControl)]) == 4
