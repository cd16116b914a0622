// The GEMM engine's driver: masks to kept lists, the work split, buffers and
// threads (see gemm_engine.h for the algorithm and the kernels it calls).
//
// Two schedules:
//
// * many units (a unit: one sample, or a block of 256 output positions of
//   one): each thread takes a range of units and runs them in groups (their
//   float32 C tiles fit kCGroupBytes) through the K blocks, K block outside
//   and units inside, so a block's source weights stay in L2 while every
//   unit of the group gathers from them (weights of one K block: groups of
//   one unit);
// * few units (batch 1, small images): one sample at a time, the threads
//   splitting it by position block and by range of kept filters.
//
// The kept channels of every sample are first gathered (and, for NCHW input,
// transposed) to NHWC rows in the compute type, in parallel. Per unit and K
// block: gather B, im2col A (a 1x1, stride-1, unpadded conv reads the
// gathered input in place), one GEMM accumulating into C; after the last
// block, the epilogue.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu_features.h"
#include "gated_conv2d_cpu.h"
#include "gemm_engine.h"
#include "weight_cache.h"

namespace pydecouple {
namespace cpu {
namespace {

// Cache budgets (a core's L2 is 1 MiB on Zen 4, 2 MiB on Sapphire Rapids).
constexpr int64_t kSourceBlockBytes = 256 * 1024;  // packed weights of one K block, all filters
// float32 C tiles of one group of units: more samples per K block read its
// weights from L2 more often per load from memory (measured best at 768 KiB
// on Zen 4's 1 MiB L2: 1.2-1.3x over 384 KiB on a 512-filter 4x4 layer).
constexpr int64_t kCGroupBytes = 768 * 1024;
constexpr int64_t kMaxRowsPerUnit = 512;           // images up to this many positions are one unit
constexpr int64_t kRowsPerUnit = 256;              // else position blocks of this many rows
// A sample's kept filters are computed in a row padded to a multiple of 8 (a
// ymm), not 16: a CIFAR ResNet layer keeping 4-11 of 16 filters, or 17-24 of
// 32, wasted up to half of its GEMM on padding lanes.
constexpr int64_t kFilterStep = 8;
inline int64_t filter_row(int64_t kept) { return (kept + kFilterStep - 1) / kFilterStep * kFilterStep; }

// A buffer's first 64-byte boundary (the buffers have 64 bytes of slack):
// im2col's rows of 64 bytes then never straddle two cache lines.
inline char* align64(char* p) {
  return reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63});
}

Elem elem_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return Elem::f32;
    case at::kBFloat16: return Elem::bf16;
    case at::kHalf: return Elem::f16;
    default: TORCH_CHECK(false, "gated_conv2d_cpu: unsupported dtype ", t);
  }
}

// oneDNN's brgemm micro-kernel (AMX tiles for bfloat16 where the CPU has
// them) behind the engine's GEMM signature.
void gemm_onednn_f32(int64_t M, int64_t N, int64_t K, const void* a, int64_t lda, const void* b, int64_t ldb,
                     float* c, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, static_cast<const float*>(a),
                              static_cast<const float*>(b), c, false);
}

void gemm_onednn_bf16(int64_t M, int64_t N, int64_t K, const void* a, int64_t lda, const void* b, int64_t ldb,
                      float* c, int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, accumulate, static_cast<const at::BFloat16*>(a),
                              static_cast<const at::BFloat16*>(b), c, true);
}

