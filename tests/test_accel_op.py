"""pydecouple::accel_conv_cpu, an accelerated gated layer in one call (gate,
dense-or-kernel route, conv, residual epilogue), against the formula it
fuses: the gate's MLP in float32 and the masked reference convolution."""

import pytest
import torch
import torch.nn.functional as F

import pydecouple
import pydecouple.isa
from pydecouple.reference import gated_conv2d_reference
from tolerances import TOLERANCES

pytestmark = pytest.mark.skipif(not pydecouple.extension_available(), reason="the compiled extension is not built")

ALWAYS_KERNEL, ALWAYS_DENSE = 2.0, -1.0


def _case(n, cin, cout, h, k, dtype, hid=8):
    x = torch.randn(n, cin, h, h).to(dtype)
    w = (torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5).to(dtype)
    b = torch.randn(cout).to(dtype)
    w1, b1 = torch.randn(hid, cin), torch.randn(hid)
    w2, b2 = torch.randn(cout, hid), torch.randn(cout) * 0.5
    return x, w, b, w1, b1, w2, b2


def _expected(x, w, b, w1, b1, w2, b2, in_mask, pad, relu, residual, residual_relu):
    mask = F.linear(F.relu(F.linear(x.float().mean(dim=(2, 3)), w1, b1)), w2, b2) > 0
    xin = x.double()
    if in_mask is not None:  # the op's contract: channels that are off arrive as zeros
        xin = xin * in_mask[:, :, None, None]
    y = gated_conv2d_reference(xin, w.double(), b.double(), mask, None, (1, 1), (pad,) * 4, (1, 1), 1, relu)
    if residual is not None:
        y = y + residual.double()
        if residual_relu:
            y = torch.relu(y)
    return y, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("route", [ALWAYS_KERNEL, ALWAYS_DENSE], ids=["kernel", "dense"])
@pytest.mark.parametrize("channels_last", [False, True])
# Batch 1 and 3: the kernel's one-sample-at-a-time schedule; 6 and 4 its
# groups of units (4 x 24 x 24: three position blocks per sample, whose
# channel means are combined).
@pytest.mark.parametrize("n,cin,cout,h,k", [(1, 16, 24, 8, 3), (6, 33, 40, 5, 3), (3, 64, 64, 4, 1),
                                            (4, 8, 20, 24, 3)])
@pytest.mark.parametrize("residual_kind", ["none", "relu", "plain"])
def test_accel_conv_matches_its_formula(dtype, route, channels_last, n, cin, cout, h, k, residual_kind):
    x, w, b, w1, b1, w2, b2 = _case(n, cin, cout, h, k, dtype)
    in_mask = torch.rand(n, cin) < 0.6
    x = x * in_mask[:, :, None, None].to(dtype)
    residual = torch.randn(n, cout, h, h).to(dtype) if residual_kind != "none" else None
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        if residual is not None:
            residual = residual.to(memory_format=torch.channels_last)
    pad = k // 2
    args = (x, in_mask, w, b, w1, b1, w2, b2, [1, 1], [pad] * 4, [1, 1], True, residual, residual_kind == "relu",
            route)
    y, mask, y_means = torch.ops.pydecouple.accel_conv_cpu(*args, None, True)
    ref, ref_mask = _expected(x, w, b, w1, b1, w2, b2, in_mask, pad, True, residual, residual_kind == "relu")
    assert torch.equal(mask, ref_mask)
    # out_means: the output's channel means (for the next gate), from the
    # output as written (bfloat16 values included), in float32.
    assert y_means.dtype == torch.float32 and y_means.shape == (n, cout)
    torch.testing.assert_close(y_means.double(), y.double().mean(dim=(2, 3)), rtol=1e-6, atol=1e-6)
    # x_means given (as the producer computes them): the gate does not read x, the same result.
    y2, mask2, none = torch.ops.pydecouple.accel_conv_cpu(*args, x.double().mean(dim=(2, 3)).float(), False)
    assert torch.equal(mask2, mask) and torch.equal(y2, y) and none.numel() == 0
    assert y.dtype == dtype and y.shape == ref.shape
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last or n == 1
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref, **TOLERANCES[torch.float32])
    else:
        # bfloat16 output: one rounding of values the size of the reference's
        assert (y.double() - ref).abs().max() <= 2 ** -7 * ref.abs().max() + TOLERANCES[torch.bfloat16]["floor"]


