// CPU implementation of pydecouple::gated_conv2d_cpu: the entry point (checks,
// dtype and engine choice) and the direct engine.
//
// Two engines compute the op:
//   * the GEMM engine (gemm_conv.cpp, gemm_engine.h): groups == 1, float32 and
//     bfloat16 compute, NCHW and channels_last in and out, run-time ISA
//     dispatch (AMX through oneDNN's brgemm, AVX-512, AVX2, portable);
//   * the direct engine below: grouped and depthwise convolutions, float32
//     (bfloat16/float16 widened), vectors along output positions.
//
// The direct engine: for each sample n and group g, with I = its kept input channels (ki of them)
// and O = its kept filters (ko):
//
//   1. zero the output planes of the deselected filters.
//   2. gather: copy only the kept input channels into a zero-padded buffer Xc
//      of the thread (one plane per channel and stride phase, see
//      microkernel.h).                                      cost ~ ki * H * W
//   3. compute: the register-tiled micro-kernel reads the kept filters' weights
//      in place (row pointers, no gather) against Xc.      cost ~ ki * ko * KK * P
//   4. epilogue: bias, optional ReLU, store into the output (NCHW or NHWC).
//
// Nothing of a deselected filter or input channel enters the arithmetic.
// Work is split into items (sample, group, block of filters, range of pixel
// tiles) so that a batch of 1 still fills every core.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_features.h"
#include "gated_conv2d_cpu.h"
#include "gemm_engine.h"
#include "microkernel.h"