// The kernels for a path and a compute type; the oneDNN paths borrow the
// gathers and epilogue of the best own instruction set the CPU has.
EngineKernels kernels_for(CpuPath path, Elem compute) {
  const CpuFeatures& f = cpu_features();
  auto own = [&](CpuPath p, Elem ct) -> const EngineKernels* {
    switch (p) {
      case CpuPath::avx512: return engine_avx512(ct);
      case CpuPath::avx2: return engine_avx2(ct);
      default: return engine_generic(ct);
    }
  };
  if (path == CpuPath::amx || path == CpuPath::onednn) {
    const CpuPath host = f.avx512 ? CpuPath::avx512 : (f.avx2 ? CpuPath::avx2 : CpuPath::generic);
    EngineKernels k = *own(host, Elem::f32);
    k.name = path_name(path);
    k.compute = compute;
    if (compute == Elem::bf16) {
      // The bfloat16 gathers of the AVX-512 engine, or the generic ones.
      const EngineKernels* g = f.avx512 ? engine_avx512(Elem::bf16) : nullptr;
      k.gather_weight = g ? g->gather_weight : engine_generic(Elem::f32)->gather_weight;
      if (!g) {
        // engine_generic has no bfloat16 gather of its own: compute in float32.
        k.compute = Elem::f32;
        k.gemm = &gemm_onednn_f32;
        return k;
      }
      k.gemm = &gemm_onednn_bf16;
    } else {
      k.gemm = &gemm_onednn_f32;
    }
    return k;
  }
  const EngineKernels* k = own(path, compute);
  TORCH_INTERNAL_ASSERT(k != nullptr);
  return *k;
}

// The compute type for an input dtype on a path: bfloat16 stays bfloat16
// where the path has a bfloat16 dot product (vdpbf16ps, AMX); everything
// else (float16 included: no float32-accumulating float16 dot product before
// AMX-FP16) is widened to float32.
Elem compute_type(CpuPath path, Elem xt) {
  if (xt != Elem::bf16) return Elem::f32;
  const CpuFeatures& f = cpu_features();
  switch (path) {
    case CpuPath::amx: return Elem::bf16;
    case CpuPath::onednn: return f.avx512 ? Elem::bf16 : Elem::f32;
    case CpuPath::avx512: return (f.avx512_bf16 && engine_avx512(Elem::bf16) != nullptr) ? Elem::bf16 : Elem::f32;
    default: return Elem::f32;
  }
}

}  // namespace

const char* gemm_path_name() { return path_name(current_path()); }

void dense_mask_epilogue(at::Tensor& y, const at::Tensor& mask, bool relu, const at::Tensor& residual,
                         bool residual_relu, const at::Tensor& out_means) {
  const int64_t N = y.size(0), O = y.size(1), P = y.size(2) * y.size(3);
  const bool nhwc = !y.is_contiguous();
  TORCH_INTERNAL_ASSERT(nhwc ? y.is_contiguous(at::MemoryFormat::ChannelsLast) : y.is_contiguous());
  TORCH_INTERNAL_ASSERT(mask.scalar_type() == at::kBool && mask.is_contiguous() && mask.numel() == N * O);
  if (residual.defined()) {
    TORCH_INTERNAL_ASSERT(residual.scalar_type() == y.scalar_type() && residual.sizes() == y.sizes() &&
                          (nhwc ? residual.is_contiguous(at::MemoryFormat::ChannelsLast) : residual.is_contiguous()));
  }
  // The current path's engine kernels (the oneDNN paths borrow the host ISA's own).
  const EngineKernels k = kernels_for(current_path(), Elem::f32);
  const Elem t = elem_of(y.scalar_type());
  void* yp = y.data_ptr();
  const void* rp = residual.defined() ? residual.const_data_ptr() : nullptr;
  const uint8_t* mp = reinterpret_cast<const uint8_t*>(mask.const_data_ptr<bool>());
  const int64_t rows = nhwc ? N * P : N * O, len = nhwc ? O : P;
  if (out_means.defined() && N >= 2 * at::get_num_threads()) {
    // Sample by sample: its epilogue, then its channel means while it is in cache.
    float* zp = out_means.data_ptr<float>();
    const int64_t per_sample = rows / N;
    at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        k.mask_epilogue(yp, t, mp, O, P, nhwc, relu, rp, residual_relu, n * per_sample, (n + 1) * per_sample);
        for (int64_t c0 = 0; c0 < O; c0 += 64) k.channel_means(yp, t, O, P, nhwc, n, c0, std::min(O, c0 + 64), zp);
      }
    });
    return;
  }
  // Rows of a few thousand elements per task: small layers stay on one thread.
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(len, 1));
  at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
    k.mask_epilogue(yp, t, mp, O, P, nhwc, relu, rp, residual_relu, b, e);
  });
  if (out_means.defined()) {
    at::Tensor z = out_means;
    gate_channel_means(y, z);
  }
}

