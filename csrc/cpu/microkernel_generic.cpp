// The micro-kernel for any CPU: the same source as the AVX-512 build, compiled
// for the baseline instruction set (GCC lowers the 16-float vectors to
// whatever the target has).
#define MICROKERNEL_NS generic
#include "microkernel_impl.h"

namespace pydecouple {
namespace cpu {

TileFn tile_fn_generic(int vl, int mr, int nv, int64_t kk) { return generic::pick(vl, mr, nv, kk); }

bool cpu_has_avx512() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
  return has;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace pydecouple
