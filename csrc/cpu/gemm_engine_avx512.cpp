// The GEMM engine's kernels for AVX-512 (F, BW, VL, DQ), chosen at run time
// where the CPU has them. No torch header is included here: the target pragma
// must not reach inline functions shared with other translation units.
// Standard and intrinsic headers come before the target pragma: their inline
// functions and templates keep the default target (no AVX-512 instruction in
// a COMDAT copy another translation unit might link to).
#include <algorithm>
#include <cstdint>
#include <cstring>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,fma,f16c,avx2,bmi2,popcnt")
#define ENGINE_NS avx512
#define ENGINE_ISA 2
#define ENGINE_NAME "avx512"
#include "gemm_engine_impl.h"
#endif

namespace pydecouple {
namespace cpu {

const EngineKernels* engine_avx512(Elem compute) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (compute == Elem::f32) return avx512::kernels_f32();
  static const EngineKernels bf16 = [] {
    EngineKernels k = *avx512::kernels_f32();
    k.compute = Elem::bf16;
    k.gather_weight = &avx512::gather_weight_bf16;
    k.gemm = gemm_bf16_avx512();
    return k;
  }();
  return bf16.gemm ? &bf16 : nullptr;
#else
  (void)compute;
  return nullptr;
#endif
}

}  // namespace cpu
}  // namespace pydecouple