namespace pydecouple {
namespace cpu {
namespace {

constexpr int64_t kFiltersPerItem = 24;  // a multiple of kMaxMR

struct Geometry {
  int64_t N, Cin, H, W, Cout, KH, KW, G, cin_g, cout_g, KK;
  int64_t sh, sw, pt, pl, dh, dw;
  int64_t Ho, Wo, Hp, Wp, Hq, Wq;
  int64_t vl, nv, tile, npos, ntiles, nv_last;
  int64_t plane;        // floats per (channel, phase) plane
  int64_t nphase_used;  // stride phases some tap reads
  std::vector<int64_t> phase_of_slot;  // used slot -> phase index a * sw + b
  std::vector<int64_t> toff;           // per tap: slot * plane + shift
};

Geometry make_geometry(const at::Tensor& x, const at::Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups) {
  Geometry g;
  g.N = x.size(0); g.Cin = x.size(1); g.H = x.size(2); g.W = x.size(3);
  g.Cout = w.size(0); g.KH = w.size(2); g.KW = w.size(3); g.KK = g.KH * g.KW;
  g.G = groups; g.cin_g = g.Cin / groups; g.cout_g = g.Cout / groups;
  g.sh = stride[0]; g.sw = stride[1];
  g.pt = padding[0]; g.pl = padding[2];
  g.dh = dilation[0]; g.dw = dilation[1];
  g.Hp = g.H + padding[0] + padding[1];
  g.Wp = g.W + padding[2] + padding[3];
  g.Ho = (g.Hp - g.dh * (g.KH - 1) - 1) / g.sh + 1;
  g.Wo = (g.Wp - g.dw * (g.KW - 1) - 1) / g.sw + 1;
  g.Hq = (g.Hp + g.sh - 1) / g.sh;
  g.Wq = (g.Wp + g.sw - 1) / g.sw;
  // Positions are computed on the (Ho x Wq) grid; columns >= Wo are discarded.
  g.npos = (g.Ho - 1) * g.Wq + g.Wo;
  // Tile shape: the vector width and count that waste the fewest cycles on
  // discarded positions. Per (channel, tap) step a 6-filter tile costs about
  // 6 * nv * vl / 16 full-width FMAs plus (6 + nv) / 2 cycles of loads.
  double best = 1e300;
  for (int64_t vl : {int64_t{16}, int64_t{8}}) {
    for (int64_t nv = kMaxNV; nv >= 1; --nv) {
      const int64_t tiles = (g.npos + vl * nv - 1) / (vl * nv);
      const double cost = static_cast<double>(tiles) * (kMaxMR * nv * vl / 16.0 + 0.5 * (kMaxMR + nv));
      if (cost < best - 1e-9) {
        best = cost;
        g.vl = vl;
        g.nv = nv;
      }
    }
  }
  g.tile = g.nv * g.vl;
  g.ntiles = (g.npos + g.tile - 1) / g.tile;
  g.nv_last = (g.npos - (g.ntiles - 1) * g.tile + g.vl - 1) / g.vl;

  // Phases actually used (at most KK of them), found by search: an array of
  // sh * sw entries would grow with the stride (stride 2**32: bad_alloc).
  std::vector<int64_t> shift(g.KK);
  std::vector<int64_t> slot(g.KK);
  int64_t max_shift = 0;
  for (int64_t kh = 0; kh < g.KH; ++kh) {
    for (int64_t kw = 0; kw < g.KW; ++kw) {
      const int64_t eh = kh * g.dh, ew = kw * g.dw;
      const int64_t phase = (eh % g.sh) * g.sw + (ew % g.sw);
      const auto found = std::find(g.phase_of_slot.begin(), g.phase_of_slot.end(), phase);
      const int64_t t = kh * g.KW + kw;
      slot[t] = found - g.phase_of_slot.begin();
      if (found == g.phase_of_slot.end()) g.phase_of_slot.push_back(phase);
      shift[t] = (eh / g.sh) * g.Wq + (ew / g.sw);
      max_shift = std::max(max_shift, shift[t]);
    }
  }
  g.nphase_used = static_cast<int64_t>(g.phase_of_slot.size());
  // Every vector load of every tile stays inside the plane; round to a cache line.
  const int64_t need = std::max(g.Hq * g.Wq, g.ntiles * g.tile + max_shift);
  g.plane = (need + 15) / 16 * 16;
  g.toff.resize(g.KK);
  for (int64_t t = 0; t < g.KK; ++t) g.toff[t] = slot[t] * g.plane + shift[t];
  return g;
}

// Copy input channel c of sample n into its stride-phase planes (zero padded).
void fill_planes(const Geometry& g, const float* x, at::IntArrayRef xs, int64_t n, int64_t c, float* dst) {
  const float* src = x + n * xs[0] + c * xs[1];
  const int64_t sH = xs[2], sW = xs[3];
  for (int64_t s = 0; s < g.nphase_used; ++s) {
    float* p = dst + s * g.plane;
    const int64_t a = g.phase_of_slot[s] / g.sw, b = g.phase_of_slot[s] % g.sw;
    for (int64_t u = 0; u < g.Hq; ++u) {
      float* row = p + u * g.Wq;
      const int64_t h = u * g.sh + a - g.pt;
      if (h < 0 || h >= g.H) {
        std::memset(row, 0, sizeof(float) * g.Wq);
        continue;
      }
      const float* srow = src + h * sH;
      // v range whose source column w = v * sw + b - pl lies inside [0, W).
      int64_t v0 = 0;
      while (v0 < g.Wq && v0 * g.sw + b - g.pl < 0) ++v0;
      int64_t v1 = v0;
      while (v1 < g.Wq && v1 * g.sw + b - g.pl < g.W) ++v1;
      if (v0 > 0) std::memset(row, 0, sizeof(float) * v0);
      if (g.sw == 1 && sW == 1) {
        std::memcpy(row + v0, srow + (v0 + b - g.pl), sizeof(float) * (v1 - v0));
      } else {
        for (int64_t v = v0; v < v1; ++v) row[v] = srow[(v * g.sw + b - g.pl) * sW];
      }
      if (v1 < g.Wq) std::memset(row + v1, 0, sizeof(float) * (g.Wq - v1));
    }
    std::memset(p + g.Hq * g.Wq, 0, sizeof(float) * (g.plane - g.Hq * g.Wq));
  }
}

struct Item {
  int64_t ng;          // n * G + g
  int64_t f_begin;     // into the (n, g) kept-filter list
  int64_t f_end;
  int64_t t_begin;     // pixel tiles
  int64_t t_end;
};

}  // namespace

// The direct engine (float32). Arguments are checked by gated_conv2d_cpu.
at::Tensor gated_conv2d_direct(const at::Tensor& x_in, const at::Tensor& weight_in, const c10::optional<at::Tensor>& bias_in,
                               const c10::optional<at::Tensor>& out_mask_in, const c10::optional<at::Tensor>& in_mask_in,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                               bool relu) {
  const at::Tensor weight = weight_in.contiguous();
  const Geometry g = make_geometry(x_in, weight, stride, padding, dilation, groups);
  const at::Tensor bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  const at::Tensor out_mask = out_mask_in.has_value() ? out_mask_in->contiguous() : at::Tensor();
  const at::Tensor in_mask = in_mask_in.has_value() ? in_mask_in->contiguous() : at::Tensor();

  // channels_last out exactly when x is channels_last-strided and not contiguous
  // (the rule of every backend and of the fake in pydecouple/ops.py).
  const bool channels_last = x_in.is_contiguous(at::MemoryFormat::ChannelsLast) && !x_in.is_contiguous();
  at::Tensor out = at::empty({g.N, g.Cout, g.Ho, g.Wo}, x_in.options().memory_format(
                                                         channels_last ? at::MemoryFormat::ChannelsLast
                                                                       : at::MemoryFormat::Contiguous));
  if (g.N == 0) return out;

  // Per (n, g): kept input channels (as weight-row offsets) and kept filters.
  const int64_t NG = g.N * g.G;
  std::vector<int32_t> cin_off(g.N * g.Cin), cin_idx(g.N * g.Cin), fidx(g.N * g.Cout);
  std::vector<int64_t> ki(NG), ko(NG);
  const bool* om = out_mask.defined() ? out_mask.data_ptr<bool>() : nullptr;
  const bool* im = in_mask.defined() ? in_mask.data_ptr<bool>() : nullptr;
  const int64_t slot_floats = g.nphase_used * g.plane;
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t gi = 0; gi < g.G; ++gi) {
      const int64_t ng = n * g.G + gi;
      int64_t k = 0;
      for (int64_t c = 0; c < g.cin_g; ++c) {
        const int64_t cg = gi * g.cin_g + c;
        if (im == nullptr || im[n * g.Cin + cg]) {
          cin_off[n * g.Cin + gi * g.cin_g + k] = static_cast<int32_t>(c * g.KK);
          cin_idx[n * g.Cin + gi * g.cin_g + k] = static_cast<int32_t>(cg);
          ++k;
        }
      }
      ki[ng] = k;
      k = 0;
      for (int64_t o = 0; o < g.cout_g; ++o) {
        const int64_t og = gi * g.cout_g + o;
        if (om == nullptr || om[n * g.Cout + og]) fidx[n * g.Cout + gi * g.cout_g + k++] = static_cast<int32_t>(og);
      }
      ko[ng] = k;
    }
  }
  const int64_t max_ki = NG > 0 ? *std::max_element(ki.begin(), ki.end()) : 0;
  const float* xp = x_in.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const auto xs = x_in.strides();
  const auto os = out.strides();
  const int64_t P = g.Ho * g.Wo;