# The instruction-set paths whose own kernels compute the gate's channel
# means (the oneDNN paths borrow the host's): the ones this CPU can run.
MEAN_PATHS = [p for p in ("avx512", "avx2", "generic") if p in pydecouple.isa.available_paths()]


@pytest.mark.parametrize("path", MEAN_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("route", [ALWAYS_KERNEL, ALWAYS_DENSE], ids=["kernel", "dense"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_accel_conv_large_gate_matches(monkeypatch, path, dtype, route, channels_last):
    # 200 channels: three 64-channel blocks of the gate's mean and an 8-channel
    # tail; 13 x 13 = 169 positions: 32-position steps and a masked tail; over
    # 2^16 gate multiply-adds: the MLP through addmm.
    monkeypatch.setenv(pydecouple.isa.ENV_VAR, path)
    n, cin, cout, h = 4, 200, 136, 13
    x, w, b, w1, b1, w2, b2 = _case(n, cin, cout, h, 1, dtype, hid=64)
    assert n * 64 * (cin + cout) > 2 ** 16
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y, mask, y_means = torch.ops.pydecouple.accel_conv_cpu(x, None, w, b, w1, b1, w2, b2, [1, 1], [0] * 4, [1, 1],
                                                           True, None, False, route, None, True)
    torch.testing.assert_close(y_means.double(), y.double().mean(dim=(2, 3)), rtol=1e-6, atol=1e-6)
    ref, ref_mask = _expected(x, w, b, w1, b1, w2, b2, None, 0, True, None, False)
    assert torch.equal(mask, ref_mask) and 0 < int(mask.sum()) < mask.numel()
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), ref, **TOLERANCES[torch.float32])
    else:
        assert (y.double() - ref).abs().max() <= 2 ** -7 * ref.abs().max() + TOLERANCES[torch.bfloat16]["floor"]


def test_accel_conv_rejects_bad_gate_parameters():
    x, w, b, w1, b1, w2, b2 = _case(2, 8, 12, 6, 3, torch.float32)
    with pytest.raises(RuntimeError, match=r"accel_conv_cpu: argument 'w2' must be a float32 CPU tensor of shape"):
        torch.ops.pydecouple.accel_conv_cpu(x, None, w, b, w1, b1, w2[:, :3], b2, [1, 1], [1] * 4, [1, 1], True,
                                            None, False, 0.5)
    with pytest.raises(RuntimeError, match=r"accel_conv_cpu: argument 'residual' must be a CPU tensor of shape"):
        torch.ops.pydecouple.accel_conv_cpu(x, None, w, b, w1, b1, w2, b2, [1, 1], [1] * 4, [1, 1], True,
                                            torch.randn(2, 12, 5, 5), False, 0.5)
    for bad in (torch.zeros(2, 7), torch.zeros(2, 8, dtype=torch.float64), torch.zeros(8, 2).t()):
        with pytest.raises(RuntimeError, match=r"accel_conv_cpu: argument 'x_means' must be a contiguous float32 CPU "
                                               r"tensor of shape \(2, 8\), got "):
            torch.ops.pydecouple.accel_conv_cpu(x, None, w, b, w1, b1, w2, b2, [1, 1], [1] * 4, [1, 1], True,
                                                None, False, 0.5, bad)


def test_accel_conv_rejects_an_input_dtype_the_engine_has_no_kernels_for():
    # The gate's means and the kernels cover float32, bfloat16 and float16
    # only: anything else is refused, with the argument named, before any work.
    x, w, b, w1, b1, w2, b2 = _case(2, 8, 12, 6, 3, torch.float32)
    with pytest.raises(RuntimeError, match=r"accel_conv_cpu: argument 'x' must be float32, bfloat16 or float16, "
                                           r"got Double"):
        torch.ops.pydecouple.accel_conv_cpu(x.double(), None, w.double(), b.double(), w1, b1, w2, b2, [1, 1],
                                            [1] * 4, [1, 1], True, None, False, 0.5)


def test_accel_conv_rejects_bad_masks_and_bias():
    x, w, b, w1, b1, w2, b2 = _case(2, 8, 12, 6, 3, torch.float32)
    bad_in = torch.ones(2, 7, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"accel_conv_cpu: argument 'in_mask' must be bool of shape \(2, 8\), got "
                                           r"Bool \[2, 7\]"):
        torch.ops.pydecouple.accel_conv_cpu(x, bad_in, w, b, w1, b1, w2, b2, [1, 1], [1] * 4, [1, 1], True,
                                            None, False, 0.5)
    with pytest.raises(RuntimeError, match=r"accel_conv_cpu: argument 'bias' must be Float of shape \(12,\), got "
                                           r"Double \[12\]"):
        torch.ops.pydecouple.accel_conv_cpu(x, None, w, b.double(), w1, b1, w2, b2, [1, 1], [1] * 4, [1, 1], True,
                                            None, False, 0.5)


@pytest.mark.parametrize("path", [p for p in MEAN_PATHS if p != "generic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("cin,cout,h", [(3, 13, 5), (21, 3, 7), (40, 33, 3)])
@pytest.mark.parametrize("residual_kind", ["none", "relu", "plain"])
@pytest.mark.parametrize("route", [ALWAYS_KERNEL, ALWAYS_DENSE], ids=["kernel", "dense"])
def test_vector_passes_match_the_portable_code(monkeypatch, path, dtype, channels_last, cin, cout, h,
                                               residual_kind, route):
    """Each instruction set's vector code against the portable C++ of the
    same op: on the dense route the passes after oneDNN's conv (mask, ReLU,
    residual add and ReLU; the gate's and the output's channel means), bit
    for bit; on the kernel route the input gather (with an in-mask), the
    epilogue in both layouts and the means, within float32 rounding (the
    GEMM sums in another order). Channel counts that leave vector tails (3,
    13, 21, 33, 40 against 8 and 16 lanes), 9-49 positions, every element
    type."""
    n = 4
    x, w, b, w1, b1, w2, b2 = _case(n, cin, cout, h, 3, dtype)
    in_mask = None
    if route == ALWAYS_KERNEL:
        in_mask = torch.rand(n, cin) < 0.6
        in_mask[0] = True  # one sample reads every channel (read in place), one at most one
        in_mask[1] = False
        in_mask[1, cin // 2] = True
        in_mask[2:, 0] = True  # no sample all off: two such would tie on every logit
        x = x * in_mask[:, :, None, None].to(dtype)
    # each filter kept by two samples of four: hidden units active (so the
    # logits vary with the sample), b2 halfway between the 2nd and 3rd logit
    # (no logit near 0, so both paths' means give the same mask)
    b1 = b1.abs() + 0.5
    logits = F.linear(F.relu(F.linear(x.float().mean(dim=(2, 3)), w1, b1)), w2, b2).sort(dim=0).values
    b2 = b2 - (logits[1] + logits[2]) / 2
    residual = torch.randn(n, cout, h, h).to(dtype) if residual_kind != "none" else None
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
        residual = residual.to(memory_format=torch.channels_last) if residual is not None else None
    args = (x, in_mask, w, b, w1, b1, w2, b2, [1, 1], [1] * 4, [1, 1], True, residual, residual_kind == "relu",
            route, None, True)
    monkeypatch.setenv(pydecouple.isa.ENV_VAR, "generic")
    y_ref, mask_ref, means_ref = torch.ops.pydecouple.accel_conv_cpu(*args)
    monkeypatch.setenv(pydecouple.isa.ENV_VAR, path)
    y, mask, means = torch.ops.pydecouple.accel_conv_cpu(*args)
    assert int(mask_ref.sum()) == mask_ref.numel() // 2
    assert torch.equal(mask, mask_ref)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last
    if route == ALWAYS_DENSE:
        assert torch.equal(y, y_ref)  # the same float operations per element, the same rounding
        torch.testing.assert_close(means, means_ref, rtol=1e-6, atol=1e-7)
    else:
        # float32 sums in another order, then (bfloat16, float16) one rounding each
        lp = dtype != torch.float32
        scale = float(y_ref.abs().max())
        torch.testing.assert_close(y.double(), y_ref.double(), rtol=2 ** -7 if lp else 1e-5,
                                   atol=(2 ** -7 if lp else 1e-5) * scale)
        torch.testing.assert_close(means, means_ref, rtol=2 ** -7 if lp else 1e-5, atol=(2 ** -7 if lp else 1e-5) * scale)
        off = ~mask[:, :, None, None].expand_as(y)
        expect_off = torch.zeros_like(y) if residual is None else \
            (residual.relu() if residual_kind == "relu" else residual)
        assert torch.equal(y[off], expect_off[off])  # deselected filters: 0, or relu?(residual), exactly
    torch.testing.assert_close(means.double(), y.double().mean(dim=(2, 3)), rtol=1e-6, atol=1e-6)
