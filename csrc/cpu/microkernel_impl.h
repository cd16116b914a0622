// Body of the micro-kernel (see microkernel.h), included by the two
// translation units that compile it with different instruction sets.
// MICROKERNEL_NS names the namespace of the instantiation.

#include <cstring>

// Vectors never cross a non-inline call here; the ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

#include "microkernel.h"

namespace pydecouple {
namespace cpu {
namespace MICROKERNEL_NS {

// Vectors of VL floats (16: one zmm; 8: one ymm, for small images where a
// 16-wide tile would mostly compute discarded positions). The "_u" variants
// are readable at any 4-byte-aligned address (unaligned loads).
typedef float vf16 __attribute__((vector_size(16 * sizeof(float))));
typedef float vf16_u __attribute__((vector_size(16 * sizeof(float)), aligned(4)));
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vf8_u __attribute__((vector_size(8 * sizeof(float)), aligned(4)));

template <int VL> struct Vec;
template <> struct Vec<16> { using T = vf16; using U = vf16_u; };
template <> struct Vec<8> { using T = vf8; using U = vf8_u; };

// A broadcast from memory. The AVX-512 build defines MICROKERNEL_SPLAT16/8
// with intrinsics (one vbroadcastss each); GCC's generic lowering of a
// vector literal goes through a scalar register and an insert, and `vf{} + s`
// adds 0.0f first (without -ffast-math it must keep -0.0 + 0.0).
template <typename vf, int VL>
static inline vf splat(const float* p) {
#if defined(MICROKERNEL_SPLAT16)
  if constexpr (VL == 16) return (vf)MICROKERNEL_SPLAT16(*p);
  else return (vf)MICROKERNEL_SPLAT8(*p);
#else
  vf v;
#pragma GCC unroll 16
  for (int i = 0; i < VL; ++i) v[i] = *p;
  return v;
#endif
}

// KK > 0: taps known at compile time (fully unrolled); KK == 0: a run-time count.
template <int VL, int MR, int NV, int KK>
static void tile(const TileArgs& a) {
  using vf = typename Vec<VL>::T;
  using vfu = typename Vec<VL>::U;
  vf acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[r][v] = vf{};

  const int64_t kk = KK > 0 ? KK : a.kk;
  const float* w[MR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) w[r] = a.wrows[r];

  for (int64_t j = 0; j < a.ki; ++j) {
    const float* xj = a.x + j * a.plane;
    const int32_t co = a.cin_off[j];
#pragma GCC unroll 9
    for (int64_t t = 0; t < kk; ++t) {
      const float* xt = xj + a.toff[t];
      vf xv[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) xv[v] = *reinterpret_cast<const vfu*>(xt + v * VL);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const vf wv = splat<vf, VL>(w[r] + co + t);
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[r][v] += wv * xv[v];
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) *reinterpret_cast<vfu*>(a.acc + r * (NV * VL) + v * VL) = acc[r][v];
}

template <int VL, int MR, int NV>
static TileFn pick_kk(int64_t kk) {
  if (kk == 9) return &tile<VL, MR, NV, 9>;
  if (kk == 1) return &tile<VL, MR, NV, 1>;
  return &tile<VL, MR, NV, 0>;
}

template <int VL, int MR>
static TileFn pick_nv(int nv, int64_t kk) {
  switch (nv) {
    case 1: return pick_kk<VL, MR, 1>(kk);
    case 2: return pick_kk<VL, MR, 2>(kk);
    case 3: return pick_kk<VL, MR, 3>(kk);
    default: return pick_kk<VL, MR, 4>(kk);
  }
}

template <int VL>
static TileFn pick_mr(int mr, int nv, int64_t kk) {
  switch (mr) {
    case 1: return pick_nv<VL, 1>(nv, kk);
    case 2: return pick_nv<VL, 2>(nv, kk);
    case 3: return pick_nv<VL, 3>(nv, kk);
    case 4: return pick_nv<VL, 4>(nv, kk);
    case 5: return pick_nv<VL, 5>(nv, kk);
    default: return pick_nv<VL, 6>(nv, kk);
  }
}

static TileFn pick(int vl, int mr, int nv, int64_t kk) { return vl == 8 ? pick_mr<8>(mr, nv, kk) : pick_mr<16>(mr, nv, kk); }

}  // namespace MICROKERNEL_NS
}  // namespace cpu
}  // namespace pydecouple
