"""Models users bring (issue 16): conv subclasses, pre-activation blocks,
user-written residual blocks, capture with torch.jit.trace / torch.export,
autocast, empty batches, FLOPs of an accelerated model, torch.jit.script.

Each test reproduces one case of the issue and checks the behaviour that
fixed it."""

import logging
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import pydecouple
from pydecouple.accelerate import accel_layers, accelerate
from pydecouple.models import build
from pydecouple.nn import GatedBatchNorm2d, GatedConv2d, decouple, gate_modules, set_gates_open
from test_accelerate import assert_logits_match, make_model, mix_gates, randomize_bn


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _masked_dense(model):
    """The decoupled model's eval function computed with dense convs (conv, then mask)."""
    for m in model.modules():
        if isinstance(m, GatedConv2d):
            m.use_sparse_op = False
    return model


# ----------------------------------------------------------------------------- case 1: conv subclasses


class WSConv2d(nn.Conv2d):
    """Weight-standardised conv: its own forward, a function decouple cannot see."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class InitConv2d(nn.Conv2d):
    """A subclass that changes only its initialisation: the function is nn.Conv2d's."""

    def reset_parameters(self):
        nn.init.orthogonal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def _ws_net(conv_cls):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         conv_cls(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def test_case1_conv_subclass_with_own_forward_is_refused_clearly():
    net = _ws_net(WSConv2d).eval()
    with pytest.raises(ValueError) as err:
        decouple(net)
    msg = str(err.value)
    assert "'3'" in msg and "WSConv2d" in msg and "forward" in msg and "exclude" in msg
    # nothing was modified on the way (inplace=True refuses before any change too)
    with pytest.raises(ValueError):
        decouple(net, inplace=True)
    assert type(net[3]) is WSConv2d and not any(isinstance(m, GatedConv2d) for m in net.modules())
    # the way out the message names: keep it dense; its forward is kept, so the function is the dense model's
    randomize_bn(net)
    dec = decouple(net, exclude=["3"], gate_first=True).eval()
    assert type(dec[3]) is WSConv2d and isinstance(dec[0], GatedConv2d)
    x = torch.rand(4, 3, 8, 8)
    set_gates_open(dec, True)
    torch.testing.assert_close(dec(x), net(x), rtol=1e-4, atol=1e-5)
    set_gates_open(dec, False)
    with torch.no_grad():
        assert_logits_match(accelerate(dec)(x), dec(x))


def test_case1_subclass_that_keeps_conv_forward_is_gated():
    net = _ws_net(InitConv2d).eval()
    randomize_bn(net)
    dec = decouple(net)
    assert isinstance(dec[3], GatedConv2d) and dec[3].weight is not None
    x = torch.rand(4, 3, 8, 8)
    set_gates_open(dec, True)
    torch.testing.assert_close(dec.eval()(x), net(x), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- case 2: pre-activation blocks


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016): BN-ReLU-conv, twice. bn1
    normalises the block's input, bn2 conv1's output; conv2's output is added
    unnormalised."""

    def __init__(self, cin, planes, stride=1, order="preact"):
        super().__init__()
        if order == "torchvision":  # the same function, registered in the conv1, bn1, conv2, bn2 order
            self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cin)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
        else:
            self.bn1 = nn.BatchNorm2d(cin)
            self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(planes)
            self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        sc = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + sc


class PreActNet(nn.Module):
    def __init__(self, order="preact"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.layer1 = nn.Sequential(PreActBlock(16, 16, order=order), PreActBlock(16, 32, 2, order=order))
        self.bn = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        out = self.layer1(self.conv1(x))
        out = F.relu(self.bn(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


@pytest.mark.parametrize("order", ["preact", "torchvision"])
def test_case2_preactivation_blocks(order):
    net = PreActNet(order).eval()
    randomize_bn(net)
    x = torch.rand(6, 3, 16, 16)
    dec = decouple(net).eval()
    b0, b1 = dec.layer1[0], dec.layer1[1]
    # each BN is paired with the conv whose output it normalises, found from the forward, not the names
    assert isinstance(b0.bn2, GatedBatchNorm2d) and b0.bn2.gated_conv is b0.conv1
    assert type(b0.bn1) is nn.BatchNorm2d and type(b1.bn1) is nn.BatchNorm2d
    assert b0.conv2.apply_gate and not b0.conv1.apply_gate  # no BN after conv2: it applies its own mask
    assert b0.conv2.in_mask_source is b0.conv1 and b1.conv1.in_mask_source is None
    # the dense function with gates open, the masked function otherwise
    set_gates_open(dec, True)
    torch.testing.assert_close(dec(x), net(x), rtol=1e-4, atol=1e-5)
    set_gates_open(dec, False)
    mix_gates(dec, torch.rand(12, 3, 16, 16))
    with torch.no_grad():
        out = dec(x)
        kept = torch.cat([g.last_mask.float().flatten() for _, g in gate_modules(dec)]).mean().item()
        assert 0.1 < kept < 0.9
        ref = _masked_dense(__import__("copy").deepcopy(dec))(x)
        assert_logits_match(out, ref)
        assert_logits_match(accelerate(dec)(x), ref)
        assert_logits_match(accelerate(net)(x), net(x))  # the dense model: only true conv-BN pairs folded


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)  # registered after conv1, but normalises conv0's output (pre-activation)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        out = self.conv0(x)
        if out.sum() > -1e30:  # always true, but only known from the data
            out = self.conv1(F.relu(self.bn1(out)))
        return self.fc(out.mean(dim=(2, 3)))


def test_case2_untraceable_model_says_what_it_cannot_convert():
    net = Untraceable().eval()
    with pytest.warns(UserWarning, match="could not trace"):
        dec = decouple(net)
    assert "could not trace" in str(dec.decouple_summary)
    # bn1 was paired with conv1 by registration order, and runs before it: a clear error, not a TypeError
    with pytest.raises(RuntimeError, match=r"bn1.*conv1.*has not run"):
        dec(torch.rand(2, 3, 8, 8))
    # excluding that conv is the way out; the summary says how
    assert "exclude" in str(dec.decouple_summary)
    # accelerate() on the dense model: nothing is folded on a guess, the function is kept
    randomize_bn(net)
    x = torch.rand(3, 3, 8, 8)
    accel = accelerate(net)
    assert "could not trace" in str(accel.accelerate_summary)
    with torch.no_grad():
        assert_logits_match(accel(x), net(x))


# ----------------------------------------------------------------------------- case 3: capture


def _model_with_a_gate_all_on_for(x_on):
    """A decoupled small VGG whose first gated layer keeps every filter on
    ``x_on`` (a constant image) and about half of them on random images."""
    model, _ = make_model("small_vgg", 3, 32, 4)
    _, g = gate_modules(model)[0]
    with torch.no_grad():
        g.fc2.bias.zero_()
        model(x_on)
        u_on = g.last_logits.min(dim=0).values
        model(torch.rand(16, 3, 32, 32))
        u = g.last_logits
        # on for x_on by a margin well above rounding; off for random images below x_on's logit
        g.fc2.bias.copy_(-u_on + 1e-3 * u.abs().max())
        model(x_on)
        assert bool(g.last_mask.all()), "precondition: every gate of the first gated layer on at capture"
        model(torch.rand(16, 3, 32, 32))
        assert 0.05 < g.last_mask.float().mean().item() < 0.95
    return model


def test_case3_jit_trace_does_not_freeze_an_all_on_mask():
    x_on = torch.full((2, 3, 32, 32), 1.0)
    model = _model_with_a_gate_all_on_for(x_on)
    accel = accelerate(model)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings are the user's to judge; the result is checked here
        traced = torch.jit.trace(accel, x_on)
    for _ in range(3):
        x = torch.rand(4, 3, 32, 32)
        with torch.no_grad():
            assert_logits_match(traced(x), model(x))


def test_case3_dense_fallback_does_not_freeze_masks_under_trace():
    """All gates on at capture makes every layer take the dense route; later masks must still apply."""
    model, _ = make_model("resnet20", 3, 32, 2)
    for _, g in gate_modules(model):
        with torch.no_grad():
            g.fc2.bias.add_(1e3)
    accel = accelerate(model)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(accel, x)
        # now close about half of the gates (the trace shares the parameters): the trace must follow
        for _, lay in accel_layers(accel):
            if lay.gate is not None:
                lay.gate.b2.sub_(2e3 * (torch.rand_like(lay.gate.b2) < 0.5))
        ref = accel(x)
        assert_logits_match(traced(x), ref)


def test_case3_export_with_other_masks_after_capture():
    x_on = torch.full((2, 3, 32, 32), 1.0)
    model = _model_with_a_gate_all_on_for(x_on)
    accel = accelerate(model)
    ep = torch.export.export(accel, (x_on,))
    for _ in range(2):
        x = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            assert_logits_match(ep.module()(x), model(x))


# ----------------------------------------------------------------------------- case 4: autocast


@pytest.mark.parametrize("arch", ["small_vgg", "resnet20"])
def test_case4_decoupled_eval_follows_autocast(arch):
    dense = build(arch).eval()
    randomize_bn(dense)
    dec = decouple(dense).eval()  # "open" init: every gate on, the sparse op runs in eval
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = dec(x)
        want = dense(x)
        fast = accelerate(dec)(x)
    assert out.dtype == want.dtype
    scale = want.float().abs().max().item()
    torch.testing.assert_close(out.float(), want.float(), rtol=0.05, atol=0.05 * scale)
    torch.testing.assert_close(fast.float(), want.float(), rtol=0.05, atol=0.05 * scale)


def test_case4_backends_see_one_dtype_under_autocast(monkeypatch):
    """An accelerated model under autocast casts its folded weights as F.conv2d
    would: every backend gets x, weight and bias in one dtype (a kernel that
    takes bfloat16 natively must not see float32 weights), the first gated
    layer included."""
    from pydecouple import _backend

    dense = build("small_vgg").eval()
    randomize_bn(dense)
    dec = decouple(dense, gate_first=True).eval()
    seen = []
    for name in ("cpu", "dense"):
        real = _backend.BACKENDS[name].run

        def spy(x, w, b, *rest, real=real):
            seen.append({x.dtype, w.dtype} | ({b.dtype} if b is not None else set()))
            return real(x, w, b, *rest)

        monkeypatch.setattr(_backend.BACKENDS[name], "run", spy)
    real_fused = _backend._call_fused

    def spy_fused(x, in_mask, w, b, *rest):  # the fused layer (gate + conv in one call)
        seen.append({x.dtype, w.dtype} | ({b.dtype} if b is not None else set()))
        return real_fused(x, in_mask, w, b, *rest)

    monkeypatch.setattr(_backend, "_call_fused", spy_fused)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = accelerate(dec)(x)
        want = dense(x)
    assert len(seen) == 6 and all(s == {torch.bfloat16} for s in seen), seen
    assert out.dtype == want.dtype


def test_case4_op_follows_autocast_like_conv2d():
    x, w, b = torch.randn(2, 4, 6, 6), torch.randn(8, 4, 3, 3), torch.randn(8)
    om = torch.rand(2, 8) < 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pydecouple.gated_conv2d(x.bfloat16(), w, b, om, padding=1)  # x already bf16, weights float32
        want = F.conv2d(x.bfloat16(), w, b, padding=1)
        out64 = pydecouple.gated_conv2d(x.double(), w.double(), b.double(), om, padding=1)  # float64 is not cast
    assert out.dtype == want.dtype == torch.bfloat16 and out64.dtype == torch.float64
    torch.testing.assert_close(out.float(), (want * om[:, :, None, None]).float(), rtol=0.02, atol=0.05)


# ----------------------------------------------------------------------------- case 5: empty batches


@pytest.mark.parametrize("arch", ["small_vgg", "resnet20"])
def test_case5_empty_batch_everywhere(arch):
    from pydecouple.paths import extract_paths

    model, _ = make_model(arch, 3, 32, 2)
    x0 = torch.rand(0, 3, 32, 32)
    with torch.no_grad():
        assert accelerate(model)(x0).shape == (0, 10)
        assert accelerate(model, use_kernel=False)(x0).shape == (0, 10)
        assert model(x0).shape == (0, 10)
    p = extract_paths(model, x0, torch.zeros(0, dtype=torch.long), progress=False)
    assert p.n == 0 and len(p.layers) == len(gate_modules(model))
    assert pydecouple.flops(accelerate(model), x0).ratio == 1.0


# ----------------------------------------------------------------------------- case 7: FLOPs of an accelerated model


@pytest.mark.parametrize("arch", ["small_vgg", "resnet20"])
def test_case7_flops_of_accelerated_model(arch):
    model, x = make_model(arch, 3, 32, 6)
    accel = accelerate(model)
    want, got = pydecouple.flops(model, x), pydecouple.flops(accel, x)
    assert got.dense == pytest.approx(want.dense, rel=1e-9)
    assert got.total == pytest.approx(want.total, rel=1e-6)
    assert 0.1 < got.ratio < 0.95
    convs = {lay.name: lay for lay in want.layers if lay.kind in ("conv", "gated_conv")}
    for lay in got.layers:
        if lay.kind in ("conv", "gated_conv"):
            assert lay.name in convs and lay.kind == convs[lay.name].kind
            assert lay.gated == pytest.approx(convs[lay.name].gated, rel=1e-6)
    # the probes are removed again: a plain forward afterwards records nothing
    assert all(m.probe is None for _, m in accel_layers(accel))


# ----------------------------------------------------------------------------- case 9: user blocks, jit.script


class UserBlock(nn.Module):
    """A residual block written by a user: its own forward, attribute names of its own."""

    def __init__(self, c):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.na = nn.BatchNorm2d(c)
        self.b = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.nb = nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.na(self.a(x)))
        return F.relu(self.nb(self.b(out)) + x)


def test_case9_user_residual_block_is_reported_in_the_accelerate_summary(caplog):
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), UserBlock(16),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    randomize_bn(net)
    dec = decouple(net)
    assert dec[3].b.in_mask_source is dec[3].a  # decouple chains it (traced) ...
    mix_gates(dec, torch.rand(8, 3, 16, 16))
    with caplog.at_level(logging.INFO, logger="pydecouple"):
        accel = accelerate(dec)
    s = accel.accelerate_summary
    text = str(s)
    # ... but the accelerated block runs its own forward: both losses are said, by name
    assert "3" in dict(s.own_forward) and "ReLU" in text and "in-mask" in text
    assert "UserBlock" in text
    assert any("UserBlock" in r.getMessage() for r in caplog.records)
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        assert_logits_match(accel(x), dec.eval()(x))
    # a model of known blocks has nothing to report there
    model, _ = make_model("resnet20", 3, 32, 1)
    assert accelerate(model).accelerate_summary.own_forward == []


def test_case9_jit_script_says_it_is_not_supported():
    model, x = make_model("tiny_cnn", 1, 8, 2)
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script.*not supported.*torch\.jit\.trace"):
        torch.jit.script(accelerate(model))