  // 1. zero what the compute step will not write: deselected filters' outputs
  at::parallel_for(0, NG, 1, [&](int64_t b, int64_t e) {
    for (int64_t ng = b; ng < e; ++ng) {
      const int64_t n = ng / g.G, gi = ng % g.G;
      if (channels_last) {
        if (gi == 0 && (om != nullptr)) std::memset(op + n * os[0], 0, sizeof(float) * g.Cout * P);
      } else {
        int64_t k = 0;
        for (int64_t o = gi * g.cout_g; o < (gi + 1) * g.cout_g; ++o) {
          if (k < ko[ng] && fidx[n * g.Cout + gi * g.cout_g + k] == o) {
            ++k;
          } else {
            std::memset(op + n * os[0] + o * os[1], 0, sizeof(float) * P);
          }
        }
      }
    }
  });

  // 2-3. compute and epilogue (parallel over items)
  std::vector<Item> items;
  int64_t base = 0;
  for (int64_t ng = 0; ng < NG; ++ng) base += (ko[ng] + kFiltersPerItem - 1) / kFiltersPerItem;
  const int64_t want = 4 * at::get_num_threads();
  const int64_t chunks = base >= want ? 1 : std::min<int64_t>(g.ntiles, (want + std::max<int64_t>(base, 1) - 1) /
                                                                           std::max<int64_t>(base, 1));
  const int64_t tiles_per_chunk = (g.ntiles + chunks - 1) / chunks;
  for (int64_t ng = 0; ng < NG; ++ng) {
    for (int64_t f = 0; f < ko[ng]; f += kFiltersPerItem) {
      for (int64_t t = 0; t < g.ntiles; t += tiles_per_chunk) {
        items.push_back({ng, f, std::min(ko[ng], f + kFiltersPerItem), t, std::min(g.ntiles, t + tiles_per_chunk)});
      }
    }
  }

