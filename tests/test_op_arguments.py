"""gated_conv2d's integer arguments, as F.conv2d takes them (issue 16, cases 6 and 9).

* numpy integers and 0-d integer tensors are ints, as in F.conv2d; floats and
  bools stay refused with the argument named.
* huge stride / padding / dilation: where F.conv2d gives a result, the same
  result, quickly and without memory growing with the stride; where F.conv2d
  fails (or its own 64-bit arithmetic wraps), a clear error naming the
  argument, raised before any kernel runs.
* the compiled CPU kernel called directly (as accelerate() does) with a huge
  stride, in a child process with an address-space limit: it used to allocate
  stride**2 table entries (2.3 GB at 16384, a crash at 2**32); it now clamps
  the stride to the room the kernel has, which gives the same output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pydecouple
from pydecouple import _backend, gated_conv2d

X = torch.randn(2, 4, 8, 8)
W = torch.randn(3, 4, 3, 3)
OM = torch.tensor([[True, False, True], [False, True, True]])


def _expected(x, w, om, **kw):
    return F.conv2d(x, w, None, **kw) * om[:, :, None, None]


@pytest.mark.parametrize("kw,f_kw", [
    (dict(padding=np.int64(1)), dict(padding=1)),
    (dict(stride=torch.tensor(2)), dict(stride=2)),
    (dict(stride=np.int32(2), dilation=torch.tensor(2, dtype=torch.int16)), dict(stride=2, dilation=2)),
    (dict(stride=[np.int64(2), torch.tensor(1)]), dict(stride=(2, 1))),
    (dict(padding=(torch.tensor(1), np.uint8(2))), dict(padding=(1, 2))),
    (dict(stride=(np.int64(3),)), dict(stride=3)),
    (dict(groups=np.int64(1)), dict(groups=1)),
    (dict(groups=torch.tensor(1)), dict(groups=1)),
], ids=lambda v: repr(v))
def test_numpy_and_tensor_integers_accepted_as_f_conv2d_does(kw, f_kw):
    out = gated_conv2d(X, W, None, OM, **kw)
    torch.testing.assert_close(out, _expected(X, W, OM, **f_kw), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw,pattern", [
    (dict(stride=2.0), r"'stride' must be an int or a pair of ints, got 2.0"),
    (dict(stride=np.float64(2.0)), r"'stride' must be an int or a pair of ints, got np.float64\(2.0\)"),
    (dict(stride=torch.tensor(2.0)), r"'stride' must be an int or a pair of ints, got tensor\(2.\)"),
    (dict(stride=True), r"'stride' must be an int or a pair of ints, got True"),
    (dict(stride=torch.tensor(True)), r"'stride' must be an int or a pair of ints, got tensor\(True\)"),
    (dict(padding=np.bool_(True)), r"'padding' must be an int or a pair of ints, got np.True_"),
    (dict(dilation=(1, 2.5)), r"'dilation' must be an int or a pair of ints, got \(1, 2.5\)"),
    (dict(stride=(True, 1)), r"'stride' must be an int or a pair of ints, got \(True, 1\)"),
    (dict(groups=1.0), r"'groups' must be a positive int, got 1.0"),
    (dict(groups=True), r"'groups' must be a positive int, got True"),
], ids=lambda v: repr(v))
def test_floats_and_bools_still_refused(kw, pattern):
    with pytest.raises(TypeError, match=pattern):
        gated_conv2d(X, W, None, OM, **kw)


@pytest.mark.parametrize("relu", ["yes", 1, None, torch.tensor(True)], ids=repr)
def test_relu_must_be_a_bool_in_the_checks(relu):
    """The check itself (pydecouple._validate): relu='yes' would read as True."""
    from pydecouple._validate import normalize_conv_args

    with pytest.raises(TypeError, match=r"gated_conv2d: argument 'relu' must be a bool .*, got " + repr(relu)[:4]):
        normalize_conv_args(X, W, None, OM, None, 1, 0, 1, 1, relu=relu)
    assert normalize_conv_args(X, W, None, OM, None, 1, 0, 1, 1, relu=np.bool_(True)).relu is True


def _ops_forwards_relu() -> bool:
    """Whether pydecouple.ops.gated_conv2d hands relu to the checks (another engineer's
    file, changed while this was written): the wiring, not the behaviour tested below."""
    from pydecouple import ops

    class Stop(Exception):
        pass

    seen = []

    def spy(*args, **kwargs):
        seen.append(len(args) == 10 or "relu" in kwargs)
        raise Stop

    orig, ops.normalize_conv_args = ops.normalize_conv_args, spy
    try:
        ops.gated_conv2d(X, W, relu=True)
    except Stop:
        pass
    finally:
        ops.normalize_conv_args = orig
    return bool(seen and seen[0])


@pytest.mark.xfail(not _ops_forwards_relu(), strict=True,
                   reason="pydecouple/ops.py does not pass relu to normalize_conv_args yet (another engineer's file)")
def test_relu_yes_refused_by_gated_conv2d():
    with pytest.raises(TypeError, match=r"argument 'relu' must be a bool .*, got 'yes'"):
        gated_conv2d(X, W, None, OM, relu="yes")


# --- case 6: huge values --------------------------------------------------------------------------

# Where F.conv2d returns a result: stride up to 2**63 - 1 (one output position per side).
# In this process only strides that failed cleanly before the fix (std::bad_alloc); the
# ones that crashed the process (2**32 and up) run in a child below.
HUGE_OK = [dict(stride=16384), dict(stride=2**16)]


@pytest.mark.parametrize("kw", HUGE_OK, ids=repr)
def test_huge_stride_gives_f_conv2d_result(kw):
    out = gated_conv2d(X, W, None, OM, **kw)
    torch.testing.assert_close(out, _expected(X, W, OM, **kw), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw", HUGE_OK, ids=repr)
def test_huge_stride_autograd_matches_f_conv2d(kw):
    x, w = X.clone().requires_grad_(), W.clone().requires_grad_()
    gated_conv2d(x, w, None, OM, **kw).square().sum().backward()
    # F.conv2d's own backward segfaults from stride 2**16 on (torch 2.13), so the
    # reference gradient uses stride 6: on an 8x8 input and a 3x3 kernel every
    # stride >= 6 gives one output position, i.e. the same function (checked).
    torch.testing.assert_close(_expected(X, W, OM, **kw), _expected(X, W, OM, stride=6))
    x2, w2 = X.clone().requires_grad_(), W.clone().requires_grad_()
    _expected(x2, w2, OM, stride=6).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-4, atol=1e-4)


# Where F.conv2d fails (ValueError "Overflow when unpacking long long", RuntimeError
# "Output size is too small" / "Kernel size can't be greater", SIGFPE at padding 2**61)
# or returns a wrong-sized output (dilation 2**62: its arithmetic wraps). f_check: F.conv2d
# may be called in-process to show that it raises too (not where it kills the process).
HUGE_BAD = [
    (dict(stride=2**63), ValueError, r"'stride' must be at most 2\*\*63 - 1 in each dimension", True),
    (dict(stride=(1, 2**64)), ValueError, r"'stride' must be at most 2\*\*63 - 1", True),
    (dict(padding=2**63), ValueError, r"'padding' must be at most 2\*\*63 - 1", True),
    (dict(dilation=2**63), ValueError, r"'dilation' must be at most 2\*\*63 - 1", True),
    (dict(padding=2**30), ValueError, r"'padding' must be small enough that the padded input stays below 2\*\*31 "
                                      r"pixels a side .*got padding \(1073741824, ", True),
    (dict(padding=(0, 2**61)), ValueError, r"'padding' must be small enough that the padded input", False),
    (dict(padding=2**62 - 1), ValueError, r"'padding' must be small enough that the padded input", True),
    (dict(padding=2**29), ValueError, r"'padding' must be small enough for the output to fit .* "
                                      r"output of 2x3x1073741830x1073741830", False),
    (dict(dilation=2**31), ValueError, r"'x' must be at least as large as the dilated kernel \(4294967297x", True),
    (dict(dilation=2**62), ValueError, r"'x' must be at least as large as the dilated kernel", False),
    (dict(dilation=(2**62, 1), padding=(2**30 - 8, 0)), ValueError, r"'x' must be at least as large", False),
]


@pytest.mark.parametrize("kw,exc,pattern,f_check", HUGE_BAD, ids=lambda v: repr(v) if isinstance(v, dict) else "")
def test_huge_arguments_fail_clearly_before_any_kernel(monkeypatch, kw, exc, pattern, f_check):
    def no_kernel(*a, **k):
        raise AssertionError("a kernel ran before the arguments were checked")

    monkeypatch.setattr(_backend, "run", no_kernel)
    with pytest.raises(exc, match=pattern):
        gated_conv2d(X, W, None, OM, **kw)
    if f_check:  # F.conv2d refuses these too (its messages are less clear)
        with pytest.raises((RuntimeError, ValueError, TypeError)):
            F.conv2d(X, W, None, **kw)


# --- the compiled kernel itself, in a child process -------------------------------------------------

_CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch, torch.nn.functional as F
    import pydecouple
    torch.set_num_threads(1)
    which, s = sys.argv[1], json.loads(sys.argv[2])
    x = torch.randn(2, 4, 8, 8); w = torch.randn(3, 4, 3, 3)
    om = torch.tensor([[True, False, True], [False, True, True]])
    if which == "kernel":
        op = torch.ops.pydecouple.gated_conv2d_cpu
    else:  # the public op, with its arguments as the kernel takes them
        op = lambda x, w, b, om, im, s, p, d, g, r: pydecouple.gated_conv2d(x, w, b, om, im, s, p[::2], d, g, relu=r)
    op(x, w, None, om, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, False)   # warm: first-call allocations
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Room for the legitimate work, not for gigabytes: a kernel whose memory grows
    # with the stride fails here instead of swapping a shared machine.
    vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), resource.RLIM_INFINITY))
    out = op(x, w, None, om, None, s, [1, 1, 1, 1], [1, 1], 1, False)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    # Every stride >= 8 gives one output position here (8x8, padding 1, 3x3): the same
    # function as stride 8, which F.conv2d computes (oneDNN refuses 2**63 - 1 with padding).
    ref = F.conv2d(x, w, None, [min(v, 8) for v in s], 1) * om[:, :, None, None]
    ok = out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-4, atol=1e-4)
    print(json.dumps({"same": bool(ok), "grown_kb": grown}))
""")