void gate_channel_means(const at::Tensor& x, at::Tensor& z) {
  const int64_t N = x.size(0), C = x.size(1), P = x.size(2) * x.size(3);
  const bool nhwc = !x.is_contiguous();
  TORCH_INTERNAL_ASSERT(nhwc ? x.is_contiguous(at::MemoryFormat::ChannelsLast) : x.is_contiguous());
  TORCH_INTERNAL_ASSERT(z.scalar_type() == at::kFloat && z.is_contiguous() && z.numel() == N * C);
  const EngineKernels k = kernels_for(current_path(), Elem::f32);
  const Elem t = elem_of(x.scalar_type());
  const void* xp = x.const_data_ptr();
  float* zp = z.data_ptr<float>();
  constexpr int64_t kBlock = 64;  // channels per task (EngineKernels::channel_means takes at most 64)
  const int64_t blocks = (C + kBlock - 1) / kBlock;
  // Tasks of a few thousand elements at least: small gates stay on one thread.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(std::min(C, kBlock) * P, 1));
  at::parallel_for(0, N * blocks, grain, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t n = i / blocks, c0 = (i % blocks) * kBlock;
      k.channel_means(xp, t, C, P, nhwc, n, c0, std::min(C, c0 + kBlock), zp);
    }
  });
}