  const bool avx512 = cpu_has_avx512();
  TileFn fns[kMaxMR + 1][kMaxNV + 1] = {};
  for (int mr = 1; mr <= kMaxMR; ++mr)
    for (int nv = 1; nv <= kMaxNV; ++nv)
      fns[mr][nv] = avx512 ? tile_fn_avx512(static_cast<int>(g.vl), mr, nv, g.KK)
                            : tile_fn_generic(static_cast<int>(g.vl), mr, nv, g.KK);

  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const int64_t wrow = g.cin_g * g.KK;
  const int64_t oH = os[2], oW = os[3];

  // 2. per item: gather the sample's kept input channels into this thread's
  // buffer (once per sample-group: a thread's items are consecutive, so the
  // copy is still in its L2 when the micro-kernel reads it), compute, store.
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e) {
    alignas(64) float acc[kMaxMR * kMaxNV * kVecLen];
    const float* wrows[kMaxMR];
    // max_ki planes, plus a zero plane for a group with no kept input channel.
    std::vector<float> xc((max_ki + 1) * slot_floats);
    float* const zero_plane = xc.data() + max_ki * slot_floats;
    std::fill(zero_plane, zero_plane + slot_floats, 0.0f);
    int64_t filled_ng = -1;
    for (int64_t it = b; it < e; ++it) {
      const Item& item = items[it];
      const int64_t n = item.ng / g.G, gi = item.ng % g.G;
      if (item.ng != filled_ng) {
        for (int64_t j = 0; j < ki[item.ng]; ++j) {
          fill_planes(g, xp, xs, n, cin_idx[n * g.Cin + gi * g.cin_g + j], xc.data() + j * slot_floats);
        }
        filled_ng = item.ng;
      }
      const int32_t* filters = fidx.data() + n * g.Cout + gi * g.cout_g;
      TileArgs a;
      a.wrows = wrows;
      a.cin_off = cin_off.data() + n * g.Cin + gi * g.cin_g;
      a.ki = ki[item.ng];
      a.kk = g.KK;
      a.toff = g.toff.data();
      a.plane = slot_floats;
      a.acc = acc;
      const float* xbase = ki[item.ng] > 0 ? xc.data() : zero_plane;
      for (int64_t t = item.t_begin; t < item.t_end; ++t) {
        const int64_t q0 = t * g.tile;
        const int nv = static_cast<int>(t == g.ntiles - 1 ? g.nv_last : g.nv);
        const int64_t qend = std::min(g.npos, q0 + nv * g.vl);
        a.x = xbase + q0;
        // Split the item's filters into equal register tiles (8 -> 4 + 4, not
        // 6 + 2): a narrow tile pays the same loads for fewer FMAs.
        const int64_t nf = item.f_end - item.f_begin;
        const int64_t nblocks = (nf + kMaxMR - 1) / kMaxMR;
        for (int64_t blk = 0, f0 = item.f_begin; blk < nblocks; ++blk) {
          const int mr = static_cast<int>(nf / nblocks + (blk < nf % nblocks ? 1 : 0));
          for (int r = 0; r < mr; ++r) wrows[r] = wp + filters[f0 + r] * wrow;
          fns[mr][nv](a);
          // Epilogue: row segments of the (Ho x Wq) grid that fall inside Wo.
          for (int r = 0; r < mr; ++r) {
            const int64_t o = filters[f0 + r];
            const float bo = bp ? bp[o] : 0.0f;
            const float* ar = acc + r * (nv * g.vl);
            float* orow = op + n * os[0] + o * os[1];
            int64_t q = q0;
            while (q < qend) {
              const int64_t ho = q / g.Wq, wo = q - ho * g.Wq;
              const int64_t seg = std::min(g.Wq - wo, qend - q);
              const int64_t valid = std::max<int64_t>(0, std::min(seg, g.Wo - wo));
              float* dst = orow + ho * oH + wo * oW;
              const float* s = ar + (q - q0);
              if (relu) {
                for (int64_t i = 0; i < valid; ++i) dst[i * oW] = std::max(s[i] + bo, 0.0f);
              } else {
                for (int64_t i = 0; i < valid; ++i) dst[i * oW] = s[i] + bo;
              }
              q += seg;
            }
          }
          f0 += mr;
        }
      }
    }
  });
  return out;
}


