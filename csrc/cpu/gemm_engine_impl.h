// Body of the GEMM engine's kernels (see gemm_engine.h), included by one
// translation unit per instruction set:
//
//   ENGINE_NS   the namespace of this instantiation (avx512, avx2, generic)
//   ENGINE_ISA  0 = portable C++, 1 = AVX2 + FMA, 2 = AVX-512 (F, BW, VL, DQ)
//
// The including file sets the target (#pragma GCC target) before including
// this header, and includes no torch header. The bfloat16 dot-product GEMM
// lives in its own translation unit (gemm_engine_avx512bf16.cpp) so that no
// AVX512_BF16 instruction can appear in code that runs on an AVX-512 CPU
// without it.

#include <algorithm>
#include <cstring>
#include <vector>

#if ENGINE_ISA >= 1
#include <immintrin.h>
#endif

#include "gemm_engine.h"

// Vectors never cross a non-inline call here; the ABI note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace pydecouple {
namespace cpu {
namespace ENGINE_NS {
namespace {

// ----------------------------------------------------------------------------- scalar conversions

inline float bf16_to_f32(uint16_t v) {
  const uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, as PyTorch's c10::BFloat16 does; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float f16_to_f32(uint16_t v) {
  _Float16 h;
  std::memcpy(&h, &v, 2);
  return static_cast<float>(h);
}

inline uint16_t f32_to_f16(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t v;
  std::memcpy(&v, &h, 2);
  return v;
}

inline float load_elem(const void* p, int64_t i, Elem t) {
  switch (t) {
    case Elem::f32: return static_cast<const float*>(p)[i];
    case Elem::bf16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
}

inline void store_elem(void* p, int64_t i, Elem t, float v) {
  switch (t) {
    case Elem::f32: static_cast<float*>(p)[i] = v; break;
    case Elem::bf16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
    default: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); break;
  }
}

// ----------------------------------------------------------------------------- AVX-512 vector helpers

#if ENGINE_ISA >= 2
inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? __mmask16(0xffff) : __mmask16((1u << n) - 1u); }

// 16 elements of type t (n valid, the rest read as 0) as floats.
inline __m512 load16(const void* p, Elem t, __mmask16 m) {
  if (m == __mmask16(0xffff)) {
    // Whole vectors unmasked: the epilogues' passes run mostly on these.
    switch (t) {
      case Elem::f32: return _mm512_loadu_ps(p);
      case Elem::bf16:
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p))), 16));
      default: return _mm512_cvtph_ps(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
    }
  }
  switch (t) {
    case Elem::f32: return _mm512_maskz_loadu_ps(m, p);
    case Elem::bf16:
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
    default: return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
  }
}

// Round 16 floats to bfloat16 (nearest even; NaN quiet), as 16-bit lanes.
inline __m256i f32_to_bf16_16(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}

inline void store16(void* p, Elem t, __m512 v, __mmask16 m) {
  if (m == __mmask16(0xffff)) {
    // Whole vectors unmasked (a masked store measured several times slower on
    // Zen 4 in the dense route's epilogue).
    switch (t) {
      case Elem::f32: _mm512_storeu_ps(p, v); return;
      case Elem::bf16: _mm256_storeu_si256(static_cast<__m256i*>(p), f32_to_bf16_16(v)); return;
      default:
        _mm256_storeu_si256(static_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        return;
    }
  }
  switch (t) {
    case Elem::f32: _mm512_mask_storeu_ps(p, m, v); break;
    case Elem::bf16: _mm256_mask_storeu_epi16(p, m, f32_to_bf16_16(v)); break;
    default: _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)); break;
  }
}

// 16 x 16 transpose of 32-bit lanes: r[i] holds row i on entry, column i on
// exit (unpack pairs, then 64-bit pairs, then 128-bit lanes twice).
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xee);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int h = 0; h < 16; h += 8) {
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + 4 + i], 0x88);
      t[h + 4 + i] = _mm512_shuffle_f32x4(r[h + i], r[h + 4 + i], 0xdd);
    }
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
}
#endif

// ----------------------------------------------------------------------------- AVX2 vector helpers

#if ENGINE_ISA == 1
// AVX2 has no mask registers: tails are lane masks (all ones in the first n
// 32-bit lanes) for maskload/maskstore of float32, and a bounce through a
// small buffer for the 16-bit types.
alignas(32) constexpr int32_t kTailLanes[16] = {-1, -1, -1, -1, -1, -1, -1, -1, 0, 0, 0, 0, 0, 0, 0, 0};
inline __m256i tail8(int64_t n) {
  n = std::min<int64_t>(std::max<int64_t>(n, 0), 8);
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kTailLanes + 8 - n));
}

inline __m256 widen8(__m128i h, Elem t) {  // 8 bfloat16 or float16 as floats
  return t == Elem::bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)) : _mm256_cvtph_ps(h);
}

// 8 elements of type t (the first n valid, the rest read as 0) as floats.
inline __m256 load8(const void* p, Elem t, int64_t n) {
  if (n >= 8) {
    if (t == Elem::f32) return _mm256_loadu_ps(static_cast<const float*>(p));
    return widen8(_mm_loadu_si128(static_cast<const __m128i*>(p)), t);
  }
  if (t == Elem::f32) return _mm256_maskload_ps(static_cast<const float*>(p), tail8(n));
  alignas(16) uint16_t buf[8] = {};
  std::memcpy(buf, p, std::max<int64_t>(n, 0) * 2);
  return widen8(_mm_load_si128(reinterpret_cast<const __m128i*>(buf)), t);
}

// Round 8 floats to bfloat16 (nearest even; NaN quiet), as 16-bit lanes.
inline __m128i f32_to_bf16_8(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
  // Every lane is below 2^16: the unsigned pack is exact; it packs within
  // 128-bit halves, so the two 64-bit results are brought together.
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}

inline __m128i narrow8(__m256 v, Elem t) {
  return t == Elem::bf16 ? f32_to_bf16_8(v) : _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// The first n of 8 floats stored as type t (n >= 8: all of them).
inline void store8(void* p, Elem t, __m256 v, int64_t n) {
  if (n >= 8) {
    if (t == Elem::f32) {
      _mm256_storeu_ps(static_cast<float*>(p), v);
    } else {
      _mm_storeu_si128(static_cast<__m128i*>(p), narrow8(v, t));
    }
    return;
  }
  if (n <= 0) return;
  if (t == Elem::f32) {
    _mm256_maskstore_ps(static_cast<float*>(p), tail8(n), v);
    return;
  }
  alignas(16) uint16_t buf[8];
  _mm_store_si128(reinterpret_cast<__m128i*>(buf), narrow8(v, t));
  std::memcpy(p, buf, n * 2);
}

// The lanes of 8 mask bytes that are nonzero, as a lane mask (first n bytes).
inline __m256 keep8(const uint8_t* m, int64_t n) {
  int64_t bytes = 0;
  std::memcpy(&bytes, m, std::min<int64_t>(n, 8));
  const __m256i b = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(b, _mm256_setzero_si256()));
}

// AVX2 has no vcompressps / vexpandps: per 8-bit lane mask, vpermps indices
// that do the same. compress[b]: lane k takes the k-th set lane of b;
// expand[b]: set lane j takes the element counted by the set lanes below j;
// lanes[b]: the lane mask of b.
struct LaneTables {
  __m256i compress[256], expand[256];
  __m256 lanes[256];
};

