// Weights packed for the GEMM engine ([KH * KW][C][Op], filters contiguous and
// zero-padded to a multiple of 16, in
// the compute dtype), cached per weight tensor so that inference packs each
// layer once, not once per call.
#pragma once

#include <ATen/ATen.h>

namespace pydecouple {
namespace cpu {

// The packed copy of `weight` (O, C, KH, KW) in `dtype`. A cached copy is
// reused while the weight's storage is alive, at the same offset, sizes and
// strides, and its version counter (bumped by every in-place change) is
// unchanged; anything else packs anew. Thread-safe.
at::Tensor packed_weight(const at::Tensor& weight, at::ScalarType dtype);

// Number of live entries (for tests).
int64_t packed_weight_cache_size();

}  // namespace cpu
}  // namespace pydecouple
