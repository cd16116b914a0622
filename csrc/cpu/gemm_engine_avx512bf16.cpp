// The bfloat16 GEMM of the AVX-512 engine: vdpbf16ps (AVX512_BF16) multiplies
// pairs of bfloat16 and accumulates in float32. Its own translation unit, so
// that no AVX512_BF16 instruction reaches code that runs on AVX-512 CPUs
// without it (the driver calls this only where cpuid reports AVX512_BF16).
#include <algorithm>
#include <cstdint>

#include "gemm_engine.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx512bf16,fma")
#pragma GCC diagnostic ignored "-Wpsabi"

namespace pydecouple {
namespace cpu {
namespace {

// MR positions x NR vectors of 16 filters. Per pair of K: NR loads of B (16
// VNNI pairs each), MR broadcasts of A's pair, MR * NR dot products.
template <int MR, int NR>
void tile_bf16(int64_t K2, const uint16_t* a, int64_t lda, const uint32_t* b, int64_t ldb, float* c, int64_t ldc,
               bool acc_c) {
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NR; ++v) acc[r][v] = acc_c ? _mm512_loadu_ps(c + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t kp = 0; kp < K2; ++kp) {
    __m512bh bv[NR];
    for (int v = 0; v < NR; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + kp * ldb + 16 * v);
    for (int r = 0; r < MR; ++r) {
      const __m512bh av = (__m512bh)_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(a + r * lda + 2 * kp));
      for (int v = 0; v < NR; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NR; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
}

using TileFn = void (*)(int64_t, const uint16_t*, int64_t, const uint32_t*, int64_t, float*, int64_t, bool);
constexpr int kMR = 6, kNR = 4;

template <int NR>
TileFn pick_mr(int mr) {
  switch (mr) {
    case 1: return &tile_bf16<1, NR>;
    case 2: return &tile_bf16<2, NR>;
    case 3: return &tile_bf16<3, NR>;
    case 4: return &tile_bf16<4, NR>;
    case 5: return &tile_bf16<5, NR>;
    default: return &tile_bf16<6, NR>;
  }
}

TileFn pick_tile(int mr, int nr) {
  switch (nr) {
    case 1: return pick_mr<1>(mr);
    case 2: return pick_mr<2>(mr);
    case 3: return pick_mr<3>(mr);
    default: return pick_mr<4>(mr);
  }
}

void gemm_bf16(int64_t M, int64_t N, int64_t K, const void* av, int64_t lda, const void* bv, int64_t ldb, float* c,
               int64_t ldc, bool accumulate) {
  const uint16_t* a = static_cast<const uint16_t*>(av);
  const uint32_t* b = static_cast<const uint32_t*>(bv);
  for (int64_t n0 = 0; n0 < N; n0 += kNR * 16) {
    const int nr = static_cast<int>(std::min<int64_t>(kNR, (N - n0) / 16));
    for (int64_t m0 = 0; m0 < M; m0 += kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(kMR, M - m0));
      pick_tile(mr, nr)(K / 2, a + m0 * lda, lda, b + n0, ldb, c + m0 * ldc + n0, ldc, accumulate);
    }
  }
}

}  // namespace

GemmFn gemm_bf16_avx512() { return &gemm_bf16; }

}  // namespace cpu
}  // namespace pydecouple
#else
namespace pydecouple {
namespace cpu {
GemmFn gemm_bf16_avx512() { return nullptr; }
}  // namespace cpu
}  // namespace pydecouple
#endif
