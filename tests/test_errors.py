"""Bad input fails before any kernel runs, naming the argument, what was
expected and what was given."""

import pytest
import torch

from pydecouple import gated_conv2d

X = torch.randn(2, 4, 6, 6)
W = torch.randn(3, 4, 3, 3)


@pytest.mark.parametrize(
    "kwargs,exc,pattern",
    [
        (dict(x=torch.randn(4, 6)), ValueError, r"'x' must be a 4-D \(N, C, H, W\) or 3-D \(C, H, W\) tensor, got 2-D"),
        (dict(x=torch.randn(1, 2, 4, 6, 6)), ValueError, r"'x' must be a 4-D .* got 5-D"),
        (dict(weight=torch.randn(3, 4, 3)), ValueError, r"'weight' must be a 4-D \(Cout, Cin // groups, KH, KW\) tensor, got 3-D"),
        (dict(weight=torch.randn(3, 5, 3, 3)), ValueError, r"'weight' must be of shape \(Cout, 4, KH, KW\) .* got shape \(3, 5, 3, 3\)"),
        (dict(weight=torch.randn(3, 2, 3, 3), groups=3), ValueError, r"'x' must be a channel count divisible by groups=3, got 4 channels"),
        (dict(weight=torch.randn(3, 2, 3, 3), groups=2), ValueError, r"'weight' must be an output-channel count divisible by groups=2, got 3 filters"),
        (dict(groups=0), ValueError, r"'groups' must be a positive int, got 0"),
        (dict(x=X.long()), TypeError, r"'x' must be a floating-point tensor .* got dtype torch.int64"),
        (dict(weight=W.double()), TypeError, r"'weight' must be of the dtype of 'x' \(torch.float32\), got dtype torch.float64"),
        (dict(bias=torch.randn(4)), ValueError, r"'bias' must be of shape \(3,\) = \(Cout,\), got shape \(4,\)"),
        (dict(bias=torch.randn(3).double()), TypeError, r"'bias' must be of the dtype of 'x'"),
        (dict(out_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, r"'out_mask' must be of shape \(2, 3\) = \(N, C\), got shape \(2, 4\)"),
        (dict(out_mask=torch.ones(3, dtype=torch.bool)), ValueError, r"'out_mask' must be of shape \(2, 3\)"),
        (dict(in_mask=torch.ones(2, 3, dtype=torch.bool)), ValueError, r"'in_mask' must be of shape \(2, 4\) = \(N, C\), got shape \(2, 3\)"),
        (dict(in_mask=torch.ones(2, 4)), TypeError, r"'in_mask' must be a torch.bool tensor, got dtype torch.float32"),
        (dict(out_mask=[[True] * 3] * 2), TypeError, r"'out_mask' must be a bool tensor or None, got list"),
        (dict(stride=0), ValueError, r"'stride' must be at least 1 in each dimension, got \(0, 0\)"),
        (dict(stride=(1, 2, 3)), TypeError, r"'stride' must be an int or a pair of ints, got \(1, 2, 3\)"),
        (dict(dilation=1.5), TypeError, r"'dilation' must be an int or a pair of ints, got 1.5"),
        (dict(padding=-1), ValueError, r"'padding' must be at least 0 in each dimension, got \(-1, -1\)"),
        (dict(padding="full"), ValueError, r"'padding' must be an int, a pair, 'same' or 'valid', got 'full'"),
        (dict(padding="same", stride=2), ValueError, r"'padding' must be a number when stride is not 1"),
        (dict(x=torch.randn(2, 4, 2, 2)), ValueError, r"'x' must be at least as large as the dilated kernel \(3x3\) after padding, got input 2x2"),
        (dict(x=torch.randn(2, 4, 6, 6), dilation=4, padding=0), ValueError, r"dilated kernel \(9x9\)"),
    ],
)
def test_bad_input_names_argument(kwargs, exc, pattern):
    args = dict(x=X, weight=W, bias=None, out_mask=None, in_mask=None, stride=1, padding=0, dilation=1, groups=1)
    args.update(kwargs)
    with pytest.raises(exc, match=pattern):
        gated_conv2d(**args)


def test_unbatched_mask_shape():
    with pytest.raises(ValueError, match=r"'out_mask' must be of shape \(3,\) = \(C,\) for unbatched input, got shape \(1, 3\)"):
        gated_conv2d(torch.randn(4, 6, 6), W, out_mask=torch.ones(1, 3, dtype=torch.bool))


def test_device_mismatch_is_named():
    meta_w = torch.randn(3, 4, 3, 3, device="meta")
    with pytest.raises(ValueError, match=r"'weight' must be on the device of 'x' \(cpu\), got a tensor on meta"):
        gated_conv2d(X, meta_w)
    with pytest.raises(ValueError, match=r"'in_mask' must be on the device of 'x' \(cpu\), got a tensor on meta"):
        gated_conv2d(X, W, in_mask=torch.ones(2, 4, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match=r"'bias' must be on the device of 'x'"):
        gated_conv2d(X, W, bias=torch.randn(3, device="meta"))


def test_not_a_tensor():
    with pytest.raises(TypeError, match=r"'x' must be a torch.Tensor, got ndarray"):
        gated_conv2d(X.numpy(), W)


def test_compiled_op_checks_direct_callers():
    """torch.ops.pydecouple.gated_conv2d_cpu called directly still refuses bad shapes, with the argument named."""
    import pydecouple

    if not pydecouple.extension_available():
        pytest.skip("the compiled extension is not built")
    op = torch.ops.pydecouple.gated_conv2d_cpu
    with pytest.raises(RuntimeError, match=r"argument 'out_mask' must be bool of shape \(2, 3\)"):
        op(X, W, None, torch.ones(2, 5, dtype=torch.bool), None, [1, 1], [1, 1, 1, 1], [1, 1], 1, False)
    with pytest.raises(RuntimeError, match=r"argument 'x' must be 4-D"):
        op(X[0], W, None, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, False)
    with pytest.raises(RuntimeError, match=r"must be float32"):
        op(X.double(), W.double(), None, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, False)
