"""GPU tests of the Triton and CUDA C++ backends (``pytest -m gpu``).

Skipped, with the reason, where no CUDA GPU is found. What they check:

- every dtype (float32, float16, bfloat16), NCHW and channels_last, a grid of
  shapes with odd channel counts, strides, asymmetric padding, dilation, groups
  and depthwise, batch 1, and masks that mix all-off, all-on, single-channel and
  random samples; input channels that are off hold NaN/inf;
- outputs poisoned with NaN before each call (the Triton launcher writes into a
  poisoned tensor, the CUDA op's output reuses a freed NaN-filled block of the
  caching allocator), so an element a kernel forgets to write fails the test;
- error against a float64 reference within the project's tolerance table
  (tests/tolerances.py: float32 atol/rtol, 16-bit at most twice PyTorch's own
  error plus a floor), with TF32 off for the grid (float32 is then exact
  float32) and one TF32 test with its own bound;
- capture in a CUDA graph, then replay with new masks and inputs;
- ``torch.compile(fullgraph=True)``: one compilation across different masks;
- new masks never re-tune or recompile the Triton kernel.

``PYDECOUPLE_GPU_TEST_DEVICE=cpu`` with ``TRITON_INTERPRET=1`` runs the Triton
part on CPU tensors (a slow self-check of this file; the graph and compile
tests skip).
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch
from tolerances import assert_matches_reference

import pydecouple
from pydecouple import _backend
from pydecouple.reference import gated_conv2d_reference

DEVICE = os.environ.get("PYDECOUPLE_GPU_TEST_DEVICE", "cuda")


def _module_skip_reason():
    if DEVICE == "cuda" and not torch.cuda.is_available():
        return "no CUDA GPU found (torch.cuda.is_available() is False; torch " + torch.__version__ + \
            (", a CPU-only build" if torch.version.cuda is None else "") + ")"
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "PYDECOUPLE_GPU_TEST_DEVICE=cpu needs TRITON_INTERPRET=1 (set before Triton is imported)"
    return None


pytestmark = [pytest.mark.gpu]
if _module_skip_reason():
    pytestmark.append(pytest.mark.skip(reason=_module_skip_reason()))

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BACKENDS = ("triton", "cuda")

# float32 through TF32 tensor cores (PyTorch's default for convolutions):
# relative to max(1, max |reference|), or twice cuDNN's own TF32 error.
TOL_TF32 = 4e-3

# name: (n, cin, cout, (h, w), (kh, kw), stride, (top, bottom, left, right), dilation, groups)
SHAPES = {
    "3x3_c64_14x14": (4, 64, 96, (14, 14), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    "odd_c7_c65_stride2_asym_pad": (4, 7, 65, (9, 11), (3, 3), (2, 2), (1, 0, 2, 1), (1, 1), 1),
    "c130_dilation2": (4, 130, 70, (12, 10), (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 1),
    "1x1_c256_c128": (4, 256, 128, (7, 7), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),
    "1x1_stride2": (4, 64, 128, (9, 9), (1, 1), (2, 2), (0, 0, 0, 0), (1, 1), 1),
    "7x7_stem_c3": (4, 3, 64, (32, 32), (7, 7), (2, 2), (3, 3, 3, 3), (1, 1), 1),
    "groups2": (4, 64, 64, (8, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2),
    "depthwise_c32": (4, 32, 32, (10, 10), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 32),
    "batch1_h31": (1, 17, 33, (31, 5), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
}


# ----------------------------------------------------------------------------- helpers


def _require(backend: str):
    why = _backend.BACKENDS[backend].why_not(torch.empty(1, device=DEVICE))
    if why is not None:
        pytest.skip(f"the {backend} backend cannot run here: {why}")


def _require_cuda_device(what: str):
    if DEVICE != "cuda":
        pytest.skip(f"{what} needs a CUDA device (PYDECOUPLE_GPU_TEST_DEVICE={DEVICE})")


def _masks(n, cin, cout, kind, gen):
    if kind == "none":
        return None, None
    om = torch.rand(n, cout, generator=gen) < 0.5
    im = torch.rand(n, cin, generator=gen) < 0.5
    if kind == "mixed":  # sample 0 all off, 1 all on, 2 a single channel, the rest random
        om[0], im[0] = False, False
        if n > 1:
            om[1], im[1] = True, True
        if n > 2:
            om[2], im[2] = False, False
            om[2, cout // 2], im[2, cin - 1] = True, True
    return om.to(DEVICE), im.to(DEVICE)


def _problem(shape, dtype, kind="mixed", channels_last=False, bias=True, relu=True, seed=0):
    n, cin, cout, (h, w), (kh, kw), stride, padding, dilation, groups = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=gen)
    weight = torch.randn(cout, cin // groups, kh, kw, generator=gen) / (cin // groups * kh * kw) ** 0.5
    b = torch.randn(cout, generator=gen) if bias else None
    om, im = _masks(n, cin, cout, kind, gen)
    x = x.to(DEVICE, dtype)
    if im is not None:  # channels that are off hold garbage the kernel must never read
        garbage = torch.tensor([float("nan"), float("inf")], device=DEVICE, dtype=dtype)[
            torch.randint(2, x.shape, generator=gen).to(DEVICE)]
        x = torch.where(im[:, :, None, None], x, garbage)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = weight.to(DEVICE, dtype)
    b = b.to(DEVICE, dtype) if b is not None else None
    return (x, weight, b, om, im, stride, padding, dilation, groups, relu)


@pytest.fixture(autouse=True)
def _no_tf32():
    """Exact float32 (no TF32) unless a test turns it on: the table's float32 bounds."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _reference64(args):
    x, weight, b, om, im, stride, padding, dilation, groups, relu = args
    return gated_conv2d_reference(x.double(), weight.double(), b.double() if b is not None else None, om, im,
                                  stride, padding, dilation, groups, relu)