at::Tensor gated_conv2d_gemm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                             const at::Tensor& out_mask, const at::Tensor& in_mask, const ConvShape& s, bool relu,
                             bool nhwc_out, const at::Tensor& residual_in, bool residual_relu,
                             const at::Tensor& out_means) {
  const int64_t N = x.size(0);
  const CpuPath path = current_path();
  const Elem xt = elem_of(x.scalar_type());
  const Elem ct = compute_type(path, xt);
  const EngineKernels k = kernels_for(path, ct);
  const int64_t es = elem_bytes(ct);
  const bool bf16 = ct == Elem::bf16;
  const bool onednn = path == CpuPath::amx || path == CpuPath::onednn;

  at::Tensor out = at::empty({N, s.O, s.Ho, s.Wo}, x.options().memory_format(
                                                       nhwc_out ? at::MemoryFormat::ChannelsLast
                                                                : at::MemoryFormat::Contiguous));
  if (N == 0) return out;
  const at::Tensor wt = packed_weight(weight, bf16 ? at::kBFloat16 : at::kFloat);
  const char* wtp = static_cast<const char*>(wt.const_data_ptr());
  at::Tensor bias_f;
  if (bias.defined()) bias_f = bias.to(at::kFloat).contiguous();
  const float* bp = bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr;
  const Elem ot = xt;
  char* outp = static_cast<char*>(out.data_ptr());
  const int64_t sample_out_bytes = s.O * s.P * out.element_size();
  // The residual in the output's layout and dtype (a view where it already is).
  at::Tensor residual;
  if (residual_in.defined()) {
    residual = residual_in.to(out.scalar_type())
                   .contiguous(nhwc_out ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  }
  const char* resp = residual.defined() ? static_cast<const char*>(residual.const_data_ptr()) : nullptr;
  auto epi_of = [&](int64_t n) {
    return Epilogue{bp, relu, resp ? resp + n * sample_out_bytes : nullptr, residual_relu, outp + n * sample_out_bytes,
                    ot, nhwc_out};
  };

  // Per sample: kept channels (their count rounded up to even for bfloat16's
  // pairs), kept filters, and both masks as 16-bit words.
  const bool* om = out_mask.defined() ? out_mask.const_data_ptr<bool>() : nullptr;
  const bool* im = in_mask.defined() ? in_mask.const_data_ptr<bool>() : nullptr;
  const int64_t ochunks = (s.O + 15) / 16, cchunks = (s.C + 15) / 16;
  std::vector<int32_t> cidx(N * s.C), fidx(N * s.O);
  std::vector<uint16_t> in_bits(N * cchunks, 0), out_bits(N * ochunks, 0);
  std::vector<int64_t> ki(N), kip(N), ko(N), xg_off(N + 1, 0);
  // A sample that keeps every channel of an NHWC input already in the
  // compute type is read in place: its "gathered" rows are x's own. (A
  // ResNet block's first conv reads an ungated input: the copy was a whole
  // extra pass over it, a quarter of a bottleneck's 1x1 reduce layer.)
  // Strides of size-1 dimensions do not matter.
  const auto xs = x.strides();
  const bool in_place_ok = ct == xt && (s.C == 1 || xs[1] == 1) && (s.W == 1 || xs[3] == s.C) &&
                           (s.H == 1 || xs[2] == s.W * s.C);
  std::vector<char> in_place(N, 0);
  std::vector<int32_t> out_offs(N * ochunks), out_perm(N * ochunks * 16, 0), out_merge(N * ochunks * 16, 0),
      out_rest(N * ochunks * 16, 0);
  for (int64_t n = 0; n < N; ++n) {
    int64_t j = 0;
    for (int64_t c = 0; c < s.C; ++c) {
      if (im == nullptr || im[n * s.C + c]) {
        cidx[n * s.C + j++] = static_cast<int32_t>(c);
        in_bits[n * cchunks + c / 16] |= static_cast<uint16_t>(1u << (c % 16));
      }
    }
    ki[n] = j;
    kip[n] = bf16 ? (j + 1) / 2 * 2 : j;
    j = 0;
    for (int64_t o = 0; o < s.O; ++o) {
      if (om == nullptr || om[n * s.O + o]) {
        fidx[n * s.O + j++] = static_cast<int32_t>(o);
        out_bits[n * ochunks + o / 16] |= static_cast<uint16_t>(1u << (o % 16));
      }
    }
    ko[n] = j;
    for (int64_t i = 0, acc = 0; i < ochunks; ++i) {
      const uint16_t bits = out_bits[n * ochunks + i];
      out_offs[n * ochunks + i] = static_cast<int32_t>(acc);
      acc += __builtin_popcount(bits);
      int32_t* perm = out_perm.data() + (n * ochunks + i) * 16;
      for (int l = 0, m = 0; l < 16; ++l)
        if ((bits >> l) & 1) perm[m++] = l;
      // The gather's streaming indices (gemm_engine.h, KeptFilters): the
      // word's kept lanes appended after the `fill` lanes already pending,
      // and what is left of them once 16 lanes were stored.
      const int fill = static_cast<int>(out_offs[n * ochunks + i] % 16), pop = __builtin_popcount(bits);
      int32_t* merge = out_merge.data() + (n * ochunks + i) * 16;
      int32_t* rest = out_rest.data() + (n * ochunks + i) * 16;
      for (int l = 0; l < 16; ++l) {
        merge[l] = l < fill ? l : (l - fill < pop ? 16 + perm[l - fill] : l);
        rest[l] = 16 - fill + l < pop ? perm[16 - fill + l] : 0;
      }
    }
    in_place[n] = in_place_ok && ki[n] == s.C && kip[n] == s.C;
    xg_off[n + 1] = xg_off[n] + (in_place[n] ? 0 : s.H * s.W * kip[n] * es);
  }
  const int64_t max_kip = std::max<int64_t>(2, *std::max_element(kip.begin(), kip.end()));
  const int64_t max_kop = std::max<int64_t>(kFilterStep, filter_row(*std::max_element(ko.begin(), ko.end())));
  auto kept_of = [&](int64_t n) {
    return KeptFilters{fidx.data() + n * s.O, out_bits.data() + n * ochunks, out_offs.data() + n * ochunks,
                       out_perm.data() + n * ochunks * 16, out_merge.data() + n * ochunks * 16,
                       out_rest.data() + n * ochunks * 16, ko[n], filter_row(ko[n])};
  };

  // 1. Every sample's kept channels, NHWC, in the compute type, in parallel.
  // Uninitialised: every byte is written by the gathers (zeroing ~input-size
  // buffers showed up in profiles).
  std::unique_ptr<char[]> xg_buf(new char[std::max<int64_t>(xg_off[N], 1)]);
  char* const xg_data = xg_buf.get();
  const char* const xp = static_cast<const char*>(x.const_data_ptr());
  const int64_t xes = x.element_size();
  auto xg_of = [&](int64_t n) -> const char* { return in_place[n] ? xp + n * xs[0] * xes : xg_data + xg_off[n]; };
  if (std::count(in_place.begin(), in_place.end(), 0) > 0) {
    at::parallel_for(0, N, 1, [&](int64_t b, int64_t e) {
      for (int64_t n = b; n < e; ++n) {
        if (in_place[n]) continue;
        k.gather_input(xp + n * xs[0] * xes, xt, ct, xs[1], xs[2], xs[3], s, cidx.data() + n * s.C,
                       in_bits.data() + n * cchunks, ki[n], kip[n], xg_data + xg_off[n]);
      }
    });
  }
  // A 1x1, stride-1, unpadded convolution reads the gathered input as A.
  const bool direct_a = s.KK == 1 && s.sh == 1 && s.sw == 1 && s.pt == 0 && s.pl == 0 && s.Ho == s.H && s.Wo == s.W;

  // K blocks: ranges of B's rows (taps x input channels) whose source weights
  // (all O filters) fit kSourceBlockBytes, so that they stay in L2 while a
  // thread runs every sample of a group through them: the weights then come
  // from memory once per group instead of once per sample.
  struct KBlock {
    int64_t t0, t1, c0, c1;  // taps [t0, t1) x input channels [c0, c1)
  };
  std::vector<KBlock> kblocks;
  const int64_t tap_bytes = s.C * s.Op * es;
  if (tap_bytes * s.KK <= kSourceBlockBytes) {
    kblocks.push_back({0, s.KK, 0, s.C});
  } else if (tap_bytes <= kSourceBlockBytes) {
    const int64_t taps = kSourceBlockBytes / tap_bytes;
    for (int64_t t = 0; t < s.KK; t += taps) kblocks.push_back({t, std::min(s.KK, t + taps), 0, s.C});
  } else {
    const int64_t cb = std::max<int64_t>(16, kSourceBlockBytes / (s.Op * es) / 16 * 16);
    for (int64_t t = 0; t < s.KK; ++t)
      for (int64_t c = 0; c < s.C; c += cb) kblocks.push_back({t, t + 1, c, std::min(s.C, c + cb)});
  }
  // A sample's rows of a K block: its kept channels in [c0, c1), whole pairs
  // for bfloat16 (a pair straddling two blocks goes to the first).
  auto rows_of = [&](int64_t n, const KBlock& kb, int64_t* j0, int64_t* j1) {
    *j0 = 0;
    *j1 = kip[n];
    if (kb.c0 == 0 && kb.c1 == s.C) return;
    const int32_t* cl = cidx.data() + n * s.C;
    *j0 = std::lower_bound(cl, cl + ki[n], static_cast<int32_t>(kb.c0)) - cl;
    *j1 = kb.c1 == s.C ? kip[n] : std::lower_bound(cl, cl + ki[n], static_cast<int32_t>(kb.c1)) - cl;
    if (bf16) {
      *j0 &= ~int64_t{1};
      if (kb.c1 < s.C) *j1 &= ~int64_t{1};
    }
  };
  int64_t max_block_rows = 0;
  for (const auto& kb : kblocks)
    max_block_rows = std::max(max_block_rows, (kb.t1 - kb.t0) * std::min(max_kip, kb.c1 - kb.c0 + 2));
  // B for one (sample, K block): the block's rows x the kept filters.
  const int64_t panel_bytes = max_block_rows * max_kop * es + 64 * 4;

  // One (sample, position block, kept filters [f0, f1)) through every K
  // block, accumulating into c (row length ldc).
  auto run_unit = [&](int64_t n, int64_t p0, int64_t M, int64_t f0, int64_t f1, const char* a, float* c, int64_t ldc,
                      char* panel, const KBlock* kb_begin, const KBlock* kb_end, bool accumulate) {
    const KeptFilters kf = kept_of(n);
    for (const KBlock* kb = kb_begin; kb != kb_end; ++kb) {
      int64_t j0, j1;
      rows_of(n, *kb, &j0, &j1);
      if (j1 <= j0) continue;
      const int64_t K = (kb->t1 - kb->t0) * (j1 - j0);
      const char* ak = a + (kb->t0 * kip[n] + j0) * es;
      // (A panel per 64 filters, gathered right before its GEMM to stay in
      // L1, measured slower: the gather then re-reads the source words
      // shared by neighbouring panels, and the calls multiply.)
      const int64_t pw = filter_row(f1 - f0);
      k.gather_weight(wtp, s, cidx.data() + n * s.C, ki[n], kb->t0, kb->t1, j0, j1, kf, f0, f1, pw, panel);
      k.gemm(M, pw, K, ak, s.KK * kip[n], panel, pw, c, ldc, accumulate);
      accumulate = true;
    }
    (void)p0;
    return accumulate;
  };

  // Positions are cut into blocks of mb rows; a "unit" is (sample, block).
  const int64_t mb = s.P <= kMaxRowsPerUnit ? s.P : kRowsPerUnit;
  const int64_t mblocks = (s.P + mb - 1) / mb;
  const int64_t units = N * mblocks;
  const int64_t threads = at::get_num_threads();
  const int64_t a_row_bytes = s.KK * max_kip * es;
  auto a_of = [&](int64_t n, int64_t p0, int64_t M, char* buf) -> const char* {
    if (direct_a) return xg_of(n) + p0 * kip[n] * es;
    k.im2col(xg_of(n), s, kip[n], es, p0, M, buf);
    return buf;
  };

  if (units >= 2 * threads) {
    // ---- many units: groups of units, K blocks outside, units inside --------
    // Groups pay where there are several K blocks (a deep layer's weights
    // come from memory once per group). With one K block, one unit at a time:
    // its im2col rows are still in L1/L2 when its GEMM reads them. A group
    // sized for the C tiles alone im2col'd ahead up to 14 MB on a 16-filter
    // 32x32 layer at batch 32 (96 units of 256 rows), all from memory again.
    const int64_t group = kblocks.size() == 1 ? 1 : std::max<int64_t>(1, kCGroupBytes / (mb * max_kop * 4));
    // The output's channel means, NHWC: each unit's block of rows while the
    // epilogue has it in cache (means of M rows, weighted by M / P below).
    const bool unit_means = out_means.defined() && nhwc_out;
    std::vector<float> block_means(unit_means ? units * s.O : 0);
    at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
      std::vector<char> panel(panel_bytes);
      std::unique_ptr<char[]> abuf(new char[direct_a ? 1 : group * mb * a_row_bytes + 64]);
      char* const abase = align64(abuf.get());
      std::unique_ptr<float[]> cbuf(new float[group * mb * max_kop]);
      std::vector<char> started(group);
      std::vector<const char*> a_ptr(group);
      for (int64_t g0 = begin; g0 < end; g0 += group) {
        const int64_t g1 = std::min(end, g0 + group);
        for (int64_t u = g0; u < g1; ++u) {
          const int64_t n = u / mblocks, p0 = (u % mblocks) * mb;
          a_ptr[u - g0] = a_of(n, p0, std::min(mb, s.P - p0), abase + (u - g0) * mb * a_row_bytes);
        }
        std::fill(started.begin(), started.end(), 0);
        for (const KBlock& kb : kblocks) {
          for (int64_t u = g0; u < g1; ++u) {
            const int64_t n = u / mblocks, p0 = (u % mblocks) * mb, M = std::min(mb, s.P - p0);
            if (ko[n] == 0 || ki[n] == 0) continue;
            const int64_t kop = filter_row(ko[n]);
            started[u - g0] = run_unit(n, p0, M, 0, ko[n], a_ptr[u - g0], cbuf.get() + (u - g0) * mb * max_kop,
                                       kop, panel.data(), &kb, &kb + 1, started[u - g0] != 0);
          }
        }
        for (int64_t u = g0; u < g1; ++u) {
          const int64_t n = u / mblocks, p0 = (u % mblocks) * mb, M = std::min(mb, s.P - p0);
          const KeptFilters kf = kept_of(n);
          float* cu = cbuf.get() + (u - g0) * mb * max_kop;
          if (!started[u - g0]) std::fill(cu, cu + M * kf.kop, 0.0f);  // no input channel: bias (and ReLU) only
          k.epilogue(cu, kf.kop, M, p0, kf, 0, kf.ko, true, s, epi_of(n));
          if (unit_means) {
            const char* rows = outp + n * sample_out_bytes + p0 * s.O * out.element_size();
            for (int64_t c0 = 0; c0 < s.O; c0 += 64)
              k.channel_means(rows, ot, s.O, M, true, 0, c0, std::min(s.O, c0 + 64), block_means.data() + u * s.O);
          }
        }
      }
      if (onednn) at::native::cpublas::brgemm_release(bf16);
    });
    if (unit_means) {
      float* zp = out_means.data_ptr<float>();
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t o = 0; o < s.O; ++o) {
          double sum = 0.0;
          for (int64_t b = 0; b < mblocks; ++b)
            sum += static_cast<double>(block_means[(n * mblocks + b) * s.O + o]) * std::min(mb, s.P - b * mb);
          zp[n * s.O + o] = static_cast<float>(sum / s.P);
        }
      }
    } else if (out_means.defined()) {
      at::Tensor z = out_means;
      gate_channel_means(out, z);
    }
    return out;
  }

  // ---- few units (batch 1, small images): one sample at a time -------------
  // The threads split (position block x range of kept filters); each runs
  // its part through every K block.
  for (int64_t n = 0; n < N; ++n) {
    const KeptFilters kf = kept_of(n);
    int64_t ncb = 1;
    if (mblocks < 2 * threads) ncb = std::min<int64_t>(std::max<int64_t>(1, kf.kop / 16), (2 * threads + mblocks - 1) / mblocks);
    const int64_t cbw = std::max<int64_t>(16, (kf.kop / 16 + ncb - 1) / ncb * 16);
    ncb = std::max<int64_t>(1, (kf.kop + cbw - 1) / cbw);
    if (ncb > 1) {
      // Each range writes only its kept filters: the others get their value
      // (0, or relu?(residual)) here.
      at::Tensor o_n = out.select(0, n);
      if (residual.defined()) {
        o_n.copy_(residual.select(0, n));
        if (residual_relu) o_n.relu_();
      } else {
        o_n.zero_();
      }
    }
    at::parallel_for(0, mblocks * ncb, 1, [&](int64_t begin, int64_t end) {
      std::vector<char> panel(panel_bytes);
      std::unique_ptr<char[]> abuf(new char[direct_a ? 1 : mb * a_row_bytes + 64]);
      char* const abase = align64(abuf.get());
      std::unique_ptr<float[]> cbuf(new float[mb * cbw]);
      for (int64_t it = begin; it < end; ++it) {
        const int64_t p0 = (it / ncb) * mb, M = std::min(mb, s.P - p0);
        const int64_t f0 = (it % ncb) * cbw, f1 = std::min(kf.ko, f0 + cbw);
        if (f1 <= f0 && ncb > 1) continue;
        bool started = false;
        if (kf.ko > 0 && ki[n] > 0) {
          const char* a = a_of(n, p0, M, abase);
          started = run_unit(n, p0, M, f0, f1, a, cbuf.get(), cbw, panel.data(), kblocks.data(),
                             kblocks.data() + kblocks.size(), false);
        }
        if (!started) std::fill(cbuf.get(), cbuf.get() + M * cbw, 0.0f);
        k.epilogue(cbuf.get(), cbw, M, p0, kf, f0, std::max(f0, f1), ncb == 1, s, epi_of(n));
      }
      if (onednn) at::native::cpublas::brgemm_release(bf16);
    });
  }
  if (out_means.defined()) {  // few samples: the output is small and still in cache
    at::Tensor z = out_means;
    gate_channel_means(out, z);
  }
  return out;
}

}  // namespace cpu
}  // namespace pydecouple
