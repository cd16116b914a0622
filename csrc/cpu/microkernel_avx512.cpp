// The micro-kernel built for AVX-512 (chosen at run time where the CPU has it).
// No torch header is included here: the target pragma must not leak into
// inline functions shared with other translation units.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,fma,avx2")
#define PYDECOUPLE_HAVE_AVX512_BUILD 1
#include <immintrin.h>
#define MICROKERNEL_SPLAT16 _mm512_set1_ps
#define MICROKERNEL_SPLAT8 _mm256_set1_ps
#endif

#define MICROKERNEL_NS avx512
#include "microkernel_impl.h"

namespace pydecouple {
namespace cpu {

TileFn tile_fn_avx512(int vl, int mr, int nv, int64_t kk) {
#ifdef PYDECOUPLE_HAVE_AVX512_BUILD
  return avx512::pick(vl, mr, nv, kk);
#else
  return nullptr;
#endif
}

}  // namespace cpu
}  // namespace pydecouple