// ----------------------------------------------------------------------------- the entry point

const char* dtype_name(at::ScalarType t) { return c10::toString(t); }

ConvShape check_conv(const char* op, const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4, op, ": argument 'x' must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(weight.dim() == 4, op, ": argument 'weight' must be 4-D, got ", weight.dim(), "-D");
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              op, ": argument 'x' must be float32, bfloat16 or float16, got ", dtype_name(dt));
  TORCH_CHECK(weight.scalar_type() == dt, op, ": argument 'weight' must have x's dtype (",
              dtype_name(dt), "), got ", dtype_name(weight.scalar_type()));
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), op, ": tensors must be on the CPU");
  TORCH_CHECK(stride.size() == 2 && dilation.size() == 2 && padding.size() == 4,
              op, ": stride and dilation must have 2 entries and padding 4 (top, bottom, left, right)");
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0 && weight.size(0) % groups == 0 &&
                  weight.size(1) * groups == x.size(1),
              op, ": argument 'weight' of shape ", weight.sizes(), " does not match x's ", x.size(1),
              " channels with groups=", groups);
  TORCH_CHECK(weight.size(0) >= 1 && weight.size(2) >= 1 && weight.size(3) >= 1,
              op, ": argument 'weight' must be non-empty in Cout, KH and KW, got ", weight.sizes());
  for (auto v : stride) TORCH_CHECK(v >= 1, op, ": argument 'stride' must be >= 1, got ", stride);
  for (auto v : dilation) TORCH_CHECK(v >= 1, op, ": argument 'dilation' must be >= 1, got ", dilation);
  // Padding is bounded so that padded sizes stay far inside int64.
  constexpr int64_t kMaxPad = int64_t{1} << 40;
  for (auto v : padding)
    TORCH_CHECK(v >= 0 && v <= kMaxPad, op, ": argument 'padding' must be in [0, 2**40], got ", padding);

  ConvShape s;
  s.C = x.size(1); s.H = x.size(2); s.W = x.size(3);
  s.O = weight.size(0); s.Op = (s.O + 15) / 16 * 16; s.KH = weight.size(2); s.KW = weight.size(3); s.KK = s.KH * s.KW;
  s.pt = padding[0]; s.pl = padding[2];
  const int64_t hp = s.H + padding[0] + padding[1], wp = s.W + padding[2] + padding[3];
  // The dilated kernel must fit, checked without forming dilation * (K - 1)
  // (dilation may be near 2**63); a dilation is irrelevant where K == 1.
  TORCH_CHECK((s.KH == 1 || dilation[0] <= (hp - 1) / (s.KH - 1)) && (s.KW == 1 || dilation[1] <= (wp - 1) / (s.KW - 1)),
              op, ": argument 'x' of size ", s.H, "x", s.W, " (padded ", hp, "x", wp,
              ") is smaller than the kernel ", s.KH, "x", s.KW, " dilated by ", dilation);
  s.dh = s.KH == 1 ? 1 : dilation[0];
  s.dw = s.KW == 1 ? 1 : dilation[1];
  const int64_t eh = hp - s.dh * (s.KH - 1), ew = wp - s.dw * (s.KW - 1);  // >= 1
  // A stride past the room left for the kernel gives one output position,
  // as the stride equal to that room does: clamped, no size computation
  // below can overflow and no buffer depends on the stride (stride 2**32
  // once allocated stride**2 entries).
  s.sh = std::min<int64_t>(stride[0], eh);
  s.sw = std::min<int64_t>(stride[1], ew);
  s.Ho = (eh - 1) / s.sh + 1;
  s.Wo = (ew - 1) / s.sw + 1;
  s.P = s.Ho * s.Wo;
  return s;
}


