// Torch-free CUDA kernels of pydecouple's gated convolution: raw pointers, a
// cudaStream_t, and an error string back (nullptr on success). The ATen glue
// (../gated_conv2d_cuda.cu) checks tensors, allocates, and calls these; the
// kernels themselves compile and can be tested without PyTorch (CMakeLists.txt,
// target pydecouple_cuda_kernels).
//
// The op, per sample n (the reference, pydecouple/reference.py):
//   out[n, co, p] = out_mask[n, co] * act(bias[co] + sum_{tap, ci in group(co)}
//                       W[co, ci, tap] * (in_mask[n, ci] ? x[n, ci, p @ tap] : 0))
// Gates become per-(sample, group) index lists, kept channels first, with
// counts (gated_masks_to_indices); the GEMM kernel then works on the kept
// problem only: M = Ho*Wo pixels, N = kept filters, K = KH*KW*kept inputs.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace pydecouple {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Arguments of gated_conv2d_forward. Layouts:
//   x:       (N, C_in, H, W) with element strides sx (NCHW or channels_last or any)
//   weight:  (KH, KW, C_in/groups, C_out) contiguous -- the weight permuted so a
//            row (one tap, one input channel) holds consecutive filters
//   weight_oihw: (C_out, C_in/groups, KH, KW) contiguous, used by the direct
//            kernel (depthwise and thin groups); either may be null when the
//            other kernel runs (see uses_direct_kernel)
//   bias:    (C_out,) or null
//   out:     (N, C_out, Ho, Wo) with element strides so; every element is written
//   in_idx/in_cnt:   int32 (N*groups, C_in/groups), (N*groups,) or both null (all on)
//   out_idx/out_cnt: int32 (N*groups, C_out/groups), (N*groups,) or both null
//   in_mask: uint8 (N, C_in) or null, read by the direct kernel only
//   out_idx_all/out_cnt_all: int32 (N, C_out), (N,) or null, for the direct kernel
struct GatedConvParams {
  const void* x = nullptr;
  const void* weight = nullptr;
  const void* weight_oihw = nullptr;
  const void* bias = nullptr;
  void* out = nullptr;
  const int32_t* in_idx = nullptr;
  const int32_t* in_cnt = nullptr;
  const int32_t* out_idx = nullptr;
  const int32_t* out_cnt = nullptr;
  const uint8_t* in_mask = nullptr;
  const int32_t* out_idx_all = nullptr;
  const int32_t* out_cnt_all = nullptr;
  int N = 0, C_in = 0, H = 0, W = 0;
  int C_out = 0, KH = 1, KW = 1, Ho = 0, Wo = 0, groups = 1;
  int stride_h = 1, stride_w = 1, pad_t = 0, pad_l = 0, dil_h = 1, dil_w = 1;
  int64_t sx[4] = {0, 0, 0, 0};
  int64_t so[4] = {0, 0, 0, 0};
  bool relu = false;
  DType dtype = DType::kFloat32;
};

// True where the direct kernel runs (grouped convolutions too thin for a GEMM
// tile: fewer than 16 channels per group in or out).
bool uses_direct_kernel(int c_in_per_group, int c_out_per_group, int groups);

// Per row of a (rows, cols) uint8/bool mask, the column indices with the kept
// (non-zero) ones first, both parts in increasing order, and the kept count:
// idx int32 (rows, cols), cnt int32 (rows,). The same result as a stable
// argsort of ~mask. One block per row, no host synchronisation.
const char* gated_masks_to_indices(const uint8_t* mask, int rows, int cols, int32_t* idx, int32_t* cnt,
                                   cudaStream_t stream);

// Launches the gated convolution. Returns nullptr on success, else a static
// message (bad parameters or the CUDA launch error). No host synchronisation.
const char* gated_conv2d_forward(const GatedConvParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace pydecouple
