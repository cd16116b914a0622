// The GEMM engine's kernels for AVX2 + FMA (float32 compute; bfloat16 and
// float16 are widened to float32 in the gathers). Torch-free, see
// gemm_engine_avx512.cpp.
// Standard and intrinsic headers come before the target pragma: their inline
// functions and templates keep the default target (no AVX-512 instruction in
// a COMDAT copy another translation unit might link to).
#include <algorithm>
#include <cstdint>
#include <cstring>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#pragma GCC target("avx2,fma,f16c,bmi2,popcnt")
#define ENGINE_NS avx2
#define ENGINE_ISA 1
#define ENGINE_NAME "avx2"
#include "gemm_engine_impl.h"
#endif

namespace pydecouple {
namespace cpu {

const EngineKernels* engine_avx2(Elem compute) {
#if defined(__x86_64__) && defined(__GNUC__)
  return compute == Elem::f32 ? avx2::kernels_f32() : nullptr;
#else
  (void)compute;
  return nullptr;
#endif
}

}  // namespace cpu
}  // namespace pydecouple