inline const LaneTables& lane_tables() {
  static const LaneTables t = [] {
    LaneTables l;
    for (int b = 0; b < 256; ++b) {
      alignas(32) int32_t comp[8] = {}, exp[8] = {}, lanes[8] = {};
      for (int j = 0, k = 0; j < 8; ++j) {
        if (b >> j & 1) {
          comp[k] = j;
          exp[j] = k++;
          lanes[j] = -1;
        }
      }
      l.compress[b] = _mm256_load_si256(reinterpret_cast<const __m256i*>(comp));
      l.expand[b] = _mm256_load_si256(reinterpret_cast<const __m256i*>(exp));
      l.lanes[b] = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(lanes)));
    }
    return l;
  }();
  return t;
}

// The 8 lanes of 16-lane mask words `bits` that hold lanes [8 i, 8 i + 8).
inline unsigned byte_of(const uint16_t* bits, int64_t i) { return (bits[i >> 1] >> (8 * (i & 1))) & 0xffu; }

// 8 x 8 transpose: r[i] holds row i on entry, column i on exit.
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}
#endif

// ----------------------------------------------------------------------------- gather_input

void gather_input(const void* x, Elem xt, Elem ct, int64_t sC, int64_t sH, int64_t sW, const ConvShape& s,
                  const int32_t* cidx, const uint16_t* in_bits, int64_t ki, int64_t kip, void* xg) {
  (void)in_bits;
#if ENGINE_ISA >= 2
  const int64_t HW = s.H * s.W;
  const Elem ct2 = ct;
  if (sC == 1) {
    // Channels contiguous (NHWC): compress each position's channel vector.
    const int64_t nchunk = (s.C + 15) / 16;
    const int64_t es = elem_bytes(xt);
    for (int64_t h = 0; h < s.H; ++h) {
      for (int64_t w = 0; w < s.W; ++w) {
        const char* src = static_cast<const char*>(x) + (h * sH + w * sW) * es;
        const int64_t row = (h * s.W + w) * kip;
        int64_t off = 0;
        for (int64_t i = 0; i < nchunk; ++i) {
          const __mmask16 keep = in_bits[i];
          if (!keep) continue;
          const __m512 v = load16(src + 16 * i * es, xt, tail_mask(s.C - 16 * i));
          const __m512 c = _mm512_maskz_compress_ps(keep, v);
          const __mmask16 cnt = tail_mask(__builtin_popcount(keep));
          if (ct2 == Elem::f32) {
            _mm512_mask_storeu_ps(static_cast<float*>(xg) + row + off, cnt, c);
          } else {
            // bf16 -> bf16: the float is an exact widening; narrow it back.
            _mm256_mask_storeu_epi16(static_cast<uint16_t*>(xg) + row + off, cnt,
                                     _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(c), 16)));
          }
          off += __builtin_popcount(keep);
        }
        for (int64_t j = ki; j < kip; ++j) store_elem(xg, row + j, ct2, 0.0f);
      }
    }
    return;
  }
  if (sW == 1 && sH == s.W) {
    // NCHW planes: 16 kept channels x 16 positions at a time, transposed in registers.
    const int64_t es = elem_bytes(xt);
    for (int64_t j0 = 0; j0 < ki; j0 += 16) {
      const int64_t nj = std::min<int64_t>(16, ki - j0);
      for (int64_t p0 = 0; p0 < HW; p0 += 16) {
        const int64_t np = std::min<int64_t>(16, HW - p0);
        const __mmask16 pm = tail_mask(np);
        __m512 r[16];
        for (int64_t j = 0; j < 16; ++j) {
          r[j] = j < nj ? load16(static_cast<const char*>(x) + (cidx[j0 + j] * sC + p0) * es, xt, pm)
                        : _mm512_setzero_ps();
        }
        transpose16(r);
        const __mmask16 jm = tail_mask(nj);
        for (int64_t p = 0; p < np; ++p) {
          const int64_t dst = (p0 + p) * kip + j0;
          if (ct2 == Elem::f32) {
            _mm512_mask_storeu_ps(static_cast<float*>(xg) + dst, jm, r[p]);
          } else {
            _mm256_mask_storeu_epi16(static_cast<uint16_t*>(xg) + dst, jm,
                                     _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(r[p]), 16)));
          }
        }
      }
    }
    for (int64_t p = 0; p < HW; ++p)
      for (int64_t j = ki; j < kip; ++j) store_elem(xg, p * kip + j, ct2, 0.0f);
    return;
  }
#elif ENGINE_ISA == 1
  if (sC == 1 && ct == Elem::f32) {
    // Channels contiguous (NHWC): each position's kept channels, 8 at a time,
    // moved to the front of a vector by the compress index and stored whole
    // (the lanes past the kept ones are overwritten by the next store, or
    // by the row's zero padding; only a store that would leave the row is
    // masked).
    const LaneTables& lt = lane_tables();
    const int64_t nchunk = (s.C + 7) / 8;
    const int64_t es = elem_bytes(xt);
    float* xf = static_cast<float*>(xg);
    for (int64_t h = 0; h < s.H; ++h) {
      for (int64_t w = 0; w < s.W; ++w) {
        const char* src = static_cast<const char*>(x) + (h * sH + w * sW) * es;
        float* dst = xf + (h * s.W + w) * kip;
        int64_t off = 0;
        for (int64_t i = 0; i < nchunk; ++i) {
          const unsigned keep = byte_of(in_bits, i);
          if (!keep) continue;
          const int cnt = __builtin_popcount(keep);
          const __m256 v = _mm256_permutevar8x32_ps(load8(src + 8 * i * es, xt, s.C - 8 * i), lt.compress[keep]);
          if (off + 8 <= kip) {
            _mm256_storeu_ps(dst + off, v);
          } else {
            _mm256_maskstore_ps(dst + off, tail8(cnt), v);
          }
          off += cnt;
        }
        for (int64_t j = ki; j < kip; ++j) dst[j] = 0.0f;
      }
    }
    return;
  }
#endif
  // Any strides: element by element.
  for (int64_t h = 0; h < s.H; ++h) {
    for (int64_t w = 0; w < s.W; ++w) {
      const int64_t row = (h * s.W + w) * kip;
      const int64_t base = h * sH + w * sW;
      if (ct == xt) {
        const int64_t es = elem_bytes(xt);
        for (int64_t j = 0; j < ki; ++j)
          std::memcpy(static_cast<char*>(xg) + (row + j) * es, static_cast<const char*>(x) + (base + cidx[j] * sC) * es,
                      es);
      } else {
        for (int64_t j = 0; j < ki; ++j) store_elem(xg, row + j, ct, load_elem(x, base + cidx[j] * sC, xt));
      }
      for (int64_t j = ki; j < kip; ++j) store_elem(xg, row + j, ct, 0.0f);
    }
  }
}

// ----------------------------------------------------------------------------- im2col

// Copies of a few hundred bytes, one per (position, tap): a call of memcpy
// costs more than the copy itself, so vectors are moved inline.
inline void copy_row(char* dst, const char* src, int64_t bytes) {
#if ENGINE_ISA >= 2
  int64_t i = 0;
  for (; i + 64 <= bytes; i += 64) _mm512_storeu_si512(dst + i, _mm512_loadu_si512(src + i));
  if (i < bytes) {
    const __mmask64 m = bytes - i >= 64 ? ~__mmask64{0} : ((__mmask64{1} << (bytes - i)) - 1);
    _mm512_mask_storeu_epi8(dst + i, m, _mm512_maskz_loadu_epi8(m, src + i));
  }
#elif ENGINE_ISA == 1
  // No byte masks in AVX2: the tail is one more full-width move that ends at
  // the row's end and overlaps what was already copied (same bytes again).
  if (bytes >= 32) {
    int64_t i = 0;
    for (; i + 32 <= bytes; i += 32)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
    if (i < bytes)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + bytes - 32),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + bytes - 32)));
  } else if (bytes >= 16) {
    const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
    const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + bytes - 16));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), lo);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + bytes - 16), hi);
  } else {
    std::memcpy(dst, src, bytes);
  }
