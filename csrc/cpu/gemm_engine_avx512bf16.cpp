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

// The last 8 filters (N = 16 k + 8) in ymm tiles: see tile_f32_ymm in
// gemm_engine_impl.h (a sample keeping 8 filters wasted half of every zmm).
template <int MR>
void tile_bf16_ymm(int64_t K2, const uint16_t* a, int64_t lda, const uint32_t* b, int64_t ldb, float* c, int64_t ldc,
                   bool acc_c) {
  // (r loops fully unrolled: GCC -O3 otherwise kept the ymm accumulators in
  // memory, a store per dot product.)
  __m256 acc[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) acc[r] = acc_c ? _mm256_loadu_ps(c + r * ldc) : _mm256_setzero_ps();
  for (int64_t kp = 0; kp < K2; ++kp) {
    const __m256bh bv = (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + kp * ldb));
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m256bh av = (__m256bh)_mm256_set1_epi32(*reinterpret_cast<const int32_t*>(a + r * lda + 2 * kp));
      acc[r] = _mm256_dpbf16_ps(acc[r], av, bv);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) _mm256_storeu_ps(c + r * ldc, acc[r]);
}

constexpr int kMRYmm = 8;

TileFn pick_tile_ymm(int mr) {
  switch (mr) {
    case 1: return &tile_bf16_ymm<1>;
    case 2: return &tile_bf16_ymm<2>;
    case 3: return &tile_bf16_ymm<3>;
    case 4: return &tile_bf16_ymm<4>;
    case 5: return &tile_bf16_ymm<5>;
    case 6: return &tile_bf16_ymm<6>;
    case 7: return &tile_bf16_ymm<7>;
    default: return &tile_bf16_ymm<8>;
  }
}

// N is a multiple of 8: whole zmm vectors, then an 8-filter tail in ymm.
void gemm_bf16(int64_t M, int64_t N, int64_t K, const void* av, int64_t lda, const void* bv, int64_t ldb, float* c,
               int64_t ldc, bool accumulate) {
  const uint16_t* a = static_cast<const uint16_t*>(av);
  const uint32_t* b = static_cast<const uint32_t*>(bv);
  const int64_t nvec = N / 16 * 16;
  for (int64_t n0 = 0; n0 < nvec; n0 += kNR * 16) {
    const int nr = static_cast<int>(std::min<int64_t>(kNR, (nvec - n0) / 16));
    for (int64_t m0 = 0; m0 < M; m0 += kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(kMR, M - m0));
      pick_tile(mr, nr)(K / 2, a + m0 * lda, lda, b + n0, ldb, c + m0 * ldc + n0, ldc, accumulate);
    }
  }
  if (N > nvec) {
    for (int64_t m0 = 0; m0 < M; m0 += kMRYmm) {
      const int mr = static_cast<int>(std::min<int64_t>(kMRYmm, M - m0));
      pick_tile_ymm(mr)(K / 2, a + m0 * lda, lda, b + nvec, ldb, c + m0 * ldc + nvec, ldc, accumulate);
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
