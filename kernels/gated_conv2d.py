"""Triton kernels for ``gated_conv2d``: channel-gated implicit-GEMM convolution.

Layering: kernels ``_gated_conv2d_fwd_kernel`` (implicit GEMM, tensor cores) and
``_gated_conv2d_direct_kernel`` (depthwise and thin groups, no GEMM) ->
launcher :func:`gated_conv2d_fwd` -> op ``pydecouple::gated_conv2d`` (ops.py).

The problem, per sample ``n`` and group ``g`` (the reference, pydecouple/reference.py)::

    out[n, co, p] = mask_out[n, co] * act(bias[co] + sum_{tap, ci} W[co, ci, tap] * X[n, ci, p @ tap])

with ``co`` in group ``g``'s filters, ``ci`` in group ``g``'s input channels and
``X[n, ci]`` zero where ``in_mask[n, ci]`` is off. The gates are turned into
per-(sample, group) index lists, kept channels first (``masks_to_indices``),
so each sample's problem is a dense GEMM of size

    M = Ho * Wo (pixels)   x   N = kept_out (filters)   x   K = KH * KW * kept_in

which is what the GEMM kernel computes: a tile of ``BLOCK_M`` pixels of one
sample times ``BLOCK_N`` kept filters of one (sample, group), the K loop running
over taps x blocks of ``BLOCK_K`` kept input channels, flattened into one loop
so that Triton's software pipeliner sees a single long loop (the idea of the
implicit-GEMM convolutions in cuDNN/CUTLASS and in the Triton conv tutorials).
The grid is sized for the worst case (all channels kept), with no host
synchronisation; a program whose filter tile lies past its sample's kept count
skips the K loop and only writes zeros for the deselected filters it covers,
so the output is fully written by the kernel (no separate memset).

Layout: any strides are accepted for ``x`` and the output (NCHW and
channels_last are both just strides). Channels_last is the fast path: a row of
the A tile is one pixel's kept channels, which lie close together in memory;
where it pays (and always for NCHW input), ``_gated_conv2d_compact_kernel``
first copies the kept channels, kept first, into a channels_last buffer, so the
A rows are contiguous and Triton pipelines them with async copies
(:func:`compact_input_policy`). The weight is repacked once per call to
(KH, KW, Cin/groups, Cout), so a row of the B tile (one input channel,
consecutive kept filters) is close together too. Design notes: docs/gpu.md.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

# Output size, output layout and kept-first index lists: the package's one
# definition (pydecouple/geometry.py), shared with the op, its checks and fakes.
from ..geometry import masks_to_indices, output_memory_format, output_size

__all__ = ["gated_conv2d_triton", "gated_conv2d_fwd", "INTERPRET"]

# Read when this module is imported, as triton.jit does.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Groups whose per-group channel counts are below this run the direct kernel:
# a tl.dot needs K >= 16 and N >= 16, and a depthwise layer has 1 and 1.
_MIN_GEMM_CHANNELS = 16


# ----------------------------------------------------------------------------- GEMM kernel


def _gemm_configs():
    cfg = triton.Config
    # Five configurations: each costs a compilation per kernel variant the first
    # time a shape is seen, so the set stays small.
    return [
        # large layers, batch 32/128: 128x128 tiles, 8 warps (H100 wgmma-friendly)
        cfg({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        cfg({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        cfg({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        # small spatial sizes / batch 1: more programs
        cfg({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    ]


def _prune_gemm_configs(configs, named_args, **kwargs):
    """Drop tiles far larger than the problem (a 128-wide filter tile for 64 filters)."""
    cin_g = named_args["C_IN_G"]
    cout_g = named_args["C_OUT_G"]
    m = named_args["HO"] * named_args["WO"]
    fp32 = named_args["x_ptr"].dtype in (torch.float32, torch.float64)
    kept = []
    for c in configs:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if bn > max(32, triton.next_power_of_2(cout_g)):
            continue
        if bk > max(32, triton.next_power_of_2(cin_g)):
            continue
        if bm > max(32, triton.next_power_of_2(m)):
            continue
        if fp32 and bm * bk + bk * bn > 128 * 64 + 64 * 64:
            continue  # float32 operands: keep shared memory within an SM's budget
        kept.append(c)
    return kept or [configs[-1]]


# Sizes that do not decide vector widths are not specialised on (divisibility
# by 16, equality to 1): fewer compilations across layer shapes.
_NO_SPECIALIZE = ["G", "H", "W", "HO", "WO", "PAD_T", "PAD_L", "DIL_H", "DIL_W"]


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _gated_conv2d_fwd_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    in_idx_ptr, in_cnt_ptr, out_idx_ptr, out_cnt_ptr,
    G, H, W, HO, WO, C_IN_G, C_OUT_G, C_OUT,
    sxn, sxc, sxh, sxw,
    son, soc, soh, sow,
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_T, PAD_L, DIL_H, DIL_W,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
    GATHER_IN: tl.constexpr, GATHER_OUT: tl.constexpr, A_COMPACT: tl.constexpr,
    USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M pixels) x (BLOCK_N kept filters) tile of one sample and group.

    Args (shapes, layouts):
        x_ptr: (N, Cin, H, W) input, any strides (sxn, sxc, sxh, sxw). With
            A_COMPACT it is the compacted input of :func:`_gated_conv2d_compact_kernel`
            instead: the k-th kept channel of group g at channel g * C_IN_G + k,
            so a row of the A tile is contiguous (vector loads, cp.async).
        w_ptr: (KH, KW, C_IN_G, C_OUT) contiguous, the repacked weight.
        b_ptr: (C_OUT,) bias, read when HAS_BIAS.
        out_ptr: (N, C_OUT, HO, WO) output, any strides (son, soc, soh, sow);
            every element is written (zeros for deselected filters).
        in_idx_ptr, in_cnt_ptr: int32 (N * G, C_IN_G) per-(sample, group) local
            input channel indices, kept first, and int32 (N * G,) kept counts;
            read when GATHER_IN (else every channel is kept).
        out_idx_ptr, out_cnt_ptr: the same for filters, (N * G, C_OUT_G), (N * G,).
    Grid: (cdiv(HO * WO, BLOCK_M), G * cdiv(C_OUT_G, BLOCK_N), N).
    """
    pid_m = tl.program_id(0)
    pid_gn = tl.program_id(1)
    n = tl.program_id(2)
    tiles_n = tl.cdiv(C_OUT_G, BLOCK_N)
    g = pid_gn // tiles_n
    tn = pid_gn % tiles_n
    row = n * G + g  # the (sample, group) row of the index lists

    # Filters of this tile: positions in the (kept-first) list of group g.
    offs_j = tn * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = offs_j < C_OUT_G
    if GATHER_OUT:
        cnt_out = tl.load(out_cnt_ptr + row)
        co_local = tl.load(out_idx_ptr + row * C_OUT_G + offs_j, mask=j_ok, other=0)
    else:
        cnt_out = C_OUT_G
        co_local = offs_j
    keep_j = offs_j < cnt_out
    co = g * C_OUT_G + co_local

    # Pixels of this tile.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < HO * WO
    oh = offs_m // WO
    ow = offs_m % WO
    ih0 = oh * STRIDE_H - PAD_T
    iw0 = ow * STRIDE_W - PAD_L

    if GATHER_IN:
        cnt_in = tl.load(in_cnt_ptr + row)
    else:
        cnt_in = C_IN_G
    k_blocks = tl.cdiv(cnt_in, BLOCK_K)
    # A tile past the kept filters does no work: zero iterations, it only
    # writes the zeros of its deselected filters below.
    n_iters = tl.where(tn * BLOCK_N < cnt_out, KH * KW * k_blocks, 0)

    x_base = x_ptr + n.to(tl.int64) * sxn
    in_idx_row = in_idx_ptr + row * C_IN_G
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for it in range(0, n_iters):
        tap = it // k_blocks
        kb = it - tap * k_blocks
        kh = tap // KW
        kw = tap - kh * KW
        ih = ih0 + kh * DIL_H
        iw = iw0 + kw * DIL_W
        pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < cnt_in
        if GATHER_IN:
            ci_local = tl.load(in_idx_row + offs_k, mask=k_ok, other=0)
        else:
            ci_local = offs_k
        if A_COMPACT:
            ci = g * C_IN_G + offs_k
        else:
            ci = g * C_IN_G + ci_local
        a_ptrs = x_base + (ih * sxh + iw * sxw)[:, None] + (ci * sxc)[None, :]
        if A_COMPACT:
            # Past the kept count the compacted input holds zeros up to the block's
            # end: a mask constant over K blocks keeps the loads vectorised.
            a = tl.load(a_ptrs, mask=pix_ok[:, None] & (offs_k < C_IN_G)[None, :], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=pix_ok[:, None] & k_ok[None, :], other=0.0)
        b_ptrs = w_ptr + ((tap * C_IN_G + ci_local) * C_OUT)[:, None] + co[None, :]
        b = tl.load(b_ptrs, mask=k_ok[:, None] & keep_j[None, :], other=0.0)
        if UPCAST_DOT:
            # Triton's interpreter multiplies bfloat16 as raw uint16 bits: only
            # under the interpreter, the operands go through float32.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if USE_DOT:
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
        else:
            acc += tl.sum(a.to(ACC_DTYPE)[:, :, None] * b.to(ACC_DTYPE)[None, :, :], axis=1)

    # Fused epilogue: bias, ReLU, then the out-mask (deselected filters exactly 0).
    if HAS_BIAS:
        bias = tl.load(b_ptr + co, mask=keep_j, other=0.0).to(ACC_DTYPE)
        acc += bias[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    acc = tl.where(keep_j[None, :], acc, 0.0)
    out_ptrs = (out_ptr + n.to(tl.int64) * son + (oh * soh + ow * sow)[:, None] + (co * soc)[None, :])
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & j_ok[None, :])