#else
  std::memcpy(dst, src, bytes);
#endif
}

inline void zero_row(char* dst, int64_t bytes) {
#if ENGINE_ISA >= 2
  int64_t i = 0;
  for (; i + 64 <= bytes; i += 64) _mm512_storeu_si512(dst + i, _mm512_setzero_si512());
  if (i < bytes) {
    const __mmask64 m = (__mmask64{1} << (bytes - i)) - 1;
    _mm512_mask_storeu_epi8(dst + i, m, _mm512_setzero_si512());
  }
#elif ENGINE_ISA == 1
  if (bytes >= 32) {
    const __m256i z = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 32 <= bytes; i += 32) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), z);
    if (i < bytes) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + bytes - 32), z);
  } else if (bytes >= 16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_setzero_si128());
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + bytes - 16), _mm_setzero_si128());
  } else {
    std::memset(dst, 0, bytes);
  }
#else
  std::memset(dst, 0, bytes);
#endif
}

// The im2col loop: for output positions [p0, p0 + M) and every tap, `put`
// writes one row of `row` bytes at dst from src, the input row the tap
// reads, or from nullptr where the tap falls in the padding (zeros).
template <typename Put>
inline void im2col_rows(const char* xg, const ConvShape& s, int64_t row, int64_t p0, int64_t M, char* a, Put put) {
  for (int64_t r = 0; r < M; ++r) {
    const int64_t p = p0 + r, ho = p / s.Wo, wo = p % s.Wo;
    char* dst = a + r * s.KK * row;
    for (int64_t kh = 0; kh < s.KH; ++kh) {
      const int64_t h = ho * s.sh - s.pt + kh * s.dh;
      const bool hin = h >= 0 && h < s.H;
      for (int64_t kw = 0; kw < s.KW; ++kw, dst += row) {
        const int64_t w = wo * s.sw - s.pl + kw * s.dw;
        put(dst, hin && w >= 0 && w < s.W ? xg + (h * s.W + w) * row : nullptr);
      }
    }
  }
}

void im2col(const char* xg, const ConvShape& s, int64_t kip, int64_t es, int64_t p0, int64_t M, char* a) {
  const int64_t row = kip * es;
#if ENGINE_ISA >= 1
  // Rows of exactly 16, 32 or 64 bytes (4-16 float32 channels, 8-32
  // bfloat16): plain loads and stores of that width; under AVX-512, other
  // rows up to 64 bytes: one masked load and store, the mask made once.
  switch (row) {
    case 64:
#if ENGINE_ISA >= 2
      return im2col_rows(xg, s, row, p0, M, a, [](char* dst, const char* src) {
        _mm512_storeu_si512(dst, src ? _mm512_loadu_si512(src) : _mm512_setzero_si512());
      });
#else
      return im2col_rows(xg, s, row, p0, M, a, [](char* dst, const char* src) {
        auto* d = reinterpret_cast<__m256i*>(dst);
        const auto* q = reinterpret_cast<const __m256i*>(src);
        _mm256_storeu_si256(d, src ? _mm256_loadu_si256(q) : _mm256_setzero_si256());
        _mm256_storeu_si256(d + 1, src ? _mm256_loadu_si256(q + 1) : _mm256_setzero_si256());
      });
#endif
    case 32:
      return im2col_rows(xg, s, row, p0, M, a, [](char* dst, const char* src) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                            src ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)) : _mm256_setzero_si256());
      });
    case 16:
      return im2col_rows(xg, s, row, p0, M, a, [](char* dst, const char* src) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst),
                         src ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(src)) : _mm_setzero_si128());
      });
    default: break;
  }
#endif
#if ENGINE_ISA >= 2
  if (row < 64) {
    const __mmask64 m = (__mmask64{1} << row) - 1;
    return im2col_rows(xg, s, row, p0, M, a, [m](char* dst, const char* src) {
      _mm512_mask_storeu_epi8(dst, m, src ? _mm512_maskz_loadu_epi8(m, src) : _mm512_setzero_si512());
    });
  }
#endif
  im2col_rows(xg, s, row, p0, M, a, [row](char* dst, const char* src) {
    if (src) {
      copy_row(dst, src, row);
    } else {
      zero_row(dst, row);
    }
  });
}

// ----------------------------------------------------------------------------- gather_weight

template <Elem CT>
void gather_weight_t(const void* wt, const ConvShape& s, const int32_t* cidx, int64_t ki, int64_t t0, int64_t t1,
                     int64_t j0, int64_t j1, const KeptFilters& kf, int64_t c0, int64_t c1, int64_t ldb, void* bout) {
  // The 16-filter words that hold kept filters [c0, c1), with the bits of
  // kept filters outside the range cleared in the first and last word.
  const int64_t of = kf.idx[c0], ol = kf.idx[c1 - 1];
  const int64_t i0 = of / 16, i1 = ol / 16;
  const uint16_t first = static_cast<uint16_t>(0xffffu << (of % 16));
  const uint16_t lastm = static_cast<uint16_t>(0xffffu >> (15 - ol % 16));
  const int64_t step = CT == Elem::f32 ? 1 : 2;
  int64_t row = 0;
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t j = j0; j < j1; j += step, ++row) {
      if (CT == Elem::f32) {
        float* dst = static_cast<float*>(bout) + row * ldb;
        if (j >= ki) {
          std::memset(dst, 0, sizeof(float) * ldb);
          continue;
        }
        const float* src = static_cast<const float*>(wt) + (t * s.C + cidx[j]) * s.Op;
#if ENGINE_ISA >= 2
        if (c0 == 0 && c1 == kf.ko) {
          // The whole row: kept lanes stream into a register and leave it as
          // full, aligned vectors (one store per 16 kept filters; stores were
          // the gather's bottleneck).
          __m512 pend = _mm512_setzero_ps();
          for (int64_t i = 0; i <= i1; ++i) {
            const uint16_t keep = kf.bits[i];
            if (!keep) continue;
            const __m512 v = _mm512_loadu_ps(src + 16 * i);
            const __m512 merged = _mm512_permutex2var_ps(pend, _mm512_loadu_si512(kf.merge + 16 * i), v);
            const int fill = kf.offs[i] % 16;
            if (fill + __builtin_popcount(keep) >= 16) {
              _mm512_storeu_ps(dst + (kf.offs[i] - fill), merged);
              pend = _mm512_permutexvar_ps(_mm512_loadu_si512(kf.rest + 16 * i), v);
            } else {
              pend = merged;
            }
          }
          if (kf.ko % 16) _mm512_storeu_ps(dst + kf.ko / 16 * 16, pend);
          continue;
        }
        // A range of the kept filters: one load, one permute and one
        // full-width store per 16 filters. The permute (the word's
        // precomputed index) moves the kept lanes first; the lanes after
        // them land where the next word's store, or the next row, writes
        // afterwards. (vcompressps measured ~5 cycles a word on Zen 4, the
        // permute ~1.) A first word cut by c0 shifts its kept lanes down
        // past the ones before c0.
        for (int64_t i = i0; i <= i1; ++i) {
          uint16_t keep = kf.bits[i];
          if (i == i1) keep &= lastm;
          if (!keep) continue;
          __m512i idx = _mm512_loadu_si512(kf.perm + 16 * i);
          int64_t off = kf.offs[i] - c0;
          if (i == i0 && (keep & ~first)) {
            const int skip = __builtin_popcount(keep & ~first);  // kept filters before c0
            idx = _mm512_permutexvar_epi32(_mm512_add_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4,
                                                                             3, 2, 1, 0),
                                                            _mm512_set1_epi32(skip)),
                                           idx);
            off += skip;
          }
          _mm512_storeu_ps(dst + off, _mm512_permutexvar_ps(idx, _mm512_loadu_ps(src + 16 * i)));
        }
