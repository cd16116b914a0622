// The machine's arithmetic peak, measured: a register-only loop of
// independent multiply-adds per thread (no memory traffic), the number every
// benchmark's "fraction of peak" divides by. Not a kernel: a yardstick.
//
//   f32:  12 independent zmm (AVX-512) or ymm (AVX2) FMA chains per thread
//   bf16: 12 independent vdpbf16ps chains (AVX512_BF16): 2 multiply-adds per
//         32-bit lane per instruction
//
// Twelve chains cover an FMA latency of 4-6 cycles at one or two issues per
// cycle. AMX is not measured (its peak needs tile loads; say so in reports).

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <atomic>
#include <chrono>
#include <string>

#include "cpu_features.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace pydecouple {
namespace cpu {
namespace {

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) double loop_f32_avx512(int64_t iters) {
  __m512 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(1e-3f * i);
  const __m512 b = _mm512_set1_ps(0.999f), c = _mm512_set1_ps(1e-4f);
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm512_fmadd_ps(a[i], b, c);
  float s = 0;
  for (int i = 0; i < 12; ++i) s += _mm512_reduce_add_ps(a[i]);
  return s;
}

__attribute__((target("avx2,fma"))) double loop_f32_avx2(int64_t iters) {
  __m256 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm256_set1_ps(1e-3f * i);
  const __m256 b = _mm256_set1_ps(0.999f), c = _mm256_set1_ps(1e-4f);
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm256_fmadd_ps(a[i], b, c);
  alignas(32) float v[8];
  float s = 0;
  for (int i = 0; i < 12; ++i) {
    _mm256_store_ps(v, a[i]);
    for (float e : v) s += e;
  }
  return s;
}

__attribute__((target("avx512f,avx512bf16"))) double loop_bf16_avx512(int64_t iters) {
  __m512 a[12];
  for (int i = 0; i < 12; ++i) a[i] = _mm512_set1_ps(1e-3f * i);
  const __m512bh b = (__m512bh)_mm512_set1_epi32(0x3f803f80), c = (__m512bh)_mm512_set1_epi32(0x38d138d1);
  for (int64_t it = 0; it < iters; ++it)
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = _mm512_dpbf16_ps(a[i], b, c);
  float s = 0;
  for (int i = 0; i < 12; ++i) s += _mm512_reduce_add_ps(a[i]);
  return s;
}
#endif

}  // namespace

// GFLOP/s of every thread running the loop at once (2 flops per multiply-add).
double cpu_peak_gflops(const std::string& kind, int64_t millis) {
  const CpuFeatures& f = cpu_features();
  double (*loop)(int64_t) = nullptr;
  double flops_per_iter = 0;
#if defined(__x86_64__) && defined(__GNUC__)
  if (kind == "f32") {
    if (f.avx512) {
      loop = &loop_f32_avx512;
      flops_per_iter = 12 * 16 * 2;
    } else if (f.avx2) {
      loop = &loop_f32_avx2;
      flops_per_iter = 12 * 8 * 2;
    }
  } else if (kind == "bf16") {
    if (f.avx512_bf16) {
      loop = &loop_bf16_avx512;
      flops_per_iter = 12 * 16 * 4;
    }
  }
#endif
  TORCH_CHECK(kind == "f32" || kind == "bf16", "cpu_peak_gflops: argument 'kind' must be 'f32' or 'bf16', got '",
              kind, "'");
  if (loop == nullptr) return 0.0;  // no vector unit for it: callers report "not measured"
  TORCH_CHECK(millis >= 1, "cpu_peak_gflops: argument 'millis' must be >= 1, got ", millis);
  // Calibrate on one thread, then run every thread for about `millis`.
  int64_t iters = 1 << 16;
  for (;;) {
    const auto t0 = std::chrono::steady_clock::now();
    volatile double sink = loop(iters);
    (void)sink;
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (s * 1000 >= millis / 4.0 || iters > (int64_t{1} << 40)) {
      iters = static_cast<int64_t>(iters * (millis / 1000.0) / std::max(s, 1e-9));
      break;
    }
    iters *= 4;
  }
  const int64_t threads = at::get_num_threads();
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      volatile double sink = loop(iters);
      (void)sink;
    }
  });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return static_cast<double>(iters) * flops_per_iter * threads / s / 1e9;
}

}  // namespace cpu
}  // namespace pydecouple

TORCH_LIBRARY_FRAGMENT(pydecouple, m) { m.def("cpu_peak_gflops(str kind, int millis) -> float", &pydecouple::cpu::cpu_peak_gflops); }