def _autotune_bench(fn, quantiles):
    # 5 ms warm-up, 25 ms of repeats: enough to rank tiles, and a benchmark sweep
    # over many layer shapes stays short.
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


_gated_conv2d_fwd_tuned = triton.autotune(
    configs=_gemm_configs(),
    # Shapes only: masks are data, a new mask never re-tunes or recompiles.
    key=["G", "H", "W", "HO", "WO", "C_IN_G", "C_OUT_G", "KH", "KW", "STRIDE_H", "STRIDE_W",
         "GATHER_IN", "GATHER_OUT", "A_COMPACT"],
    do_bench=_autotune_bench,
    prune_configs_by={"early_config_prune": _prune_gemm_configs},
)(_gated_conv2d_fwd_kernel)


# ----------------------------------------------------------------------------- input compaction


@triton.jit(do_not_specialize=["G", "HW", "W"])
def _gated_conv2d_compact_kernel(
    x_ptr, xc_ptr, in_idx_ptr, in_cnt_ptr,
    G, HW, W, C_IN_G,
    sxn, sxc, sxh, sxw,
    GATHER_IN: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Copy each sample's kept input channels, kept first, into channels_last.

    xc (N, H, W, Cin) contiguous receives xc[n, :, :, g * C_IN_G + k] =
    x[n, g * C_IN_G + in_idx[n * G + g, k]] for k < in_cnt[n * G + g]; the rest
    of xc is left unwritten (never read), except zeros from the count to the end
    of the count's BLOCK_C tile. Tiles past the kept count exit at
    once, so the pass moves only the kept fraction of x. Without GATHER_IN it
    is a plain copy to channels_last (what an NCHW input costs).
    Grid: (cdiv(H * W, BLOCK_P), G * cdiv(C_IN_G, BLOCK_C), N).
    """
    pid_p = tl.program_id(0)
    pid_gc = tl.program_id(1)
    n = tl.program_id(2)
    tiles_c = tl.cdiv(C_IN_G, BLOCK_C)
    g = pid_gc // tiles_c
    tc = pid_gc % tiles_c
    row = n * G + g
    if GATHER_IN:
        cnt = tl.load(in_cnt_ptr + row)
    else:
        cnt = C_IN_G
    if tc * BLOCK_C < cnt:
        offs_k = tc * BLOCK_C + tl.arange(0, BLOCK_C)
        k_ok = offs_k < cnt
        if GATHER_IN:
            ci = tl.load(in_idx_ptr + row * C_IN_G + offs_k, mask=k_ok, other=0)
        else:
            ci = offs_k
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        p_ok = offs_p < HW
        h = offs_p // W
        w = offs_p % W
        src = x_ptr + n.to(tl.int64) * sxn + (h * sxh + w * sxw)[:, None] + ((g * C_IN_G + ci) * sxc)[None, :]
        v = tl.load(src, mask=p_ok[:, None] & k_ok[None, :], other=0.0)
        dst = xc_ptr + n.to(tl.int64) * HW * (G * C_IN_G) + (offs_p * (G * C_IN_G))[:, None] \
            + (g * C_IN_G + offs_k)[None, :]
        # Zeros from the kept count to the end of this tile: the GEMM reads whole
        # BLOCK_K blocks (BLOCK_K divides BLOCK_C) without a mask on the count.
        tl.store(dst, v, mask=p_ok[:, None] & (offs_k < C_IN_G)[None, :])


# ----------------------------------------------------------------------------- direct kernel


@triton.jit(do_not_specialize=_NO_SPECIALIZE[1:])
def _gated_conv2d_direct_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr,
    in_mask_ptr, out_idx_ptr, out_cnt_ptr,
    H, W, HO, WO, C_IN, C_IN_G, C_OUT_G, C_OUT,
    sxn, sxc, sxh, sxw,
    son, soc, soh, sow,
    KH: tl.constexpr, KW: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_T, PAD_L, DIL_H, DIL_W,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
    GATHER_IN: tl.constexpr, GATHER_OUT: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Direct convolution for thin groups (depthwise: C_IN_G = C_OUT_G = 1).

    A tile is BLOCK_M pixels x BLOCK_N kept filters of one sample taken from the
    sample's whole kept-first filter list (not per group), so a depthwise layer
    fills its tiles with kept channels only. Each filter reads its own group's
    C_IN_G input channels; those that are off are skipped by a select (never
    multiplied, so NaN or inf there cannot leak).

    Args: as :func:`_gated_conv2d_fwd_kernel`, except
        w_ptr: (C_OUT, C_IN_G, KH, KW) contiguous, the weight as given.
        in_mask_ptr: uint8 (N, C_IN), read when GATHER_IN.
        out_idx_ptr, out_cnt_ptr: int32 (N, C_OUT) and (N,), kept first.
    Grid: (cdiv(HO * WO, BLOCK_M), cdiv(C_OUT, BLOCK_N), N).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n = tl.program_id(2)

    offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = offs_j < C_OUT
    if GATHER_OUT:
        cnt_out = tl.load(out_cnt_ptr + n)
        co = tl.load(out_idx_ptr + n * C_OUT + offs_j, mask=j_ok, other=0)
    else:
        cnt_out = C_OUT
        co = offs_j
    keep_j = offs_j < cnt_out
    g = co // C_OUT_G

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < HO * WO
    oh = offs_m // WO
    ow = offs_m % WO

    n_ci = tl.where(pid_n * BLOCK_N < cnt_out, C_IN_G, 0)
    x_base = x_ptr + n.to(tl.int64) * sxn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for cil in range(0, n_ci):
        ci = g * C_IN_G + cil
        if GATHER_IN:
            on = tl.load(in_mask_ptr + n * C_IN + ci, mask=keep_j, other=0) != 0
        else:
            on = keep_j
        for kh in tl.static_range(KH):
            ih = oh * STRIDE_H - PAD_T + kh * DIL_H
            for kw in tl.static_range(KW):
                iw = ow * STRIDE_W - PAD_L + kw * DIL_W
                pix_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                xv = tl.load(x_base + (ih * sxh + iw * sxw)[:, None] + (ci * sxc)[None, :],
                             mask=pix_ok[:, None] & on[None, :], other=0.0)
                wv = tl.load(w_ptr + ((co * C_IN_G + cil) * KH + kh) * KW + kw, mask=on, other=0.0)
                acc += xv.to(ACC_DTYPE) * wv.to(ACC_DTYPE)[None, :]

    if HAS_BIAS:
        bias = tl.load(b_ptr + co, mask=keep_j, other=0.0).to(ACC_DTYPE)
        acc += bias[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0, propagate_nan=tl.PropagateNan.ALL)
    acc = tl.where(keep_j[None, :], acc, 0.0)
    out_ptrs = out_ptr + n.to(tl.int64) * son + (oh * soh + ow * sow)[:, None] + (co * soc)[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & j_ok[None, :])


# ----------------------------------------------------------------------------- launcher


def _input_precision(dtype: torch.dtype) -> Optional[str]:
    if dtype == torch.float32:
        # The same choice PyTorch makes for its float32 convolutions.
        return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    return None  # tl.dot's default; the option only concerns float32 operands


# Compaction of the kept input channels costs one pass over them; it pays where
# each input element feeds many multiply-adds (filters x taps / stride^2).
_COMPACT_MIN_REUSE = 1152
COMPACT_ENV = "PYDECOUPLE_TRITON_COMPACT"


def compact_input_policy(x: torch.Tensor, in_mask: Optional[torch.Tensor], cout_g: int, kh: int, kw: int,
                         stride: Sequence[int]) -> bool:
    """Whether the GEMM kernel reads a compacted channels_last copy of the kept inputs.

    Always for inputs whose channels are not contiguous (NCHW): the kernel's A
    tiles want contiguous channels, so the copy is made anyway, and it moves only
    the kept channels. For channels_last inputs with an in-mask, where the
    filters x taps reuse of each input element is large enough to amortise the
    pass. ``PYDECOUPLE_TRITON_COMPACT`` = 0 / 1 forces it off / on (benchmarks).
    """
    forced = os.environ.get(COMPACT_ENV, "auto").strip().lower()
    if forced in ("0", "1"):
        return forced == "1"
    if x.stride(1) != 1 and x.shape[1] > 1:
        return True
    if in_mask is None:
        return False
    return cout_g * kh * kw >= _COMPACT_MIN_REUSE * stride[0] * stride[1]


def uses_direct_kernel(cin_g: int, cout_g: int, groups: int) -> bool:
    """Depthwise and thin grouped convolutions skip the GEMM kernel."""
    return groups > 1 and (cin_g < _MIN_GEMM_CHANNELS or cout_g < _MIN_GEMM_CHANNELS)


def gated_conv2d_fwd(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_mask: Optional[torch.Tensor],
    in_mask: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    relu: bool,
    *,
    config: Optional[dict] = None,
    out: Optional[torch.Tensor] = None,
    compact: Optional[bool] = None,
) -> torch.Tensor:
    """Launch the gated convolution; arguments as ``gated_conv2d_reference``.

    ``x`` (N, Cin, H, W) in float32/float16/bfloat16 (float64 runs without
    tensor cores), any strides; ``padding`` is (top, bottom, left, right);
    masks bool (N, C) or None. Returns (N, Cout, Ho, Wo) in ``x``'s dtype and
    memory format. ``config`` (BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
    num_stages) bypasses the autotuner, as the interpreter always does.
    ``out``, if given, is written in place (any strides; tests pass a
    NaN-poisoned tensor to check that every element is written). ``compact``
    overrides :func:`compact_input_policy` for the GEMM kernel.
    No host synchronisation: safe to capture in a CUDA graph once the
    autotuner has seen the shape.
    """
    n, cin, h, w = x.shape
    cout, cin_g, kh, kw = weight.shape
    sh, sw = int(stride[0]), int(stride[1])
    pt, pb, pl, pr = (int(p) for p in padding)
    dh, dw = int(dilation[0]), int(dilation[1])
    ho, wo = output_size(h, w, (kh, kw), (sh, sw), (pt, pb, pl, pr), (dh, dw))
    cout_g = cout // groups
    if out is None:
        out = torch.empty((n, cout, ho, wo), dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
    elif tuple(out.shape) != (n, cout, ho, wo) or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"gated_conv2d (triton): 'out' must be a {(n, cout, ho, wo)} {x.dtype} tensor on "
                         f"{x.device}, got {tuple(out.shape)} {out.dtype} on {out.device}")
    if out.numel() == 0:
        return out
    if n > 65535:
        raise ValueError(f"gated_conv2d (triton): batch {n} exceeds the grid's limit of 65535 samples per launch")
    for name, t in (("x", x[0]), ("out", out[0])):
        if t.numel() >= 2**31:
            raise ValueError(f"gated_conv2d (triton): one sample of '{name}' has {t.numel()} elements, "
                             "more than the kernel's 32-bit per-sample indexing allows (2**31 - 1)")
    acc_dtype = tl.float64 if x.dtype == torch.float64 else tl.float32
    has_bias = bias is not None
    b = bias.contiguous() if has_bias else out  # a placeholder pointer, never read
    dummy_i32 = torch.empty(1, dtype=torch.int32, device=x.device)

    if uses_direct_kernel(cin_g, cout_g, groups):
        w_c = weight.contiguous()
        if out_mask is not None:
            out_idx, out_cnt = masks_to_indices(out_mask)
        else:
            out_idx = out_cnt = dummy_i32
        in_m = in_mask.contiguous().view(torch.uint8) if in_mask is not None else dummy_i32
        bm, bn, warps = (config or {}).get("BLOCK_M", 64), (config or {}).get("BLOCK_N", 32), 4
        if INTERPRET and config is None:
            bm, bn = 32, 16
        grid = (triton.cdiv(ho * wo, bm), triton.cdiv(cout, bn), n)
        _gated_conv2d_direct_kernel[grid](
            x, w_c, b, out, in_m, out_idx, out_cnt,
            h, w, ho, wo, cin, cin_g, cout_g, cout,
            *x.stride(), *out.stride(),
            KH=kh, KW=kw, STRIDE_H=sh, STRIDE_W=sw, PAD_T=pt, PAD_L=pl, DIL_H=dh, DIL_W=dw,
            HAS_BIAS=has_bias, RELU=bool(relu),
            GATHER_IN=in_mask is not None, GATHER_OUT=out_mask is not None, ACC_DTYPE=acc_dtype,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
        )
        return out

    # (KH, KW, Cin/groups, Cout): a K row of the B tile is consecutive filters.
    w_p = weight.permute(2, 3, 1, 0).contiguous()
    if out_mask is not None:
        out_idx, out_cnt = masks_to_indices(out_mask.reshape(n * groups, cout_g))
    else:
        out_idx = out_cnt = dummy_i32
    if in_mask is not None:
        in_idx, in_cnt = masks_to_indices(in_mask.reshape(n * groups, cin_g))
    else:
        in_idx = in_cnt = dummy_i32
    use_dot = x.dtype != torch.float64
    if compact is None:
        compact = compact_input_policy(x, in_mask, cout_g, kh, kw, (sh, sw))
    xa = x
    if compact:
        xa = torch.empty((n, h, w, cin), dtype=x.dtype, device=x.device).permute(0, 3, 1, 2)  # channels_last
        bp, bc = (32 if INTERPRET else 64), 64  # bc: a multiple of every BLOCK_K (<= 64)
        _gated_conv2d_compact_kernel[(triton.cdiv(h * w, bp), groups * triton.cdiv(cin_g, bc), n)](
            x, xa, in_idx, in_cnt, groups, h * w, w, cin_g, *x.stride(),
            GATHER_IN=in_mask is not None, BLOCK_P=bp, BLOCK_C=bc, num_warps=4,
        )
    args = (
        xa, w_p, b, out, in_idx, in_cnt, out_idx, out_cnt,
        groups, h, w, ho, wo, cin_g, cout_g, cout,
        *xa.stride(), *out.stride(),
    )
    meta = dict(
        KH=kh, KW=kw, STRIDE_H=sh, STRIDE_W=sw, PAD_T=pt, PAD_L=pl, DIL_H=dh, DIL_W=dw,
        HAS_BIAS=has_bias, RELU=bool(relu), GATHER_IN=in_mask is not None, GATHER_OUT=out_mask is not None,
        A_COMPACT=bool(compact) and in_mask is not None, USE_DOT=use_dot,
        INPUT_PRECISION=None if INTERPRET else _input_precision(x.dtype),
        ACC_DTYPE=acc_dtype, UPCAST_DOT=INTERPRET and x.dtype == torch.bfloat16,
    )
    if config is None and (INTERPRET or not use_dot):
        # The interpreter is slow: one small config, no autotuning. float64
        # (no tensor cores) multiplies in registers: small tiles.
        config = {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16} if INTERPRET else \
                 {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 8, "num_warps": 4, "num_stages": 2}
    if config is not None:
        c = dict(config)
        bm, bn, bk = c.pop("BLOCK_M"), c.pop("BLOCK_N"), c.pop("BLOCK_K")
        if 64 % bk:
            raise ValueError(f"gated_conv2d (triton): BLOCK_K must divide 64, got {bk}")
        grid = (triton.cdiv(ho * wo, bm), groups * triton.cdiv(cout_g, bn), n)
        _gated_conv2d_fwd_kernel[grid](*args, **meta, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **c)
    else:
        def grid(meta_):
            return (triton.cdiv(ho * wo, meta_["BLOCK_M"]), groups * triton.cdiv(cout_g, meta_["BLOCK_N"]), n)

        _gated_conv2d_fwd_tuned[grid](*args, **meta)
    return out


def gated_conv2d_triton(x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups, relu):
    """The Triton backend of ``pydecouple.ops.gated_conv2d`` (see :func:`gated_conv2d_fwd`)."""
    return gated_conv2d_fwd(x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups, relu)