#else
        for (int64_t m = c0; m < c1; ++m) dst[m - c0] = src[kf.idx[m]];
#endif
      } else {
        // VNNI pairs: rows (t, j) and (t, j + 1) interleaved per filter.
        uint32_t* dst = static_cast<uint32_t*>(bout) + row * ldb;
        if (j >= ki) {
          std::memset(dst, 0, sizeof(uint32_t) * ldb);
          continue;
        }
        const uint16_t* ra = static_cast<const uint16_t*>(wt) + (t * s.C + cidx[j]) * s.Op;
        const uint16_t* rb = j + 1 < ki ? static_cast<const uint16_t*>(wt) + (t * s.C + cidx[j + 1]) * s.Op : nullptr;
#if ENGINE_ISA >= 2
        if (c0 == 0 && c1 == kf.ko) {
          __m512i pend = _mm512_setzero_si512();
          for (int64_t i = 0; i <= i1; ++i) {
            const uint16_t keep = kf.bits[i];
            if (!keep) continue;
            const __m512i lo =
                _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ra + 16 * i)));
            const __m512i hi =
                rb ? _mm512_slli_epi32(
                         _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rb + 16 * i))), 16)
                   : _mm512_setzero_si512();
            const __m512i v = _mm512_or_si512(lo, hi);
            const __m512i merged = _mm512_permutex2var_epi32(pend, _mm512_loadu_si512(kf.merge + 16 * i), v);
            const int fill = kf.offs[i] % 16;
            if (fill + __builtin_popcount(keep) >= 16) {
              _mm512_storeu_si512(dst + (kf.offs[i] - fill), merged);
              pend = _mm512_permutexvar_epi32(_mm512_loadu_si512(kf.rest + 16 * i), v);
            } else {
              pend = merged;
            }
          }
          if (kf.ko % 16) _mm512_storeu_si512(dst + kf.ko / 16 * 16, pend);
          continue;
        }
        for (int64_t i = i0; i <= i1; ++i) {
          uint16_t keep = kf.bits[i];
          if (i == i1) keep &= lastm;
          if (!keep) continue;
          __m512i idx = _mm512_loadu_si512(kf.perm + 16 * i);
          int64_t off = kf.offs[i] - c0;
          if (i == i0 && (keep & ~first)) {
            const int skip = __builtin_popcount(keep & ~first);
            idx = _mm512_permutexvar_epi32(_mm512_add_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4,
                                                                             3, 2, 1, 0),
                                                            _mm512_set1_epi32(skip)),
                                           idx);
            off += skip;
          }
          const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(ra + 16 * i)));
          const __m512i hi =
              rb ? _mm512_slli_epi32(
                       _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rb + 16 * i))), 16)
                 : _mm512_setzero_si512();
          _mm512_storeu_si512(dst + off, _mm512_permutexvar_epi32(idx, _mm512_or_si512(lo, hi)));
        }
#else
        for (int64_t m = c0; m < c1; ++m) {
          const uint32_t lo = ra[kf.idx[m]], hi = rb ? rb[kf.idx[m]] : 0u;
          dst[m - c0] = lo | (hi << 16);
        }
#endif
      }
    }
  }
  (void)i0;
  (void)i1;
  (void)first;
  (void)lastm;
}

void gather_weight_f32(const void* wt, const ConvShape& s, const int32_t* cidx, int64_t ki, int64_t t0, int64_t t1,
                       int64_t j0, int64_t j1, const KeptFilters& kf, int64_t c0, int64_t c1, int64_t ldb, void* b) {
  gather_weight_t<Elem::f32>(wt, s, cidx, ki, t0, t1, j0, j1, kf, c0, c1, ldb, b);
}

[[maybe_unused]] void gather_weight_bf16(const void* wt, const ConvShape& s, const int32_t* cidx, int64_t ki, int64_t t0, int64_t t1,
                        int64_t j0, int64_t j1, const KeptFilters& kf, int64_t c0, int64_t c1, int64_t ldb, void* b) {
  gather_weight_t<Elem::bf16>(wt, s, cidx, ki, t0, t1, j0, j1, kf, c0, c1, ldb, b);
}

// ----------------------------------------------------------------------------- float32 GEMM micro-kernels

#if ENGINE_ISA >= 2
// MR rows x NR vectors of 16 filters; A broadcast per row, B loaded per vector.
template <int MR, int NR>
void tile_f32(int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, bool acc_c) {
  __m512 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NR; ++v) acc[r][v] = acc_c ? _mm512_loadu_ps(c + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m512 bv[NR];
    for (int v = 0; v < NR; ++v) bv[v] = _mm512_loadu_ps(b + k * ldb + 16 * v);
    for (int r = 0; r < MR; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + k]);
      for (int v = 0; v < NR; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NR; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
}
constexpr int kVec = 16;
#elif ENGINE_ISA >= 1
template <int MR, int NR>
void tile_f32(int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, bool acc_c) {
  __m256 acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NR; ++v) acc[r][v] = acc_c ? _mm256_loadu_ps(c + r * ldc + 8 * v) : _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    __m256 bv[NR];
    for (int v = 0; v < NR; ++v) bv[v] = _mm256_loadu_ps(b + k * ldb + 8 * v);
    for (int r = 0; r < MR; ++r) {
      // By value, not _mm256_broadcast_ss(pointer): GCC -O3 then kept the
      // accumulators in memory (a store per FMA), the float pointer possibly
      // aliasing them.
      const __m256 av = _mm256_set1_ps(a[r * lda + k]);
      for (int v = 0; v < NR; ++v) acc[r][v] = _mm256_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NR; ++v) _mm256_storeu_ps(c + r * ldc + 8 * v, acc[r][v]);
}
constexpr int kVec = 8;
#else
template <int MR, int NR>
void tile_f32(int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, bool acc_c) {
  constexpr int NW = NR * 8;
  float acc[MR][NW] = {};
  if (acc_c)
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NW; ++v) acc[r][v] = c[r * ldc + v];
  for (int64_t k = 0; k < K; ++k) {
    for (int r = 0; r < MR; ++r) {
      const float av = a[r * lda + k];
      for (int v = 0; v < NW; ++v) acc[r][v] += av * b[k * ldb + v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NW; ++v) c[r * ldc + v] = acc[r][v];
}
constexpr int kVec = 8;
#endif

// Register tiles: NR vectors of filters by MR positions, MR * NR accumulators
// (AVX-512: 24 of 32 zmm for 6 x 4, AVX2: 12 of 16 ymm for 6 x 2).
#if ENGINE_ISA >= 2
constexpr int kNR = 4;
#else
constexpr int kNR = 2;
#endif
constexpr int kMR = 6;

using TileFn = void (*)(int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t, bool);

template <int NR>
TileFn pick_mr(int mr) {
  switch (mr) {
    case 1: return &tile_f32<1, NR>;
    case 2: return &tile_f32<2, NR>;
    case 3: return &tile_f32<3, NR>;
    case 4: return &tile_f32<4, NR>;
    case 5: return &tile_f32<5, NR>;
    default: return &tile_f32<6, NR>;
  }
}

TileFn pick_tile(int mr, int nr) {
  switch (nr) {
    case 1: return pick_mr<1>(mr);
#if ENGINE_ISA >= 2
    case 2: return pick_mr<2>(mr);
    case 3: return pick_mr<3>(mr);
    default: return pick_mr<4>(mr);
#else
    default: return pick_mr<2>(mr);
#endif
  }
}

#if ENGINE_ISA >= 2
// The last 8 filters of a row of kept filters (N = 16 k + 8) in ymm tiles.
// A sample keeping 8 filters (a 16-filter layer at half) computed them in a
// zmm with half its lanes wasted; Zen 4 runs two ymm FMAs a cycle and one
// zmm, so the ymm tile does the same useful work in half the time.
template <int MR>
void tile_f32_ymm(int64_t K, const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                  bool acc_c) {
  // (Loops over r fully unrolled and A read by value: GCC -O3 otherwise kept
  // the ymm accumulators in memory, one store per FMA: a load through a float
  // pointer may alias them.)
  __m256 acc[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) acc[r] = acc_c ? _mm256_loadu_ps(c + r * ldc) : _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 bv = _mm256_loadu_ps(b + k * ldb);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(a[r * lda + k]), bv, acc[r]);
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) _mm256_storeu_ps(c + r * ldc, acc[r]);
}

