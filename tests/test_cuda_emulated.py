"""The CUDA C++ kernels, run on CPU threads, against the reference.

``csrc/cuda/kernels/gated_conv2d.cu`` is compiled with g++ as C++ with
``tests/cuda_emulation/cuda_emulation.h`` force-included: a CUDA block becomes
blockDim std::threads, ``__shared__`` a static, ``__syncthreads`` a barrier,
the warp ballot and shuffle an exchange through the block. What this checks
on a machine without a GPU: the index arithmetic, the gathers through the
index lists, the tiling and its edges, the early exits, the epilogue, the
layouts (NCHW and channels_last strides) and the mask-to-index scan kernel.
Two builds: one where float16/bfloat16 take the FMA path (as below sm_80),
one with a software WMMA (``PYDECOUPLE_CUDA_EMULATION_WMMA``) so the
tensor-core path's tile addressing and layouts run too. What it does not
check: the hardware WMMA itself, timing-dependent races, anything about speed.
The ATen glue is mirrored in Python below (``_forward``).

Skipped, with the reason, where g++ (C++20) or the CUDA headers are missing.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from tolerances import assert_matches_reference

from pydecouple.ops import masks_to_indices

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "csrc/cuda/kernels/gated_conv2d.cu", ROOT / "csrc/cuda/kernels/gated_conv2d.cuh",
           ROOT / "tests/cuda_emulation/cuda_emulation.h", ROOT / "tests/cuda_emulation/harness.cpp"]
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _cuda_include():
    candidates = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, str(Path(os.path.realpath(nvcc)).parents[1]))
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_bf16.h").exists():
            return str(Path(c) / "include")
    return None


def _build(wmma: bool):
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    inc = _cuda_include()
    if cxx is None:
        pytest.skip("no C++ compiler (g++) to build the CPU emulation of the CUDA kernels")
    if inc is None:
        pytest.skip("no CUDA headers found (cuda_bf16.h under $CUDA_HOME, nvcc's or /usr/local/cuda include)")
    digest = hashlib.sha1(b"".join(p.read_bytes() for p in SOURCES) + bytes([wmma])).hexdigest()[:12]
    out_dir = ROOT / "build" / "cuda_emulation"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "gated_conv2d_emu_wmma" if wmma else "gated_conv2d_emu_fma"
    so = out_dir / f"{stem}_{digest}.so"
    if not so.exists():
        cmd = [cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-w", f"-I{inc}",
               *(["-DPYDECOUPLE_CUDA_EMULATION_WMMA"] if wmma else []),
               "-include", str(ROOT / "tests/cuda_emulation/cuda_emulation.h"), "-x", "c++",
               str(ROOT / "tests/cuda_emulation/harness.cpp"), "-o", str(so) + ".tmp"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            if "c++20" in proc.stderr or "<barrier>" in proc.stderr:
                pytest.skip(f"{cxx} lacks C++20 (std::barrier): {proc.stderr[-300:]}")
            pytest.fail("building the CPU emulation failed:\n" + " ".join(cmd) + "\n" + proc.stderr[-4000:])
        os.replace(str(so) + ".tmp", so)
        for stale in out_dir.glob(f"{stem}_*.so"):
            if stale != so:
                stale.unlink(missing_ok=True)
    dll = ctypes.CDLL(str(so))
    dll.emu_masks_to_indices.restype = ctypes.c_char_p
    dll.emu_gated_conv2d_forward.restype = ctypes.c_char_p
    dll.emu_uses_direct_kernel.restype = ctypes.c_int
    return dll


@pytest.fixture(scope="module")
def lib():
    return _build(wmma=False)


@pytest.fixture(scope="module")
def lib_wmma():
    return _build(wmma=True)


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def _masks_to_indices(lib, mask, rows, cols):
    m = mask.reshape(rows, cols).contiguous().view(torch.uint8)
    idx = torch.full((rows, cols), -7, dtype=torch.int32)
    cnt = torch.full((rows,), -7, dtype=torch.int32)
    err = lib.emu_masks_to_indices(_ptr(m), rows, cols, _ptr(idx), _ptr(cnt))
    assert err is None, err.decode()
    return idx, cnt


def _forward(lib, x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups, relu):
    """What csrc/cuda/gated_conv2d_cuda.cu does around the launcher, in Python."""
    n, cin, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape
    cout_g = cout // groups
    ho = (h + padding[0] + padding[1] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + padding[2] + padding[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    out = torch.full((n, cout, ho, wo), float("nan"), dtype=x.dtype)  # poisoned: every element must be written
    if cl:
        out = out.contiguous(memory_format=torch.channels_last)
    keep = []  # tensors whose pointers the launcher reads
    w_p = w_oihw = in_idx = in_cnt = out_idx = out_cnt = in_m = out_idx_all = out_cnt_all = None
    if lib.emu_uses_direct_kernel(cin_g, cout_g, groups):
        w_oihw = weight.contiguous()
        if out_mask is not None:
            out_idx_all, out_cnt_all = _masks_to_indices(lib, out_mask, n, cout)
        if in_mask is not None:
            in_m = in_mask.contiguous().view(torch.uint8)
    else:
        w_p = weight.permute(2, 3, 1, 0).contiguous()
        if out_mask is not None:
            out_idx, out_cnt = _masks_to_indices(lib, out_mask, n * groups, cout_g)
        if in_mask is not None:
            in_idx, in_cnt = _masks_to_indices(lib, in_mask, n * groups, cin_g)
    b = bias.contiguous() if bias is not None else None
    keep += [w_p, w_oihw, b]
    sizes = torch.tensor([n, cin, h, w, cout, kh, kw, ho, wo, groups, stride[0], stride[1], padding[0], padding[2],
                          dilation[0], dilation[1], int(relu), DTYPE_CODES[x.dtype]], dtype=torch.int64)
    sx = torch.tensor(x.stride(), dtype=torch.int64)
    so = torch.tensor(out.stride(), dtype=torch.int64)
    err = lib.emu_gated_conv2d_forward(_ptr(x), _ptr(w_p), _ptr(w_oihw), _ptr(b), _ptr(out), _ptr(in_idx),
                                       _ptr(in_cnt), _ptr(out_idx), _ptr(out_cnt), _ptr(in_m), _ptr(out_idx_all),
                                       _ptr(out_cnt_all), _ptr(sizes), _ptr(sx), _ptr(so))
    assert err is None, err.decode()
    return out


# name: (n, cin, cout, (h, w), (kh, kw), stride, (top, bottom, left, right), dilation, groups)
SHAPES = {
    "3x3_odd_c7_c33": (2, 7, 33, (5, 6), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    "c65_two_kblocks_multi_mtile": (2, 65, 70, (9, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1),
    "stride2_asym_pad_rect": (2, 9, 18, (9, 7), (3, 2), (2, 1), (2, 0, 1, 1), (1, 1), 1),
    "dilation2": (2, 20, 24, (8, 8), (3, 3), (1, 1), (2, 2, 2, 2), (2, 2), 1),
    "1x1_h1": (3, 20, 24, (1, 5), (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1),
    "groups2_gemm": (2, 32, 48, (5, 5), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2),
    "depthwise": (3, 12, 12, (6, 5), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 12),
    "depthwise_multiplier_5x5": (2, 6, 12, (7, 6), (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 6),
    "thin_groups3": (2, 12, 9, (5, 4), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 3),
}


def _problem(shape, dtype, kind, channels_last, seed, bias=True):
    n, cin, cout, (h, w), (kh, kw), stride, padding, dilation, groups = shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=gen).to(dtype)
    weight = (torch.randn(cout, cin // groups, kh, kw, generator=gen) / (cin // groups * kh * kw) ** 0.5).to(dtype)
    b = torch.randn(cout, generator=gen).to(dtype) if bias else None
    if kind == "none":
        om = im = None
    else:
        om = torch.rand(n, cout, generator=gen) < 0.5
        im = torch.rand(n, cin, generator=gen) < 0.5
        if kind == "mixed":
            om[0], im[0] = False, False
            if n > 1:
                om[1], im[1] = True, True
            if n > 2:
                om[2], im[2] = False, False
                om[2, cout - 1], im[2, 0] = True, True
        garbage = torch.tensor([float("nan"), float("inf")], dtype=dtype)[torch.randint(2, x.shape, generator=gen)]
        x = torch.where(im[:, :, None, None], x, garbage)  # off channels must never be read
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return (x, weight, b, om, im, stride, padding, dilation, groups, True)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_cuda_kernels_emulated_match_reference(lib, shape, layout):
    for i, (dtype, kind) in enumerate([(torch.float32, "mixed"), (torch.bfloat16, "random"),
                                       (torch.float16, "none")]):
        args = _problem(SHAPES[shape], dtype, kind, layout == "channels_last", seed=i)
        out = _forward(lib, *args)
        assert torch.isfinite(out).all(), f"{dtype}/{kind}: {(~torch.isfinite(out)).sum().item()} non-finite"
        assert_matches_reference(out, *args)
        if layout == "channels_last":
            assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", ["3x3_odd_c7_c33", "c65_two_kblocks_multi_mtile", "stride2_asym_pad_rect",
                                   "groups2_gemm"])
def test_cuda_kernels_emulated_wmma_path(lib_wmma, shape, layout):
    """float16 / bfloat16 through the tensor-core code (software WMMA)."""
    for i, (dtype, kind) in enumerate([(torch.bfloat16, "mixed"), (torch.float16, "random")]):
        args = _problem(SHAPES[shape], dtype, kind, layout == "channels_last", seed=10 + i)
        out = _forward(lib_wmma, *args)
        assert torch.isfinite(out).all(), f"{dtype}/{kind}: {(~torch.isfinite(out)).sum().item()} non-finite"
        assert_matches_reference(out, *args)


def test_cuda_kernels_emulated_no_bias_no_relu(lib):
    x, weight, _, om, im, stride, padding, dilation, groups, _ = _problem(
        SHAPES["3x3_odd_c7_c33"], torch.float32, "random", False, seed=3, bias=False)
    args = (x, weight, None, om, im, stride, padding, dilation, groups, False)
    assert_matches_reference(_forward(lib, *args), *args)


@pytest.mark.parametrize("rows,cols", [(1, 1), (3, 7), (4, 256), (5, 300), (2, 1000), (6, 33)])
def test_masks_to_indices_kernel_emulated(lib, rows, cols):
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    mask = torch.rand(rows, cols, generator=gen) < 0.4
    mask[0] = False
    if rows > 1:
        mask[1] = True
    idx, cnt = _masks_to_indices(lib, mask, rows, cols)
    want_idx, want_cnt = masks_to_indices(mask)
    assert torch.equal(cnt, want_cnt)
    assert torch.equal(idx, want_idx)
