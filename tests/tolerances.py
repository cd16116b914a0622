"""The one table of tolerances every implementation is tested with.

float32/float64: absolute and relative tolerance against the reference run in
float64. Low precision (float16, bfloat16) follows flash-attention's rule: the
kernel's error against a float64 reference is at most twice PyTorch's own
error in that dtype (plus a small floor), since the inputs are already rounded.
"""

import torch

from pydecouple.reference import gated_conv2d_reference

TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=2e-4, rtol=2e-4),
    torch.float16: dict(factor=2.0, floor=1e-2),
    torch.bfloat16: dict(factor=2.0, floor=5e-2),
}


def assert_matches_reference(out, x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups, relu=False):
    """Compare ``out`` with the reference evaluated in float64 on the same inputs."""
    dt = x.dtype
    args64 = [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
              for t in (x, weight, bias)]
    ref64 = gated_conv2d_reference(*args64, out_mask, in_mask, stride, padding, dilation, groups, relu)
    assert out.shape == ref64.shape, f"shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    assert out.dtype == dt, f"dtype {out.dtype} != input dtype {dt}"
    tol = TOLERANCES[dt]
    if "factor" in tol:
        ref_lp = gated_conv2d_reference(x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups, relu)
        torch_err = (ref_lp.double() - ref64).abs().max().item() if ref64.numel() else 0.0
        err = (out.double() - ref64).abs().max().item() if ref64.numel() else 0.0
        bound = tol["factor"] * torch_err + tol["floor"]
        assert err <= bound, f"{dt}: max error {err:.3g} > {tol['factor']} x torch's own error {torch_err:.3g} + {tol['floor']}"
    else:
        torch.testing.assert_close(out.double(), ref64, atol=tol["atol"], rtol=tol["rtol"])
    # Deselected outputs are exactly zero, whatever the bias.
    if out_mask is not None and out.numel():
        off = ~out_mask
        assert torch.all(out.permute(1, 0, 2, 3)[off.t()] == 0), "a deselected output channel is not exactly zero"
