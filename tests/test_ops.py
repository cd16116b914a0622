"""gated_conv2d against its reference: every CPU implementation, a grid of odd
shapes and every conv parameter, edge masks, dtypes, autograd, compile."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st, HealthCheck

import pydecouple
import pydecouple.isa
from pydecouple import gated_conv2d
from pydecouple._validate import normalize_conv_args
from tolerances import assert_matches_reference

CPU_BACKENDS = ["cpu", "reference", "dense"]

# The CPU kernel's instruction-set paths (pydecouple/isa.py): every path this
# machine has runs the whole grid in float32 and bfloat16; the others skip
# with the reason (so the summary says which paths were covered).
_PATH_INFO = pydecouple.isa.cpu_info()["paths"]
CPU_KERNEL_VARIANTS = [
    pytest.param(path, dtype, id=f"cpu-{path}-{str(dtype)[6:]}",
                 marks=pytest.mark.skipif(_PATH_INFO.get(path) is not None,
                                          reason=f"CPU path {path}: {_PATH_INFO.get(path)}"))
    for path in pydecouple.isa.PATHS for dtype in (torch.float32, torch.bfloat16)
]


def random_mask(kind: str, n: int, c: int) -> torch.Tensor:
    if kind == "all":
        return torch.ones(n, c, dtype=torch.bool)
    if kind == "none":
        return torch.zeros(n, c, dtype=torch.bool)
    if kind == "one":
        m = torch.zeros(n, c, dtype=torch.bool)
        m[torch.arange(n), torch.randint(0, c, (n,))] = True
        return m
    if kind == "first_last":  # the edges of the index range
        m = torch.zeros(n, c, dtype=torch.bool)
        m[:, 0] = True
        m[:, -1] = True
        return m
    return torch.rand(n, c) < torch.rand(n, 1)  # a different kept fraction per sample


def run_and_check(x, w, b, om, im, stride, padding, dilation, groups, relu=False, channels_last=False):
    xin = x.to(memory_format=torch.channels_last) if channels_last else x
    out = gated_conv2d(xin, w, b, om, im, stride, padding, dilation, groups, relu=relu)
    a = normalize_conv_args(x, w, b, om, im, stride, padding, dilation, groups)
    assert_matches_reference(out, x, w, b, om, im, a.stride, a.padding, a.dilation, groups, relu)
    return out


# (Cin, Cout, groups, kernel, stride, padding, dilation)
CONV_CASES = [
    (1, 1, 1, 3, 1, 1, 1),
    (3, 7, 1, 3, 1, 1, 1),
    (7, 3, 1, 3, 2, 1, 1),
    (7, 7, 7, 3, 1, 1, 1),        # depthwise
    (3, 6, 3, 3, 2, 0, 1),        # depthwise, multiplier 2
    (65, 65, 1, 1, 1, 0, 1),      # 1x1
    (65, 7, 1, 1, 2, 0, 1),       # strided 1x1 (ResNet downsample)
    (6, 9, 3, 3, 1, 2, 2),        # grouped, dilated
    (7, 65, 1, (1, 3), (2, 1), (0, 1), (1, 2)),
    (3, 7, 1, 5, 3, 2, 1),
    (4, 4, 2, (3, 2), 1, "same", (2, 1)),
    (5, 3, 1, 2, 1, "valid", 1),
]
SPATIAL = [(1, 1), (5, 5), (31, 31), (5, 8)]
# Batch 1 and 3 take the kernel's one-sample-at-a-time schedule, 5 its
# groups-of-samples schedule (at 2 threads).


def _fits(h, w, kernel, stride, padding, dilation):
    k = (kernel, kernel) if isinstance(kernel, int) else kernel
    d = (dilation, dilation) if isinstance(dilation, int) else dilation
    if padding == "same":
        return True
    p = (0, 0) if padding == "valid" else ((padding, padding) if isinstance(padding, int) else padding)
    return h + 2 * p[0] >= d[0] * (k[0] - 1) + 1 and w + 2 * p[1] >= d[1] * (k[1] - 1) + 1


GRID = [
    (case, hw, n)
    for case, hw, n in itertools.product(CONV_CASES, SPATIAL, (1, 3, 5))
    if _fits(hw[0], hw[1], case[3], case[4], case[5], case[6])
]


def _grid_case(case, hw, n, dtype=torch.float32):
    cin, cout, groups, kernel, stride, padding, dilation = case
    k = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = torch.randn(n, cin, *hw, dtype=dtype)
    w = torch.randn(cout, cin // groups, *k, dtype=dtype)
    b = torch.randn(cout, dtype=dtype)
    return x, w, b


@pytest.mark.parametrize("backend_name", ["reference", "dense"])
@pytest.mark.parametrize("case,hw,n", GRID, ids=lambda v: str(v).replace(" ", ""))
def test_grid_against_reference(backend, backend_name, case, hw, n):
    backend(backend_name)
    _check_grid_case(case, hw, n, torch.float32)


@pytest.mark.parametrize("path,dtype", CPU_KERNEL_VARIANTS)
@pytest.mark.parametrize("case,hw,n", GRID, ids=lambda v: str(v).replace(" ", ""))
def test_cpu_kernel_grid(backend, monkeypatch, path, dtype, case, hw, n):
    """The compiled CPU kernel on one instruction-set path, in one dtype."""
    backend("cpu")
    monkeypatch.setenv(pydecouple.isa.ENV_VAR, path)
    _check_grid_case(case, hw, n, dtype)


def _check_grid_case(case, hw, n, dtype):
    cin, cout, groups, kernel, stride, padding, dilation = case
    x, w, b = _grid_case(case, hw, n, dtype)
    for om_kind, im_kind in [("random", "random"), ("all", "all"), ("none", "random"), ("one", "one"),
                             ("random", "none"), ("first_last", "first_last")]:
        om, im = random_mask(om_kind, n, cout), random_mask(im_kind, n, cin)
        run_and_check(x, w, b, om, im, stride, padding, dilation, groups)
    # no masks, no bias, fused relu, channels_last
    run_and_check(x, w, None, None, None, stride, padding, dilation, groups)
    run_and_check(x, w, b, random_mask("random", n, cout), random_mask("random", n, cin), stride, padding, dilation,
                  groups, relu=True, channels_last=True)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_cpu_kernel_realistic_layer(backend, channels_last, relu):
    """A VGG-sized layer with a fixed kept count per sample (what models produce)."""
    backend("cpu")
    n, cin, cout, h = 4, 64, 96, 17
    x, w, b = torch.randn(n, cin, h, h), torch.randn(cout, cin, 3, 3) / 24, torch.randn(cout)
    om = torch.stack([torch.randperm(cout) < 40 for _ in range(n)])
    im = torch.stack([torch.randperm(cin) < 33 for _ in range(n)])
    out = run_and_check(x, w, b, om, im, 1, 1, 1, 1, relu=relu, channels_last=channels_last)
    if channels_last:
        assert out.is_contiguous(memory_format=torch.channels_last)


# Shapes that cut the GEMM engine's K dimension into blocks: (C, O, image,
# kernel) whose packed weights exceed its 256 KiB block budget per tap
# (channel ranges, with bfloat16 pairs straddling a range) or over all taps
# (tap ranges); batch 6 runs the groups-of-samples schedule, 1 the other.
DEEP_CASES = [(272, 288, 4, 3), (160, 200, 3, 3), (64, 130, 6, 3), (300, 70, 5, 1)]


@pytest.mark.parametrize("path,dtype", CPU_KERNEL_VARIANTS)
@pytest.mark.parametrize("cin,cout,hw,k", DEEP_CASES, ids=str)
@pytest.mark.parametrize("n", [1, 6])
def test_cpu_kernel_deep_layers(backend, monkeypatch, path, dtype, cin, cout, hw, k, n):
    backend("cpu")
    monkeypatch.setenv(pydecouple.isa.ENV_VAR, path)
    x = torch.randn(n, cin, hw, hw, dtype=dtype)
    w = (torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5).to(dtype)
    b = torch.randn(cout, dtype=dtype)
    om = torch.stack([torch.randperm(cout) < torch.randint(1, cout + 1, ()) for _ in range(n)])
    im = torch.stack([torch.randperm(cin) < torch.randint(1, cin + 1, ()) for _ in range(n)])
    for channels_last in (False, True):
        run_and_check(x, w, b, om, im, 1, k // 2, 1, 1, relu=True, channels_last=channels_last)


# Kept counts on both sides of the GEMM engine's 8-filter steps (a sample's
# kept filters are computed in a row padded to a multiple of 8: whole zmm
# vectors, then a ymm tail). Batch 9 runs the groups-of-samples schedule with
# one count per sample; batch 1 the one-sample schedule, whose ranges of kept
# filters end in an 8-filter range at 40 kept.
KEPT_COUNTS = [1, 7, 8, 9, 16, 17, 24, 25, 40]


@pytest.mark.parametrize("path,dtype", CPU_KERNEL_VARIANTS)
@pytest.mark.parametrize("k", [1, 3])
def test_cpu_kernel_kept_counts_around_the_8_filter_tail(backend, monkeypatch, path, dtype, k):
    backend("cpu")
    monkeypatch.setenv(pydecouple.isa.ENV_VAR, path)
    cin, cout, hw = 21, 40, 6
    w = (torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5).to(dtype)
    b = torch.randn(cout, dtype=dtype)

    def masks(counts, c):
        return torch.stack([torch.randperm(c) < kept for kept in counts])

    n = len(KEPT_COUNTS)
    x = torch.randn(n, cin, hw, hw, dtype=dtype)
    om, im = masks(KEPT_COUNTS, cout), masks([min(cin, 3 + 2 * i) for i in range(n)], cin)
    for channels_last in (False, True):
        run_and_check(x, w, b, om, im, 1, k // 2, 1, 1, relu=True, channels_last=channels_last)
    for kept in KEPT_COUNTS:
        run_and_check(x[:1], w, b, masks([kept], cout), None, 1, k // 2, 1, 1, channels_last=kept % 2 == 0)


@pytest.mark.parametrize("path,dtype", CPU_KERNEL_VARIANTS)
@pytest.mark.parametrize("k,cin", [(1, 24), (3, 24), (3, 9), (1, 9)])
def test_cpu_kernel_reads_a_fully_kept_nhwc_sample_in_place(backend, monkeypatch, path, dtype, k, cin):
    """A sample that keeps every input channel of an NHWC input in the
    compute type is read in place (no gathered copy). Mixed here with samples
    that keep fewer (gathered), in one batch, from a view whose samples are
    not adjacent in memory; an odd channel count in bfloat16 (pairs) and
    float32 take the gather and the in-place reading respectively."""
    backend("cpu")
    monkeypatch.setenv(pydecouple.isa.ENV_VAR, path)
    cout, hw, n = 19, 7, 5
    w = (torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5).to(dtype)
    b = torch.randn(cout, dtype=dtype)
    big = torch.randn(2 * n, cin, hw, hw, dtype=dtype).contiguous(memory_format=torch.channels_last)
    x = big[::2]  # every other sample: sample stride twice the sample size
    assert x.is_contiguous(memory_format=torch.channels_last) is False and x.stride()[1] == 1
    om = torch.rand(n, cout) < 0.6
    im = torch.ones(n, cin, dtype=torch.bool)
    im[1, : cin // 2] = False  # sample 1 gathers
    im[3, -1] = False          # so does sample 3 (one channel off)
    for in_mask in (im, None):
        out = gated_conv2d(x, w, b, om, in_mask, 1, k // 2, 1, 1, relu=True)
        xm = x * in_mask[:, :, None, None].to(dtype) if in_mask is not None else x
        a = normalize_conv_args(xm, w, b, om, in_mask, 1, k // 2, 1, 1)
        assert_matches_reference(out, xm.contiguous(), w, b, om, in_mask, a.stride, a.padding, a.dilation, 1, True)


def test_packed_weights_follow_in_place_changes(backend):
    """The kernel caches packed weights per weight tensor: an in-place change
    (a new version) must be seen, and a freed weight's cache entry must never
    serve a new tensor."""
    backend("cpu")
    x, w, b = torch.randn(2, 8, 6, 6), torch.randn(12, 8, 3, 3), torch.randn(12)
    om, im = random_mask("random", 2, 12), random_mask("random", 2, 8)
    run_and_check(x, w, b, om, im, 1, 1, 1, 1)
    with torch.no_grad():
        w.mul_(-2.0)  # same storage, new version
    run_and_check(x, w, b, om, im, 1, 1, 1, 1)
    for _ in range(3):  # new tensors, likely at a freed tensor's address
        w = torch.randn(12, 8, 3, 3)
        run_and_check(x, w, b, om, im, 1, 1, 1, 1)
    w2 = w.detach()  # an alias shares storage and version counter: the same entry
    run_and_check(x, w2, b, om, im, 1, 1, 1, 1)


def test_cpu_path_env_errors(backend, monkeypatch):
    backend("cpu")
    x, w = torch.randn(1, 3, 5, 5), torch.randn(2, 3, 3, 3)
    monkeypatch.setenv(pydecouple.isa.ENV_VAR, "sse2")
    with pytest.raises(RuntimeError, match=r"PYDECOUPLE_CPU_ISA must be one of amx, onednn, avx512, avx2, generic; "
                                           r"got 'sse2'"):
        gated_conv2d(x, w, None, torch.ones(1, 2, dtype=torch.bool))
    missing = [p for p, why in _PATH_INFO.items() if why is not None]
    if missing:
        monkeypatch.setenv(pydecouple.isa.ENV_VAR, missing[0])
        with pytest.raises(RuntimeError, match=rf"PYDECOUPLE_CPU_ISA={missing[0]} was requested but cannot run here"):
            gated_conv2d(x, w, None, torch.ones(1, 2, dtype=torch.bool))


def test_info_names_the_path_in_use(monkeypatch):
    info = pydecouple.isa.cpu_info()
    assert info["path"] in pydecouple.isa.available_paths()
    assert info["paths"]["generic"] is None
    monkeypatch.setenv(pydecouple.isa.ENV_VAR, "generic")
    assert pydecouple.isa.current_path() == "generic"


# float16 is widened to float32 on every CPU path (bfloat16 runs the whole
# grid above); float64 is the reference's (test_float64_is_served_by_reference).
@pytest.mark.parametrize("backend_name,dtype", [
    ("cpu", torch.bfloat16), ("cpu", torch.float16),
    ("reference", torch.bfloat16), ("reference", torch.float16), ("reference", torch.float64),
])
def test_dtypes(backend, backend_name, dtype):
    backend(backend_name)
    x, w, b = torch.randn(2, 7, 9, 9, dtype=dtype), torch.randn(5, 7, 3, 3, dtype=dtype), torch.randn(5, dtype=dtype)
    run_and_check(x, w, b, random_mask("random", 2, 5), random_mask("random", 2, 7), 1, 1, 1, 1)


def test_float64_is_served_by_reference():
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    assert pydecouple._backend.choose(x, None, None, None, 1) == "reference"


def test_unbatched_input():
    x, w, b = torch.randn(5, 6, 7), torch.randn(4, 5, 3, 3), torch.randn(4)
    om, im = torch.tensor([True, False, True, True]), torch.tensor([True, True, False, True, False])
    out = gated_conv2d(x, w, b, om, im, padding=1)
    assert out.shape == (4, 6, 7)
    expect = gated_conv2d(x[None], w, b, om[None], im[None], padding=1)[0]
    torch.testing.assert_close(out, expect)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_nan_and_inf(backend, backend_name):
    """NaN/inf in kept channels propagate as in dense conv; in channels that are off they are ignored."""
    backend(backend_name)
    x, w = torch.randn(2, 4, 6, 6), torch.randn(3, 4, 3, 3)
    x[0, 1, 2, 2] = float("nan")
    x[1, 2, 3, 3] = float("inf")
    im = torch.tensor([[True, False, True, True], [True, True, False, True]])  # both poisoned channels off
    out = gated_conv2d(x, w, None, None, im, padding=1)
    assert torch.isfinite(out).all()
    im_on = torch.ones(2, 4, dtype=torch.bool)
    out = gated_conv2d(x, w, None, None, im_on, padding=1)
    dense = F.conv2d(x, w, padding=1)
    assert torch.equal(torch.isnan(out), torch.isnan(dense))
    assert torch.equal(torch.isinf(out), torch.isinf(dense))


def test_dispatch_prefers_dense_when_everything_is_kept(monkeypatch):
    monkeypatch.delenv("PYDECOUPLE_BACKEND", raising=False)
    x, w = torch.randn(2, 8, 5, 5), torch.randn(8, 8, 3, 3)
    full = torch.ones(2, 8, dtype=torch.bool)
    half = torch.arange(8).expand(2, 8) < 4
    assert pydecouple._backend.choose(x, w, None, None, 1) == "dense"
    assert pydecouple._backend.choose(x, w, full, full, 1) == "dense"
    if pydecouple.extension_available():
        assert pydecouple._backend.choose(x, w, half, half, 1) == "cpu"
    # At a larger batch the crossover is lower: 0.875 * 0.875 kept runs dense, 0.5 * 0.5 the kernel
    # (a 128-filter layer on 8x8 images: gating_threshold 0.45).
    xb, wb = torch.randn(32, 128, 8, 8), torch.randn(128, 128, 3, 3)
    most = torch.arange(128).expand(32, 128) < 112
    halfb = torch.arange(128).expand(32, 128) < 64
    assert pydecouple._backend.choose(xb, wb, most, most, 1) == "dense"
    if pydecouple.extension_available():
        assert pydecouple._backend.choose(xb, wb, halfb, halfb, 1) == "cpu"
    # A layer of 8 filters at batch 32: a sample's kept filters fill less than one vector, dense at 0.25 too.
    x8 = torch.randn(32, 8, 5, 5)
    half8 = torch.arange(8).expand(32, 8) < 4
    assert pydecouple._backend.choose(x8, w, half8, half8, 1) == "dense"


def test_dense_fallback_skips_masks_that_are_all_on():
    """The dense route does not copy x or the output for all-on masks, and still zeroes what is off."""
    x, w, b = torch.randn(2, 4, 6, 6), torch.randn(3, 4, 3, 3), torch.randn(3)
    full_in, full_out = torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool)
    out = pydecouple._backend.run_dense(x, w, b, full_out, full_in, (1, 1), (1, 1, 1, 1), (1, 1), 1, False)
    torch.testing.assert_close(out, F.conv2d(x, w, b, padding=1))
    om = full_out.clone()
    om[1, 2] = False
    out = pydecouple._backend.run_dense(x, w, b, om, full_in, (1, 1), (0, 1, 2, 0), (1, 1), 1, True)
    assert torch.all(out[1, 2] == 0)


def test_forced_backend_that_cannot_run_is_an_error(backend):
    backend("cuda")
    x, w = torch.randn(1, 3, 5, 5), torch.randn(2, 3, 3, 3)
    with pytest.raises(RuntimeError, match=r"PYDECOUPLE_BACKEND=cuda was requested but cannot run: .*CUDA"):
        gated_conv2d(x, w)


def test_unknown_backend_name(backend):
    backend("fastest")
    with pytest.raises(ValueError, match=r"PYDECOUPLE_BACKEND must be one of .* got 'fastest'"):
        gated_conv2d(torch.randn(1, 3, 5, 5), torch.randn(2, 3, 3, 3))


def test_explain_lists_every_backend():
    reasons = dict(pydecouple.explain_backends(torch.randn(1, 3, 4, 4)))
    assert set(reasons) == {"reference", "dense", "cpu", "triton", "cuda"}
    assert reasons["reference"] is None
    assert "CUDA" in reasons["cuda"] or "extension" in reasons["cuda"]


# ----------------------------------------------------------------------------- autograd


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("groups,stride,padding,dilation", [(1, 1, 1, 1), (2, 2, (1, 0), 1), (1, 1, "same", 2)])
def test_gradcheck_float64(relu, groups, stride, padding, dilation):
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4 // groups, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    om, im = random_mask("random", 2, 6), random_mask("random", 2, 4)
    fn = lambda x, w, b: gated_conv2d(x, w, b, om, im, stride, padding, dilation, groups, relu=relu)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-5)


def test_gradients_match_dense_masked_formula(backend):
    """float32 gradients through the cpu forward equal autograd of the formula."""
    backend("cpu")
    x = torch.randn(3, 8, 9, 9, requires_grad=True)
    w = torch.randn(10, 8, 3, 3, requires_grad=True)
    b = torch.randn(10, requires_grad=True)
    om, im = random_mask("random", 3, 10), random_mask("random", 3, 8)
    out = gated_conv2d(x, w, b, om, im, padding=1, relu=True)
    g = torch.randn_like(out)
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), g)
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    ref = torch.relu(F.conv2d(x2 * im[:, :, None, None], w2, b2, padding=1)) * om[:, :, None, None]
    rx, rw, rb = torch.autograd.grad(ref, (x2, w2, b2), g)
    for a, r in ((gx, rx), (gw, rw), (gb, rb)):
        torch.testing.assert_close(a, r, atol=1e-3, rtol=1e-4)


def test_opcheck():
    x, w, b = torch.randn(2, 5, 7, 6), torch.randn(4, 5, 3, 3), torch.randn(4)
    om, im = random_mask("random", 2, 4), random_mask("random", 2, 5)
    for args in [
        (x, w, b, om, im, [1, 1], [1, 1, 1, 1], [1, 1], 1, False),
        (x, w, None, None, im, [2, 1], [0, 1, 2, 0], [1, 2], 1, True),
        (x.double(), w.double(), b.double(), om, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, False),
    ]:
        torch.library.opcheck(torch.ops.pydecouple.gated_conv2d.default, args)


@pytest.mark.parametrize("channels_last", [False, True])
def test_compile_fullgraph_no_recompile_when_masks_change(channels_last):
    import torch._dynamo

    torch._dynamo.reset()
    x, w, b = torch.randn(2, 6, 8, 8), torch.randn(5, 6, 3, 3), torch.randn(5)
    if channels_last:  # the fake must promise the layout the kernels return
        x = x.to(memory_format=torch.channels_last)

    @torch.compile(fullgraph=True, dynamic=False)
    def f(x, om, im):
        return torch.relu(gated_conv2d(x, w, b, om, im, padding=1)) + 1

    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(4):
            om, im = random_mask("random", 2, 5), random_mask("random", 2, 6)
            out = f(x, om, im)
            expect = torch.relu(gated_conv2d(x, w, b, om, im, padding=1)) + 1
            torch.testing.assert_close(out, expect)


# ----------------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 3),
    cin_g=st.integers(1, 9),
    cout_g=st.integers(1, 9),
    groups=st.integers(1, 3),
    kh=st.integers(1, 4),
    kw=st.integers(1, 4),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    sh=st.integers(1, 3),
    sw=st.integers(1, 3),
    ph=st.integers(0, 2),
    pw=st.integers(0, 2),
    dh=st.integers(1, 3),
    dw=st.integers(1, 3),
    relu=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_cpu_matches_reference(n, cin_g, cout_g, groups, kh, kw, h, w, sh, sw, ph, pw, dh, dw, relu, seed):
    import os

    if h + 2 * ph < dh * (kh - 1) + 1 or w + 2 * pw < dw * (kw - 1) + 1:
        return  # F.conv2d rejects this too (tested in test_errors)
    gen = torch.Generator().manual_seed(seed)
    cin, cout = cin_g * groups, cout_g * groups
    x = torch.randn(n, cin, h, w, generator=gen)
    wt = torch.randn(cout, cin_g, kh, kw, generator=gen)
    b = torch.randn(cout, generator=gen)
    om = torch.rand(n, cout, generator=gen) < 0.6
    im = torch.rand(n, cin, generator=gen) < 0.6
    old = os.environ.get("PYDECOUPLE_BACKEND")
    os.environ["PYDECOUPLE_BACKEND"] = "cpu" if pydecouple.extension_available() else "reference"
    try:
        run_and_check(x, wt, b, om, im, (sh, sw), (ph, pw), (dh, dw), groups, relu=relu)
    finally:
        if old is None:
            os.environ.pop("PYDECOUPLE_BACKEND")
        else:
            os.environ["PYDECOUPLE_BACKEND"] = old


def test_extension_is_built():
    """make test builds the extension; its absence would hide the kernel from every test above."""
    assert pydecouple.extension_available(), pydecouple._backend._extension_error


def test_eager_fast_path_equals_registered_op():
    """Eager calls without autograd skip the registered op's wrapper; the result is the op's."""
    x, w, b = torch.randn(3, 6, 9, 9), torch.randn(8, 6, 3, 3), torch.randn(8)
    om, im = random_mask("random", 3, 8), random_mask("random", 3, 6)
    fast = gated_conv2d(x, w, b, om, im, padding=1, relu=True)
    via_op = torch.ops.pydecouple.gated_conv2d(x, w, b, om, im, [1, 1], [1, 1, 1, 1], [1, 1], 1, True)
    assert torch.equal(fast, via_op)
    xg = x.clone().requires_grad_()
    out = gated_conv2d(xg, w, b, om, im, padding=1, relu=True)
    assert out.grad_fn is not None, "with a tensor that requires grad the registered op (and its autograd) must run"
    assert torch.equal(out.detach(), via_op)