at::Tensor gated_conv2d_cpu(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias_in,
                            const c10::optional<at::Tensor>& out_mask_in, const c10::optional<at::Tensor>& in_mask_in,
                            at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                            bool relu) {
  // The Python wrapper checks everything with friendlier messages; these guard
  // direct callers of torch.ops.pydecouple.gated_conv2d_cpu (the accelerated
  // models call it), before any memory is touched.
  const ConvShape s = check_conv("gated_conv2d_cpu", x, weight, stride, padding, dilation, groups);
  const at::ScalarType dt = x.scalar_type();
  const std::vector<int64_t> stride_c{s.sh, s.sw}, dilation_c{s.dh, s.dw};

  at::Tensor bias;
  if (bias_in.has_value()) {
    bias = *bias_in;
    TORCH_CHECK(bias.scalar_type() == dt && bias.dim() == 1 && bias.numel() == s.O, "gated_conv2d_cpu: argument 'bias' must be ",
                dtype_name(dt), " of shape (", s.O, ",), got ", dtype_name(bias.scalar_type()), " ", bias.sizes());
  }
  const int64_t N = x.size(0);
  auto check_mask = [&](const c10::optional<at::Tensor>& m, const char* name, int64_t c) -> at::Tensor {
    if (!m.has_value()) return at::Tensor();
    TORCH_CHECK(m->scalar_type() == at::kBool && m->dim() == 2 && m->size(0) == N && m->size(1) == c,
                "gated_conv2d_cpu: argument '", name, "' must be bool of shape (", N, ", ", c, "), got ",
                m->scalar_type(), " ", m->sizes());
    TORCH_CHECK(m->device().is_cpu(), "gated_conv2d_cpu: argument '", name, "' must be on the CPU");
    return m->contiguous();
  };
  const at::Tensor out_mask = check_mask(out_mask_in, "out_mask", s.O);
  const at::Tensor in_mask = check_mask(in_mask_in, "in_mask", s.C);

  // channels_last out exactly when x is channels_last-strided and not
  // contiguous (F.conv2d's rule, and the fake's in pydecouple/ops.py).
  const bool nhwc_out = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  if (groups == 1) return gated_conv2d_gemm(x, weight, bias, out_mask, in_mask, s, relu, nhwc_out, at::Tensor(), false);

  // Grouped and depthwise: the direct engine, in float32.
  const bool widen = dt != at::kFloat;
  const at::Tensor x32 = widen ? x.to(at::kFloat) : x;
  const c10::optional<at::Tensor> b32 =
      bias.defined() ? c10::optional<at::Tensor>(widen ? bias.to(at::kFloat) : bias) : c10::nullopt;
  const c10::optional<at::Tensor> om = out_mask.defined() ? c10::optional<at::Tensor>(out_mask) : c10::nullopt;
  const c10::optional<at::Tensor> imk = in_mask.defined() ? c10::optional<at::Tensor>(in_mask) : c10::nullopt;
  at::Tensor out = gated_conv2d_direct(x32, widen ? weight.to(at::kFloat) : weight, b32, om, imk, stride_c, padding,
                                       dilation_c, groups, relu);
  return widen ? out.to(dt) : out;
}

std::string cpu_info() { return describe_cpu(); }

}  // namespace cpu
}  // namespace pydecouple

TORCH_LIBRARY_IMPL(pydecouple, CPU, m) { m.impl("gated_conv2d_cpu", &pydecouple::cpu::gated_conv2d_cpu); }

// No tensor argument: a catch-all kernel, callable on any machine.
TORCH_LIBRARY_FRAGMENT(pydecouple, m) { m.def("cpu_info() -> str", &pydecouple::cpu::cpu_info); }