constexpr int kMRYmm = 8;  // 8 accumulators: two FMA pipes x a latency of 4

TileFn pick_tile_ymm(int mr) {
  switch (mr) {
    case 1: return &tile_f32_ymm<1>;
    case 2: return &tile_f32_ymm<2>;
    case 3: return &tile_f32_ymm<3>;
    case 4: return &tile_f32_ymm<4>;
    case 5: return &tile_f32_ymm<5>;
    case 6: return &tile_f32_ymm<6>;
    case 7: return &tile_f32_ymm<7>;
    default: return &tile_f32_ymm<8>;
  }
}
#endif

// C = A * B, K split in L1-sized slices is not needed: a B panel of NR
// vectors streams from L2 at NR loads per MR * NR FMAs. N is a multiple of 8:
// whole vectors, then (AVX-512) an 8-filter tail in ymm tiles.
void gemm_f32(int64_t M, int64_t N, int64_t K, const void* av, int64_t lda, const void* bv, int64_t ldb, float* c,
              int64_t ldc, bool accumulate) {
  const float* a = static_cast<const float*>(av);
  const float* b = static_cast<const float*>(bv);
  const int64_t nvec = N / kVec * kVec;
  for (int64_t n0 = 0; n0 < nvec; n0 += kNR * kVec) {
    const int nr = static_cast<int>(std::min<int64_t>(kNR, (nvec - n0) / kVec));
    for (int64_t m0 = 0; m0 < M; m0 += kMR) {
      const int mr = static_cast<int>(std::min<int64_t>(kMR, M - m0));
      pick_tile(mr, nr)(K, a + m0 * lda, lda, b + n0, ldb, c + m0 * ldc + n0, ldc, accumulate);
    }
  }
#if ENGINE_ISA >= 2
  if (N > nvec) {
    for (int64_t m0 = 0; m0 < M; m0 += kMRYmm) {
      const int mr = static_cast<int>(std::min<int64_t>(kMRYmm, M - m0));
      pick_tile_ymm(mr)(K, a + m0 * lda, lda, b + nvec, ldb, c + m0 * ldc + nvec, ldc, accumulate);
    }
  }
#endif
}

// ----------------------------------------------------------------------------- epilogue

