// What the CPU entry points share: argument checks and the conv geometry, the
// GEMM engine's driver, the direct engine.
#pragma once

#include <ATen/ATen.h>

#include "gemm_engine.h"

namespace pydecouple {
namespace cpu {

const char* dtype_name(at::ScalarType t);

// Checks x (N, C, H, W; float32/bfloat16/float16, CPU), weight (x's dtype),
// stride, padding (top, bottom, left, right), dilation and groups, each with
// a message naming the argument (prefixed by `op`), and returns the geometry
// (the stride clamped to the room the kernel has: the same output).
ConvShape check_conv(const char* op, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);

// The GEMM engine (gemm_conv.cpp), groups == 1; undefined tensors mean none.
// out_means (float32 (N, O), contiguous, or undefined): also the channel
// means of the output, as gate_channel_means would compute them, from each
// NHWC block while the epilogue has it in cache.
at::Tensor gated_conv2d_gemm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                             const at::Tensor& out_mask, const at::Tensor& in_mask, const ConvShape& s, bool relu,
                             bool nhwc_out, const at::Tensor& residual, bool residual_relu,
                             const at::Tensor& out_means = at::Tensor());

// The dense route's epilogue in place, one pass, with the kernels of the
// CPU's instruction set: y = mask * relu?(y), then y = relu?(y + residual).
// y: a dense conv's output, NCHW- or NHWC-contiguous; mask: bool (N, O);
// residual (optional): y's shape, layout and dtype. out_means (optional,
// float32 (N, O)): the channel means of the result, each sample's right
// after its epilogue.
void dense_mask_epilogue(at::Tensor& y, const at::Tensor& mask, bool relu, const at::Tensor& residual,
                         bool residual_relu, const at::Tensor& out_means = at::Tensor());

// The gate's per-channel means of x (N, C, H, W; NCHW- or NHWC-contiguous)
// into z (float32 (N, C), contiguous), with the kernels of the CPU's
// instruction set, in double, in parallel over samples and 64-channel blocks.
void gate_channel_means(const at::Tensor& x, at::Tensor& z);

}  // namespace cpu
}  // namespace pydecouple