def _poison_allocator(like: torch.Tensor):
    """Leave a freed NaN-filled block of the output's size in the caching allocator."""
    if like.device.type == "cuda":
        t = torch.full((like.numel(),), float("nan"), dtype=like.dtype, device=like.device)
        del t


def _run(backend, args, ref64):
    if backend == "triton":
        from pydecouple.kernels.gated_conv2d import gated_conv2d_fwd

        # A small fixed tile: no autotuning per shape in this grid (the
        # autotuned path has its own tests below); the output starts as NaN.
        poisoned = torch.full(ref64.shape, float("nan"), dtype=args[0].dtype, device=DEVICE)
        if args[0].dim() == 4 and not args[0].is_contiguous() and \
                args[0].is_contiguous(memory_format=torch.channels_last):
            poisoned = poisoned.contiguous(memory_format=torch.channels_last)
        return gated_conv2d_fwd(*args, out=poisoned,
                                config={"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4,
                                        "num_stages": 3})
    _poison_allocator(ref64.to(args[0].dtype))
    return _backend.BACKENDS[backend].run(*args)


def _check(out, args, ref64, label):
    x = args[0]
    assert out.dtype == x.dtype and tuple(out.shape) == tuple(ref64.shape), label
    assert torch.isfinite(out).all(), f"{label}: {(~torch.isfinite(out)).sum().item()} non-finite outputs"
    try:
        assert_matches_reference(out, *args)
    except AssertionError as e:
        raise AssertionError(f"{label}: {e}") from None


# ----------------------------------------------------------------------------- correctness grid


# float16 runs the code of bfloat16 with another element type: a few shapes suffice
# (every case costs Triton compilations, and gpu_check.sh has six minutes).
GRID = [(dtype, shape, layout) for dtype in DTYPES for shape in SHAPES for layout in ("nchw", "channels_last")
        if dtype != "float16" or shape in ("odd_c7_c65_stride2_asym_pad", "groups2", "depthwise_c32")]


@pytest.mark.parametrize("dtype,shape,layout", GRID)
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference(backend, dtype, shape, layout):
    _require(backend)
    args = _problem(SHAPES[shape], DTYPES[dtype], "mixed", channels_last=layout == "channels_last",
                    seed=zlib.crc32(f"{shape}/{dtype}/{layout}".encode()))
    ref64 = _reference64(args)
    out = _run(backend, args, ref64)
    _check(out, args, ref64, f"{backend}/{dtype}/{shape}/{layout}")
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last), "channels_last in, channels_last out"