void epilogue(const float* c, int64_t ldc, int64_t M, int64_t p0, const KeptFilters& kf, int64_t c0, int64_t c1,
              bool write_deselected, const ConvShape& s, const Epilogue& e) {
  const Elem ot = e.ot;
  const int64_t es = elem_bytes(ot);
  const float* bias = e.bias;
  const char* res = static_cast<const char*>(e.residual);
  char* out = static_cast<char*>(e.out);
  // The value of a deselected filter: 0, or relu?(residual).
  auto deselected = [&](float r) { return e.residual_relu ? std::max(r, 0.0f) : r; };
  if (e.nhwc) {
#if ENGINE_ISA >= 2
    if (write_deselected) {
      // Each output row at once: the kept values expanded into their lanes,
      // zeros in the others, bias only where kept.
      const int64_t nchunk = (s.O + 15) / 16;
      for (int64_t r = 0; r < M; ++r) {
        char* row = out + (p0 + r) * s.O * es;
        const char* rrow = res ? res + (p0 + r) * s.O * es : nullptr;
        const float* cr = c + r * ldc;
        int64_t off = 0;
        for (int64_t i = 0; i < nchunk; ++i) {
          const __mmask16 keep = kf.bits[i];
          const __mmask16 lanes = tail_mask(s.O - 16 * i);
          __m512 v = _mm512_maskz_expandloadu_ps(keep, cr + off);
          if (bias) v = _mm512_maskz_add_ps(keep, v, _mm512_maskz_loadu_ps(lanes, bias + 16 * i));
          if (e.relu) v = _mm512_max_ps(v, _mm512_setzero_ps());
          if (rrow) {
            v = _mm512_add_ps(v, load16(rrow + 16 * i * es, ot, lanes));
            if (e.residual_relu) v = _mm512_max_ps(v, _mm512_setzero_ps());
          }
          store16(row + 16 * i * es, ot, v, lanes);
          off += __builtin_popcount(keep);
        }
      }
      return;
    }
#elif ENGINE_ISA == 1
    if (write_deselected) {
      // As above, 8 lanes a vector: the kept values of a word loaded (only
      // as many as it keeps), moved to their lanes by the expand index.
      const LaneTables& lt = lane_tables();
      const int64_t nchunk = (s.O + 7) / 8;
      const __m256 zero = _mm256_setzero_ps();
      for (int64_t r = 0; r < M; ++r) {
        char* row = out + (p0 + r) * s.O * es;
        const char* rrow = res ? res + (p0 + r) * s.O * es : nullptr;
        const float* cr = c + r * ldc;
        int64_t off = 0;
        for (int64_t i = 0; i < nchunk; ++i) {
          const unsigned keep = byte_of(kf.bits, i);
          const int64_t n = s.O - 8 * i;
          __m256 v = zero;
          if (keep) {
            const int cnt = __builtin_popcount(keep);
            v = _mm256_permutevar8x32_ps(_mm256_maskload_ps(cr + off, tail8(cnt)), lt.expand[keep]);
            if (bias) v = _mm256_add_ps(v, load8(bias + 8 * i, Elem::f32, n));
            v = _mm256_and_ps(v, lt.lanes[keep]);
            off += cnt;
          }
          if (e.relu) v = _mm256_max_ps(v, zero);
          if (rrow) {
            v = _mm256_add_ps(v, load8(rrow + 8 * i * es, ot, n));
            if (e.residual_relu) v = _mm256_max_ps(v, zero);
          }
          store8(row + 8 * i * es, ot, v, n);
        }
      }
      return;
    }
#endif
    for (int64_t r = 0; r < M; ++r) {
      char* row = out + (p0 + r) * s.O * es;
      const char* rrow = res ? res + (p0 + r) * s.O * es : nullptr;
      if (write_deselected) {
        for (int64_t o = 0; o < s.O; ++o) store_elem(row, o, ot, rrow ? deselected(load_elem(rrow, o, ot)) : 0.0f);
      }
      const float* cr = c + r * ldc - c0;
      for (int64_t m = c0; m < c1; ++m) {
        const int64_t o = kf.idx[m];
        float v = cr[m] + (bias ? bias[o] : 0.0f);
        if (e.relu) v = std::max(v, 0.0f);
        if (rrow) {
          v += load_elem(rrow, o, ot);
          if (e.residual_relu) v = std::max(v, 0.0f);
        }
        store_elem(row, o, ot, v);
      }
    }
    return;
  }
  // NCHW: each filter's plane gets M contiguous positions.
  if (write_deselected) {
    int64_t m = 0;
    for (int64_t o = 0; o < s.O; ++o) {
      if (m < kf.ko && kf.idx[m] == o) {
        ++m;
        continue;
      }
      char* dst = out + (o * s.P + p0) * es;
      if (res == nullptr) {
        std::memset(dst, 0, M * es);
      } else {
        const char* src = res + (o * s.P + p0) * es;
#if ENGINE_ISA == 1
        for (int64_t r = 0; r < M; r += 8) {
          __m256 v = load8(src + r * es, ot, M - r);
          if (e.residual_relu) v = _mm256_max_ps(v, _mm256_setzero_ps());
          store8(dst + r * es, ot, v, M - r);
        }
#else
        for (int64_t r = 0; r < M; ++r) store_elem(dst, r, ot, deselected(load_elem(src, r, ot)));
#endif
      }
    }
  }
#if ENGINE_ISA >= 2
  // 16 positions x 16 kept filters, transposed in registers.
  for (int64_t m0 = c0; m0 < c1; m0 += 16) {
    const int64_t nm = std::min<int64_t>(16, c1 - m0);
    __m512 bvec = _mm512_setzero_ps();
    if (bias) {
      alignas(64) float bb[16] = {};
      for (int64_t i = 0; i < nm; ++i) bb[i] = bias[kf.idx[m0 + i]];
      bvec = _mm512_load_ps(bb);
    }
    for (int64_t r0 = 0; r0 < M; r0 += 16) {
      const int64_t nr = std::min<int64_t>(16, M - r0);
      __m512 t[16];
      for (int64_t r = 0; r < 16; ++r) {
        t[r] = r < nr ? _mm512_add_ps(_mm512_maskz_loadu_ps(tail_mask(nm), c + (r0 + r) * ldc + (m0 - c0)), bvec)
                      : _mm512_setzero_ps();
        if (e.relu) t[r] = _mm512_max_ps(t[r], _mm512_setzero_ps());
      }
      transpose16(t);
      const __mmask16 rm = tail_mask(nr);
      for (int64_t i = 0; i < nm; ++i) {
        const int64_t o = kf.idx[m0 + i];
        const int64_t at = (o * s.P + p0 + r0) * es;
        __m512 v = t[i];
        if (res) {
          v = _mm512_add_ps(v, load16(res + at, ot, rm));
          if (e.residual_relu) v = _mm512_max_ps(v, _mm512_setzero_ps());
        }
        store16(out + at, ot, v, rm);
      }
    }
  }
#elif ENGINE_ISA == 1
  // 8 positions x 8 kept filters, transposed in registers.
  const __m256 zero = _mm256_setzero_ps();
  for (int64_t m0 = c0; m0 < c1; m0 += 8) {
    const int64_t nm = std::min<int64_t>(8, c1 - m0);
    alignas(32) float bb[8] = {};
    if (bias)
      for (int64_t i = 0; i < nm; ++i) bb[i] = bias[kf.idx[m0 + i]];
    const __m256 bvec = _mm256_load_ps(bb);
    for (int64_t r0 = 0; r0 < M; r0 += 8) {
      const int64_t nr = std::min<int64_t>(8, M - r0);
      __m256 t[8];
      for (int64_t r = 0; r < 8; ++r) {
        t[r] = r < nr ? _mm256_add_ps(_mm256_maskload_ps(c + (r0 + r) * ldc + (m0 - c0), tail8(nm)), bvec) : zero;
        if (e.relu) t[r] = _mm256_max_ps(t[r], zero);
      }
      transpose8(t);
      for (int64_t i = 0; i < nm; ++i) {
        const int64_t at = (kf.idx[m0 + i] * s.P + p0 + r0) * es;
        __m256 v = t[i];
        if (res) {
          v = _mm256_add_ps(v, load8(res + at, ot, nr));
          if (e.residual_relu) v = _mm256_max_ps(v, zero);
        }
        store8(out + at, ot, v, nr);
      }
    }
  }
#else
  for (int64_t mm = c0; mm < c1; ++mm) {
    const int64_t o = kf.idx[mm];
    const float bo = bias ? bias[o] : 0.0f;
    void* dst = out + (o * s.P + p0) * es;
    const char* src = res ? res + (o * s.P + p0) * es : nullptr;
    for (int64_t r = 0; r < M; ++r) {
      float v = c[r * ldc + mm - c0] + bo;
      if (e.relu) v = std::max(v, 0.0f);
      if (src) {
        v += load_elem(src, r, ot);
        if (e.residual_relu) v = std::max(v, 0.0f);
      }
      store_elem(dst, r, ot, v);
    }
  }
#endif
}

// ----------------------------------------------------------------------------- the dense route's epilogue

#if ENGINE_ISA >= 2
// The dense route's epilogue for one element type and one set of flags: no
// branch on them per vector (the type switch and flag tests per 16 elements
// cost more than the memory traffic on a 16-channel NHWC layer).
template <Elem T, bool RELU, int RES>  // RES: 0 none, 1 add, 2 add then ReLU
void mask_epilogue_t(char* yb, const uint8_t* mask, int64_t O, int64_t P, bool nhwc, const char* rb, int64_t b,
                     int64_t e) {
  constexpr int64_t es = T == Elem::f32 ? 4 : 2;
  const __m512 zero = _mm512_setzero_ps();
  // 16 elements: the kept lanes loaded (the others read as 0), ReLU, then
  // the residual and the block's ReLU; every lane in `lanes` written.
  auto vec = [&](char* out, const char* res, __mmask16 keep, __mmask16 lanes) {
    __m512 v = load16(out, T, keep);
    if constexpr (RELU) v = _mm512_max_ps(v, zero);
    if constexpr (RES > 0) {
      v = _mm512_add_ps(v, load16(res, T, lanes));
      if constexpr (RES == 2) v = _mm512_max_ps(v, zero);
    }
    store16(out, T, v, lanes);
  };
  if (nhwc) {
    // Rows [b, e) of O channels, sample by sample: the sample's kept lanes
    // (16 channels a word) made once, not once per row, and no division per
    // row (a 64-bit idiv per 16-channel row was a quarter of this pass).
    const int64_t nw = (O + 15) / 16;
    std::vector<__mmask16> words(nw);
    for (int64_t i = b, n = b / P, p = b % P; i < e; ++n, p = 0) {
      const uint8_t* m = mask + n * O;
      for (int64_t w = 0; w < nw; ++w) {
        const __mmask16 lanes = tail_mask(O - 16 * w);
        words[w] = _mm_mask_cmpneq_epi8_mask(lanes, _mm_maskz_loadu_epi8(lanes, m + 16 * w), _mm_setzero_si128());
      }
      for (const int64_t end = std::min(e, i + P - p); i < end; ++i) {
        char* row = yb + i * O * es;
        const char* rrow = RES > 0 ? rb + i * O * es : nullptr;
        for (int64_t w = 0; w < nw; ++w) {
          vec(row + 16 * w * es, RES > 0 ? rrow + 16 * w * es : nullptr, words[w], tail_mask(O - 16 * w));
        }
      }
    }
    return;
  }
  // NCHW: planes [b, e) of P positions, each kept or not as a whole.
  for (int64_t i = b; i < e; ++i) {
    char* plane = yb + i * P * es;
    const char* rplane = RES > 0 ? rb + i * P * es : nullptr;
    const bool kept = mask[i] != 0;
    for (int64_t j = 0; j < P; j += 16) {
      const __mmask16 lanes = tail_mask(P - j);
      vec(plane + j * es, RES > 0 ? rplane + j * es : nullptr, kept ? lanes : __mmask16(0), lanes);
    }
  }
}