@pytest.mark.parametrize("which,stride", [
    ("public", [16384, 16384]),
    ("public", [2**32, 2**32]),
    ("public", [2**63 - 1, 2**63 - 1]),
    ("public", [2**40, 1]),
    ("public", [1, 2**32]),
    ("kernel", [2, 2]),
    ("kernel", [8, 8]),
    ("kernel", [16384, 16384]),
    ("kernel", [2**16, 2**16]),
    ("kernel", [2**32, 2**32]),
    ("kernel", [2**63 - 1, 1]),
], ids=str)
def test_memory_does_not_grow_with_stride(which, stride):
    """The public op (any backend) and the compiled CPU kernel called directly (as accelerate() does)."""
    if which == "kernel" and not hasattr(torch.ops.pydecouple, "gated_conv2d_cpu"):
        pytest.skip("the compiled CPU kernel is not built")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-c", _CHILD, which, json.dumps(stride)], capture_output=True, text=True,
                       timeout=120, env=env)
    assert p.returncode == 0, f"the kernel process ended with {p.returncode}: {p.stderr.strip()[-300:]}"
    res = json.loads(p.stdout.strip().splitlines()[-1])
    assert res["same"], "the kernel's output differs from F.conv2d's"
    assert res["grown_kb"] < 64 * 1024, f"peak memory grew by {res['grown_kb'] / 1024:.0f} MB for stride {stride}"