@pytest.mark.parametrize("kind", ["none", "random"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_kinds_no_bias_no_relu(backend, dtype, kind):
    _require(backend)
    for i, shape in enumerate(("3x3_c64_14x14", "depthwise_c32")):
        args = _problem(SHAPES[shape], DTYPES[dtype], kind, bias=False, relu=False, seed=100 + i)
        ref64 = _reference64(args)
        _check(_run(backend, args, ref64), args, ref64, f"{backend}/{dtype}/{shape}/{kind}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_through_the_op_autotuned(backend, monkeypatch):
    """The public op with PYDECOUPLE_BACKEND forcing each backend (Triton autotunes here)."""
    _require(backend)
    monkeypatch.setenv("PYDECOUPLE_BACKEND", backend)
    for dtype in (torch.bfloat16, torch.float32):
        args = _problem(SHAPES["3x3_c64_14x14"], dtype, "mixed", channels_last=True, seed=7)
        x, weight, b, om, im, stride, padding, dilation, groups, relu = args
        ref64 = _reference64(args)
        out = pydecouple.gated_conv2d(x, weight, b, om, im, stride, 1, dilation, groups, relu=relu)
        _check(out, args, ref64, f"op/{backend}/{dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_tf32(backend):
    """PyTorch's default for float32 convolutions: TF32 tensor cores (Triton follows cudnn.allow_tf32)."""
    _require_cuda_device("TF32")
    _require(backend)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    for shape in ("3x3_c64_14x14", "c130_dilation2"):
        args = _problem(SHAPES[shape], torch.float32, "mixed", channels_last=True, seed=5)
        ref64 = _reference64(args)
        out = _run(backend, args, ref64)
        assert torch.isfinite(out).all()
        cudnn_err = (gated_conv2d_reference(*args).double() - ref64).abs().max().item()
        err = (out.double() - ref64).abs().max().item()
        bound = max(TOL_TF32 * max(1.0, ref64.abs().max().item()), 2 * cudnn_err)
        assert err <= bound, f"{backend}/{shape}: TF32 error {err:.3e} > {bound:.3e}"


def test_new_masks_do_not_retune_or_recompile():
    _require("triton")
    from pydecouple.kernels import gated_conv2d as k

    def compiled_variants():
        caches = getattr(k._gated_conv2d_fwd_kernel, "device_caches", None)
        if not caches:
            return None
        return sum(len(v[0]) for v in caches.values())

    args = _problem(SHAPES["3x3_c64_14x14"], torch.bfloat16, "random", channels_last=True, seed=1)
    k.gated_conv2d_triton(*args)
    tuned, variants = len(k._gated_conv2d_fwd_tuned.cache), compiled_variants()
    for seed in range(2, 6):
        args = _problem(SHAPES["3x3_c64_14x14"], torch.bfloat16, "random", channels_last=True, seed=seed)
        ref64 = _reference64(args)
        _check(k.gated_conv2d_triton(*args), args, ref64, f"seed {seed}")
    assert len(k._gated_conv2d_fwd_tuned.cache) == tuned, "a new mask triggered autotuning"
    if variants is not None:
        assert compiled_variants() == variants, "a new mask triggered a recompilation"


# ----------------------------------------------------------------------------- CUDA graphs, torch.compile


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_capture_and_replay_with_new_masks(backend, monkeypatch):
    _require_cuda_device("CUDA graph capture")
    _require(backend)
    monkeypatch.setenv("PYDECOUPLE_BACKEND", backend)
    x, weight, b, om, im, stride, padding, dilation, groups, relu = _problem(
        SHAPES["3x3_c64_14x14"], torch.bfloat16, "random", channels_last=True, seed=11)
    x = torch.nan_to_num(x)  # replaced below; the static buffer must stay finite for the refill

    def step():
        return pydecouple.gated_conv2d(x, weight, b, om, im, stride, 1, dilation, groups, relu=relu)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up outside the capture: autotuning, compilation, workspaces
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    gen = torch.Generator().manual_seed(12)
    for trial in range(3):
        om.copy_(torch.rand(om.shape, generator=gen) < (0.25 + 0.25 * trial))
        im.copy_(torch.rand(im.shape, generator=gen) < (0.75 - 0.25 * trial))
        x.copy_(torch.randn(x.shape, generator=gen).to(x.dtype))
        graph.replay()
        torch.cuda.synchronize()
        args = (x, weight, b, om, im, stride, padding, dilation, groups, relu)
        _check(out.clone(), args, _reference64(args), f"graph replay {trial} ({backend})")


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_one_compilation(backend, layout, monkeypatch):
    _require_cuda_device("torch.compile on the GPU")
    _require(backend)
    from torch._dynamo.testing import CompileCounterWithBackend

    monkeypatch.setenv("PYDECOUPLE_BACKEND", backend)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")

    @torch.compile(fullgraph=True, dynamic=False, backend=counter)
    def block(x, weight, b, om, im):
        return pydecouple.gated_conv2d(x, weight, b, om, im, padding=1, relu=True) * 2.0

    for seed in range(3):
        x, weight, b, om, im, stride, padding, dilation, groups, relu = _problem(
            SHAPES["3x3_c64_14x14"], torch.bfloat16, "random", channels_last=layout == "channels_last",
            seed=20 + seed)
        out = block(x, weight, b, om, im)
        args = (x, weight, b, om, im, stride, padding, dilation, groups, relu)
        _check(out / 2.0, args, _reference64(args), f"compiled {backend}, seed {seed}")
    assert counter.frame_count == 1, f"{counter.frame_count} compilations for 3 different masks"