#elif ENGINE_ISA == 1
// The same pass in 8-lane AVX2 vectors: a kept lane is the loaded value
// ANDed with the sample's keep mask (no masked loads), a row's tail of
// O % 8 channels through the tail helpers.
template <Elem T, bool RELU, int RES>
void mask_epilogue_t(char* yb, const uint8_t* mask, int64_t O, int64_t P, bool nhwc, const char* rb, int64_t b,
                     int64_t e) {
  constexpr int64_t es = T == Elem::f32 ? 4 : 2;
  const __m256 zero = _mm256_setzero_ps();
  auto vec = [&](char* out, const char* res, __m256 keep, int64_t n) {
    __m256 v = _mm256_and_ps(load8(out, T, n), keep);
    if constexpr (RELU) v = _mm256_max_ps(v, zero);
    if constexpr (RES > 0) {
      v = _mm256_add_ps(v, load8(res, T, n));
      if constexpr (RES == 2) v = _mm256_max_ps(v, zero);
    }
    store8(out, T, v, n);
  };
  if (nhwc) {
    const int64_t nw = (O + 7) / 8;
    std::vector<float> words(8 * nw);  // the sample's keep lanes, 8 channels a vector
    for (int64_t i = b, n = b / P, p = b % P; i < e; ++n, p = 0) {
      const uint8_t* m = mask + n * O;
      for (int64_t w = 0; w < nw; ++w) _mm256_storeu_ps(words.data() + 8 * w, keep8(m + 8 * w, O - 8 * w));
      for (const int64_t end = std::min(e, i + P - p); i < end; ++i) {
        char* row = yb + i * O * es;
        const char* rrow = RES > 0 ? rb + i * O * es : nullptr;
        for (int64_t w = 0; w < nw; ++w) {
          vec(row + 8 * w * es, RES > 0 ? rrow + 8 * w * es : nullptr, _mm256_loadu_ps(words.data() + 8 * w),
              O - 8 * w);
        }
      }
    }
    return;
  }
  const __m256 all = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
  for (int64_t i = b; i < e; ++i) {
    char* plane = yb + i * P * es;
    const char* rplane = RES > 0 ? rb + i * P * es : nullptr;
    const __m256 keep = mask[i] != 0 ? all : zero;
    for (int64_t j = 0; j < P; j += 8) vec(plane + j * es, RES > 0 ? rplane + j * es : nullptr, keep, P - j);
  }
}
#endif

#if ENGINE_ISA >= 1
template <Elem T>
void mask_epilogue_of(char* yb, const uint8_t* mask, int64_t O, int64_t P, bool nhwc, bool relu, const char* rb,
                      bool residual_relu, int64_t b, int64_t e) {
  const int res = rb == nullptr ? 0 : (residual_relu ? 2 : 1);
  if (relu) {
    if (res == 0) return mask_epilogue_t<T, true, 0>(yb, mask, O, P, nhwc, rb, b, e);
    if (res == 1) return mask_epilogue_t<T, true, 1>(yb, mask, O, P, nhwc, rb, b, e);
    return mask_epilogue_t<T, true, 2>(yb, mask, O, P, nhwc, rb, b, e);
  }
  if (res == 0) return mask_epilogue_t<T, false, 0>(yb, mask, O, P, nhwc, rb, b, e);
  if (res == 1) return mask_epilogue_t<T, false, 1>(yb, mask, O, P, nhwc, rb, b, e);
  return mask_epilogue_t<T, false, 2>(yb, mask, O, P, nhwc, rb, b, e);
}
#endif

void mask_epilogue(void* y, Elem t, const uint8_t* mask, int64_t O, int64_t P, bool nhwc, bool relu,
                   const void* residual, bool residual_relu, int64_t b, int64_t e) {
  char* yb = static_cast<char*>(y);
  const char* rb = static_cast<const char*>(residual);
#if ENGINE_ISA >= 1
  switch (t) {
    case Elem::f32: return mask_epilogue_of<Elem::f32>(yb, mask, O, P, nhwc, relu, rb, residual_relu, b, e);
    case Elem::bf16: return mask_epilogue_of<Elem::bf16>(yb, mask, O, P, nhwc, relu, rb, residual_relu, b, e);
    default: return mask_epilogue_of<Elem::f16>(yb, mask, O, P, nhwc, relu, rb, residual_relu, b, e);
  }
#else
  const int64_t es = elem_bytes(t);
  const int64_t len = nhwc ? O : P;  // elements per row (NHWC) or plane (NCHW)
  for (int64_t i = b; i < e; ++i) {
    char* row = yb + i * len * es;
    const char* rrow = rb ? rb + i * len * es : nullptr;
    const uint8_t* m = nhwc ? mask + (i / P) * O : nullptr;
    for (int64_t j = 0; j < len; ++j) {
      const bool keep = nhwc ? m[j] != 0 : mask[i] != 0;
      float v = keep ? load_elem(row, j, t) : 0.0f;
      if (relu) v = std::max(v, 0.0f);
      if (rrow) {
        v += load_elem(rrow, j, t);
        if (residual_relu) v = std::max(v, 0.0f);
      }
      store_elem(row, j, t, v);
    }
  }
#endif
}

// ----------------------------------------------------------------------------- the gate's channel means

#if ENGINE_ISA >= 2
// NHWC rows of C channels, channels [c0, c0 + nc) (nc <= 16 NV): 16 channels a
// vector, widened to two vectors of 8 doubles, the sums in registers, two
// rows at a time into two sets (an add's latency per row otherwise bounds
// the loop; sums kept in memory cost a store-to-load round trip per row).
template <int NV>
void channel_means_nhwc(const char* xs, Elem t, int64_t C, int64_t P, int64_t c0, int64_t nc, float* z) {
  const int64_t es = elem_bytes(t);
  __m512d acc[2][2 * NV];
#pragma GCC unroll 8
  for (int v = 0; v < 2 * NV; ++v) acc[0][v] = acc[1][v] = _mm512_setzero_pd();
  __mmask16 lanes[NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) lanes[v] = tail_mask(nc - 16 * v);
  auto add_row = [&](int set, const char* row) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __m512 f = load16(row + 16 * v * es, t, lanes[v]);
      acc[set][2 * v] = _mm512_add_pd(acc[set][2 * v], _mm512_cvtps_pd(_mm512_castps512_ps256(f)));
      acc[set][2 * v + 1] = _mm512_add_pd(acc[set][2 * v + 1], _mm512_cvtps_pd(_mm512_extractf32x8_ps(f, 1)));
    }
  };
  int64_t p = 0;
  for (; p + 2 <= P; p += 2) {
    add_row(0, xs + (p * C + c0) * es);
    add_row(1, xs + ((p + 1) * C + c0) * es);
  }
  if (p < P) add_row(0, xs + (p * C + c0) * es);
  alignas(64) double sums[16 * NV];
#pragma GCC unroll 8
  for (int v = 0; v < 2 * NV; ++v) _mm512_store_pd(sums + 8 * v, _mm512_add_pd(acc[0][v], acc[1][v]));
  for (int64_t c = 0; c < nc; ++c) z[c] = static_cast<float>(sums[c] / P);
}
#elif ENGINE_ISA == 1
// AVX2: NHWC rows, channels [c0, c0 + nc) (nc <= 8 NV), 8 channels a vector
// widened to two vectors of 4 doubles, the 4 NV sums in registers (NV <= 4:
// 8 of the 16 ymm registers).
template <int NV>
void channel_means_nhwc(const char* xs, Elem t, int64_t C, int64_t P, int64_t c0, int64_t nc, float* z) {
  const int64_t es = elem_bytes(t);
  __m256d acc[2 * NV];
#pragma GCC unroll 8
  for (int v = 0; v < 2 * NV; ++v) acc[v] = _mm256_setzero_pd();
  for (int64_t p = 0; p < P; ++p) {
    const char* row = xs + (p * C + c0) * es;
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      const __m256 f = load8(row + 8 * v * es, t, nc - 8 * v);
      acc[2 * v] = _mm256_add_pd(acc[2 * v], _mm256_cvtps_pd(_mm256_castps256_ps128(f)));
      acc[2 * v + 1] = _mm256_add_pd(acc[2 * v + 1], _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
    }
  }
  alignas(32) double sums[8 * NV];
#pragma GCC unroll 8
  for (int v = 0; v < 2 * NV; ++v) _mm256_store_pd(sums + 4 * v, acc[v]);
  for (int64_t c = 0; c < nc; ++c) z[c] = static_cast<float>(sums[c] / P);
}
#endif

void channel_means(const void* x, Elem t, int64_t C, int64_t P, bool nhwc, int64_t n, int64_t c0, int64_t c1,
                   float* z) {
  const int64_t es = elem_bytes(t);
  const char* xs = static_cast<const char*>(x) + n * C * P * es;
  if (P == 0) {
    std::fill(z + n * C + c0, z + n * C + c1, 0.0f);
    return;
  }
#if ENGINE_ISA >= 2
  if (nhwc) {
    const int64_t nc = c1 - c0;
    switch ((nc + 15) / 16) {
      case 1: return channel_means_nhwc<1>(xs, t, C, P, c0, nc, z + n * C + c0);
      case 2: return channel_means_nhwc<2>(xs, t, C, P, c0, nc, z + n * C + c0);
      case 3: return channel_means_nhwc<3>(xs, t, C, P, c0, nc, z + n * C + c0);
      default: return channel_means_nhwc<4>(xs, t, C, P, c0, nc, z + n * C + c0);
    }
  }
  // Planes of P positions: four vectors of 8 double partial sums each.
  for (int64_t c = c0; c < c1; ++c) {
    const char* plane = xs + c * P * es;
    __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd(), a2 = _mm512_setzero_pd(), a3 = _mm512_setzero_pd();
    int64_t p = 0;
    for (; p + 32 <= P; p += 32) {
      const __m512 f0 = load16(plane + p * es, t, __mmask16(0xffff));
      const __m512 f1 = load16(plane + (p + 16) * es, t, __mmask16(0xffff));
      a0 = _mm512_add_pd(a0, _mm512_cvtps_pd(_mm512_castps512_ps256(f0)));
      a1 = _mm512_add_pd(a1, _mm512_cvtps_pd(_mm512_extractf32x8_ps(f0, 1)));
      a2 = _mm512_add_pd(a2, _mm512_cvtps_pd(_mm512_castps512_ps256(f1)));
      a3 = _mm512_add_pd(a3, _mm512_cvtps_pd(_mm512_extractf32x8_ps(f1, 1)));
    }
    for (; p < P; p += 16) {
      const __m512 f = load16(plane + p * es, t, tail_mask(P - p));
      a0 = _mm512_add_pd(a0, _mm512_cvtps_pd(_mm512_castps512_ps256(f)));
      a1 = _mm512_add_pd(a1, _mm512_cvtps_pd(_mm512_extractf32x8_ps(f, 1)));
    }
    const double sum = _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(a0, a1), _mm512_add_pd(a2, a3)));
    z[n * C + c] = static_cast<float>(sum / P);
  }
#elif ENGINE_ISA == 1
  if (nhwc) {
    for (int64_t b = c0; b < c1; b += 32) {  // 32 channels a pass over the rows (registers, see above)
      const int64_t nc = std::min<int64_t>(32, c1 - b);
      float* zb = z + n * C + b;
      switch ((nc + 7) / 8) {
        case 1: channel_means_nhwc<1>(xs, t, C, P, b, nc, zb); break;
        case 2: channel_means_nhwc<2>(xs, t, C, P, b, nc, zb); break;
        case 3: channel_means_nhwc<3>(xs, t, C, P, b, nc, zb); break;
        default: channel_means_nhwc<4>(xs, t, C, P, b, nc, zb); break;
      }
    }
    return;
  }
  // Planes of P positions: four vectors of 4 double partial sums each.
  for (int64_t c = c0; c < c1; ++c) {
    const char* plane = xs + c * P * es;
    __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd(), a2 = _mm256_setzero_pd(), a3 = _mm256_setzero_pd();
    int64_t p = 0;
    for (; p + 16 <= P; p += 16) {
      const __m256 f0 = load8(plane + p * es, t, 8), f1 = load8(plane + (p + 8) * es, t, 8);
      a0 = _mm256_add_pd(a0, _mm256_cvtps_pd(_mm256_castps256_ps128(f0)));
      a1 = _mm256_add_pd(a1, _mm256_cvtps_pd(_mm256_extractf128_ps(f0, 1)));
      a2 = _mm256_add_pd(a2, _mm256_cvtps_pd(_mm256_castps256_ps128(f1)));
      a3 = _mm256_add_pd(a3, _mm256_cvtps_pd(_mm256_extractf128_ps(f1, 1)));
    }
    for (; p < P; p += 8) {
      const __m256 f = load8(plane + p * es, t, P - p);
      a0 = _mm256_add_pd(a0, _mm256_cvtps_pd(_mm256_castps256_ps128(f)));
      a1 = _mm256_add_pd(a1, _mm256_cvtps_pd(_mm256_extractf128_ps(f, 1)));
    }
    alignas(32) double q[4];
    _mm256_store_pd(q, _mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3)));
    z[n * C + c] = static_cast<float>(((q[0] + q[1]) + (q[2] + q[3])) / P);
  }
#else
  for (int64_t c = c0; c < c1; ++c) {
    double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t p = 0; p < P; ++p) {
      part[p & 7] += static_cast<double>(load_elem(xs, nhwc ? p * C + c : c * P + p, t));
    }
    const double sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    z[n * C + c] = static_cast<float>(sum / P);
  }
#endif
}

}  // namespace
}  // namespace ENGINE_NS
}  // namespace cpu
}  // namespace pydecouple

namespace pydecouple {
namespace cpu {
namespace ENGINE_NS {

// This instruction set's kernels for float32 compute.
inline const EngineKernels* kernels_f32() {
  static const EngineKernels k = {ENGINE_NAME, Elem::f32, &gather_input, &im2col, &gather_weight_f32, &gemm_f32,
                                  &epilogue, &mask_epilogue, &channel_means};
  return &k;
}

}  // namespace ENGINE_NS
}  // namespace cpu
}  // namespace pydecouple
