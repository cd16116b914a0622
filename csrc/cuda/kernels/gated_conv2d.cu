// Torch-free CUDA kernels of the gated convolution (see gated_conv2d.cuh).
//
// gated_conv2d_gemm_kernel: implicit GEMM. A block computes a 64-pixel x
// 64-kept-filter tile of one (sample, group); the K loop runs over taps x blocks
// of 32 kept input channels, flattened into one loop. Operands are gathered
// through the index lists into shared memory (the gather is what skips the
// work), then multiplied with tensor cores (WMMA 16x16x16, float16/bfloat16,
// sm_80+) or with register-blocked FMAs (float32, and 16-bit types below sm_80).
// The gathers of the next K step are loaded into registers while the current
// one multiplies.
// A tile past the sample's kept filters skips the K loop and writes zeros.
//
// gated_conv2d_direct_kernel: depthwise and thin grouped convolutions, one
// thread per output element, reading only its group's kept input channels.
//
// gated_masks_to_indices_kernel: per row, a block-wide ballot scan that writes
// the kept columns first, then the others, and the kept count.
#include "gated_conv2d.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <climits>
#include <type_traits>

// Tensor cores (WMMA) for 16-bit inputs on sm_80+; the CPU emulation of
// tests/cuda_emulation/ can switch the same code on with a software WMMA.
#if defined(PYDECOUPLE_CUDA_EMULATION_WMMA) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
#define PYDECOUPLE_WMMA 1
#else
#define PYDECOUPLE_WMMA 0
#endif

// Launches go through one macro, so that tests/cuda_emulation/ can run these
// kernels on CPU threads (a functional check on machines without a GPU).
#ifndef PYDECOUPLE_CUDA_EMULATION
#define PYDECOUPLE_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#endif

namespace pydecouple {
namespace cuda {
namespace {

constexpr int kBM = 64;       // pixels per tile
constexpr int kBN = 64;       // kept filters per tile
constexpr int kBK = 32;       // kept input channels per K step
constexpr int kThreads = 128; // 4 warps, 2 x 2 over the tile, 32 x 32 each
constexpr int kPadAB = 8;     // keeps WMMA's ldm a multiple of 8 and spreads banks
constexpr int kPadC = 4;
constexpr int kMinGemmChannels = 16;
constexpr int kInvalidRow = -(1 << 29);  // an input row no tap can bring into range

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// ReLU that keeps NaN, as torch.relu does.
__device__ __forceinline__ float relu_nan(float v) { return v < 0.f ? 0.f : v; }

template <typename T, bool kInCL, bool kOutCL>
__global__ void __launch_bounds__(kThreads, 4) gated_conv2d_gemm_kernel(const GatedConvParams p) {
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w = static_cast<const T*>(p.weight);
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  T* __restrict__ out = static_cast<T*>(p.out);

  const int cin_g = p.C_in / p.groups;
  const int cout_g = p.C_out / p.groups;
  const int tiles_n = (cout_g + kBN - 1) / kBN;
  const int pid_m = blockIdx.x;
  const int g = blockIdx.y / tiles_n;
  const int tn = blockIdx.y % tiles_n;
  const int n = blockIdx.z;
  const int row = n * p.groups + g;
  const int hw_out = p.Ho * p.Wo;
  const int cnt_out = p.out_cnt ? p.out_cnt[row] : cout_g;
  const int cnt_in = p.in_cnt ? p.in_cnt[row] : cin_g;
  const int tid = threadIdx.x;

  __shared__ int s_co[kBN];      // local filter index of each tile column, -1 past C_out/groups
  __shared__ bool s_keep[kBN];   // the column is a kept filter
  __shared__ int s_ih0[kBM], s_iw0[kBM];
  __shared__ __align__(128) T s_a[kBK][kBM + kPadAB];  // A^T: s_a[k][m]
  __shared__ __align__(128) T s_b[kBK][kBN + kPadAB];  // B:   s_b[k][n]
  __shared__ __align__(128) float s_c[kBM][kBN + kPadC];

  for (int i = tid; i < kBN; i += kThreads) {
    const int j = tn * kBN + i;
    s_co[i] = j < cout_g ? (p.out_idx ? p.out_idx[(int64_t)row * cout_g + j] : j) : -1;
    s_keep[i] = j < cnt_out;
  }
  for (int i = tid; i < kBM; i += kThreads) {
    const int m = pid_m * kBM + i;
    if (m < hw_out) {
      s_ih0[i] = (m / p.Wo) * p.stride_h - p.pad_t;
      s_iw0[i] = (m % p.Wo) * p.stride_w - p.pad_l;
    } else {
      s_ih0[i] = kInvalidRow;
      s_iw0[i] = kInvalidRow;
    }
  }

  const bool active = tn * kBN < cnt_out;
  const int k_blocks = (cnt_in + kBK - 1) / kBK;
  const int iters = active ? p.KH * p.KW * k_blocks : 0;
  const T* __restrict__ xb = x + (int64_t)n * p.sx[0] + (int64_t)g * cin_g * p.sx[1];
  const T zero = from_f<T>(0.f);

  constexpr bool kHalfLike = !std::is_same<T, float>::value;
#if PYDECOUPLE_WMMA
  constexpr bool kWmma = kHalfLike;
#else
  constexpr bool kWmma = false;
#endif
  const int warp = tid / 32, wm = warp / 2, wn = warp % 2;
  const int tm = tid / 8, tq = tid % 8;  // FMA path: rows tm*4..+3, columns tq + 8*j
  float acc[4][8];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
#if PYDECOUPLE_WMMA
  using namespace nvcuda;
  using FragT = typename std::conditional<kHalfLike, T, __half>::type;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> cf[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(cf[i][j], 0.f);
#endif

  // Register prefetch: the gathers of step it + 1 are in flight while step it
  // multiplies from shared memory (one shared buffer, two barriers a step).
  constexpr int kAPer = kBM * kBK / kThreads;
  constexpr int kBPer = kBK * kBN / kThreads;
  T ra[kAPer], rb[kBPer];
  const int32_t* __restrict__ in_idx_row = p.in_idx ? p.in_idx + (int64_t)row * cin_g : nullptr;
  // Fixed per thread across a step (kThreads is a multiple of kBK, kBM and kBN):
  // with channels_last x a thread always loads the same K column of A (one
  // index lookup a step), otherwise the same pixel row; and the same B column.
  static_assert(kThreads % kBK == 0 && kThreads % kBM == 0 && kThreads % kBN == 0, "tile mapping");
  const int a_fixed = kInCL ? tid % kBK : tid % kBM;  // k (channels_last) or m
  const int a_first = kInCL ? tid / kBK : tid / kBM;  // first m (channels_last) or k
  constexpr int kAStride = kInCL ? kThreads / kBK : kThreads / kBM;
  const int b_col = tid % kBN, b_first = tid / kBN;
  constexpr int kBStride = kThreads / kBN;
  auto load_step = [&](int it) {
    const int tap = it / k_blocks;
    const int kb = it - tap * k_blocks;
    const int kh = tap / p.KW;
    const int kw = tap - kh * p.KW;
    const int dh = kh * p.dil_h, dw = kw * p.dil_w;
    const int k0 = kb * kBK;
    if constexpr (kInCL) {
      const int kk = k0 + a_fixed;
      const bool k_ok = kk < cnt_in;
      const int64_t coff = k_ok ? (int64_t)(in_idx_row ? in_idx_row[kk] : kk) * p.sx[1] : 0;
#pragma unroll
      for (int r = 0; r < kAPer; ++r) {
        const int m = a_first + r * kAStride;
        const int ih = s_ih0[m] + dh, iw = s_iw0[m] + dw;
        ra[r] = (k_ok && ih >= 0 && ih < p.H && iw >= 0 && iw < p.W)
                    ? xb[coff + (int64_t)ih * p.sx[2] + (int64_t)iw * p.sx[3]]
                    : zero;
      }
    } else {
      const int ih = s_ih0[a_fixed] + dh, iw = s_iw0[a_fixed] + dw;
      const bool pix_ok = ih >= 0 && ih < p.H && iw >= 0 && iw < p.W;
      const int64_t poff = pix_ok ? (int64_t)ih * p.sx[2] + (int64_t)iw * p.sx[3] : 0;
#pragma unroll
      for (int r = 0; r < kAPer; ++r) {
        const int kk = k0 + a_first + r * kAStride;
        ra[r] = (pix_ok && kk < cnt_in) ? xb[(int64_t)(in_idx_row ? in_idx_row[kk] : kk) * p.sx[1] + poff] : zero;
      }
    }
    const bool col_ok = s_keep[b_col];  // a kept column has a filter (s_co >= 0)
    const T* __restrict__ wt = w + (int64_t)tap * cin_g * p.C_out + (int64_t)g * cout_g + (col_ok ? s_co[b_col] : 0);
#pragma unroll
    for (int r = 0; r < kBPer; ++r) {
      const int kk = k0 + b_first + r * kBStride;
      rb[r] = (col_ok && kk < cnt_in) ? wt[(int64_t)(in_idx_row ? in_idx_row[kk] : kk) * p.C_out] : zero;
    }
  };

  __syncthreads();  // s_co, s_keep, s_ih0, s_iw0 are written
  if (iters > 0) load_step(0);
  for (int it = 0; it < iters; ++it) {
#pragma unroll
    for (int r = 0; r < kAPer; ++r) {
      if constexpr (kInCL)
        s_a[a_fixed][a_first + r * kAStride] = ra[r];
      else
        s_a[a_first + r * kAStride][a_fixed] = ra[r];
    }
#pragma unroll
    for (int r = 0; r < kBPer; ++r) s_b[b_first + r * kBStride][b_col] = rb[r];
    __syncthreads();
    if (it + 1 < iters) load_step(it + 1);
    if constexpr (kWmma) {
#if PYDECOUPLE_WMMA
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, FragT, wmma::col_major> af[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, FragT, wmma::row_major> bf[2];
#pragma unroll
        for (int i = 0; i < 2; ++i)
          wmma::load_matrix_sync(af[i], reinterpret_cast<const FragT*>(&s_a[kk][wm * 32 + i * 16]), kBM + kPadAB);
#pragma unroll
        for (int j = 0; j < 2; ++j)
          wmma::load_matrix_sync(bf[j], reinterpret_cast<const FragT*>(&s_b[kk][wn * 32 + j * 16]), kBN + kPadAB);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(cf[i][j], af[i], bf[j], cf[i][j]);
      }
#endif
    } else {
#pragma unroll 4
      for (int k = 0; k < kBK; ++k) {
        float av[4], bv[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = to_f(s_a[k][tm * 4 + i]);
#pragma unroll
        for (int j = 0; j < 8; ++j) bv[j] = to_f(s_b[k][tq + 8 * j]);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
    }
    __syncthreads();  // every warp is done reading s_a and s_b before the next store
  }

  // Accumulators to shared memory, then a store pattern that suits the output layout.
  if constexpr (kWmma) {
#if PYDECOUPLE_WMMA
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&s_c[wm * 32 + i * 16][wn * 32 + j * 16], cf[i][j], kBN + kPadC,
                                wmma::mem_row_major);
#endif
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) s_c[tm * 4 + i][tq + 8 * j] = acc[i][j];
  }
  __syncthreads();

  T* __restrict__ ob = out + (int64_t)n * p.so[0];
  for (int e = tid; e < kBM * kBN; e += kThreads) {
    const int j = kOutCL ? e % kBN : e / kBM;
    const int mi = kOutCL ? e / kBN : e % kBM;
    const int m = pid_m * kBM + mi;
    const int co_local = s_co[j];
    if (m >= hw_out || co_local < 0) continue;
    const int co = g * cout_g + co_local;
    float v = 0.f;  // deselected filters: exactly zero, no bias
    if (s_keep[j]) {
      v = s_c[mi][j];
      if (bias) v += to_f(bias[co]);
      if (p.relu) v = relu_nan(v);
    }
    const int oh = m / p.Wo, ow = m % p.Wo;
    ob[(int64_t)co * p.so[1] + (int64_t)oh * p.so[2] + (int64_t)ow * p.so[3]] = from_f<T>(v);
  }
}

template <typename T, bool kOutCL>
__global__ void __launch_bounds__(256) gated_conv2d_direct_kernel(const GatedConvParams p) {
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ w = static_cast<const T*>(p.weight_oihw);
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  T* __restrict__ out = static_cast<T*>(p.out);
  const int n = blockIdx.y;
  const int hw_out = p.Ho * p.Wo;
  const int64_t e = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= (int64_t)hw_out * p.C_out) return;
  // Channels fastest where the output is channels_last, pixels fastest otherwise.
  const int j = kOutCL ? (int)(e % p.C_out) : (int)(e / hw_out);
  const int m = kOutCL ? (int)(e / p.C_out) : (int)(e % hw_out);
  const int co = p.out_idx_all ? p.out_idx_all[(int64_t)n * p.C_out + j] : j;
  const int cnt = p.out_cnt_all ? p.out_cnt_all[n] : p.C_out;
  const int oh = m / p.Wo, ow = m % p.Wo;
  float v = 0.f;
  if (j < cnt) {
    const int cin_g = p.C_in / p.groups, cout_g = p.C_out / p.groups;
    const int g = co / cout_g;
    const T* xb = x + (int64_t)n * p.sx[0];
    for (int cil = 0; cil < cin_g; ++cil) {
      const int ci = g * cin_g + cil;
      if (p.in_mask && !p.in_mask[(int64_t)n * p.C_in + ci]) continue;
      const T* xc = xb + (int64_t)ci * p.sx[1];
      const T* wc = w + ((int64_t)co * cin_g + cil) * p.KH * p.KW;
      for (int kh = 0; kh < p.KH; ++kh) {
        const int ih = oh * p.stride_h - p.pad_t + kh * p.dil_h;
        if (ih < 0 || ih >= p.H) continue;
        for (int kw = 0; kw < p.KW; ++kw) {
          const int iw = ow * p.stride_w - p.pad_l + kw * p.dil_w;
          if (iw < 0 || iw >= p.W) continue;
          v = fmaf(to_f(xc[(int64_t)ih * p.sx[2] + (int64_t)iw * p.sx[3]]), to_f(wc[kh * p.KW + kw]), v);
        }
      }
    }
    if (bias) v += to_f(bias[co]);
    if (p.relu) v = relu_nan(v);
  }
  out[(int64_t)n * p.so[0] + (int64_t)co * p.so[1] + (int64_t)oh * p.so[2] + (int64_t)ow * p.so[3]] = from_f<T>(v);
}

constexpr int kScanThreads = 256;

__global__ void __launch_bounds__(kScanThreads)
    gated_masks_to_indices_kernel(const uint8_t* __restrict__ mask, int cols, int32_t* __restrict__ idx,
                                  int32_t* __restrict__ cnt) {
  const int64_t row = blockIdx.x;
  const uint8_t* m = mask + row * cols;
  int32_t* out = idx + row * cols;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  constexpr int kWarps = kScanThreads / 32;
  __shared__ int s_warp[kWarps];
  __shared__ int s_total;

  // Pass 1: the kept count of the row.
  int local = 0;
  for (int c = tid; c < cols; c += kScanThreads) local += m[c] != 0;
#pragma unroll
  for (int o = 16; o > 0; o /= 2) local += __shfl_down_sync(0xffffffffu, local, o);
  if (lane == 0) s_warp[warp] = local;
  __syncthreads();
  if (tid == 0) {
    int t = 0;
    for (int i = 0; i < kWarps; ++i) t += s_warp[i];
    s_total = t;
    cnt[row] = t;
  }
  __syncthreads();
  const int total = s_total;

  // Pass 2: chunks of kScanThreads columns, ranks by warp ballots.
  int base_kept = 0, base_off = 0;
  for (int start = 0; start < cols; start += kScanThreads) {
    const int c = start + tid;
    const bool valid = c < cols;
    const bool on = valid && m[c] != 0;
    const unsigned ballot = __ballot_sync(0xffffffffu, on);
    const int before_in_warp = __popc(ballot & ((1u << lane) - 1u));
    __syncthreads();  // s_warp is free again
    if (lane == 0) s_warp[warp] = __popc(ballot);
    __syncthreads();
    int before = before_in_warp, chunk_kept = 0;
    for (int i = 0; i < kWarps; ++i) {
      if (i < warp) before += s_warp[i];
      chunk_kept += s_warp[i];
    }
    if (on) {
      out[base_kept + before] = c;
    } else if (valid) {
      out[total + base_off + (tid - before)] = c;  // every thread below tid is a valid column
    }
    const int nvalid = min(kScanThreads, cols - start);
    base_kept += chunk_kept;
    base_off += nvalid - chunk_kept;
  }
}

// The error of the launch just made (nullptr if none).
const char* launch_error() {
#ifdef PYDECOUPLE_CUDA_EMULATION
  return nullptr;
#else
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
#endif
}

template <typename T>
const char* launch_typed(const GatedConvParams& p, cudaStream_t stream) {
  const int cin_g = p.C_in / p.groups, cout_g = p.C_out / p.groups;
  const bool in_cl = p.sx[1] == 1 && p.C_in > 1;
  const bool out_cl = p.so[1] == 1 && p.C_out > 1;
  if (uses_direct_kernel(cin_g, cout_g, p.groups)) {
    if (!p.weight_oihw) return "gated_conv2d_forward: the direct kernel needs weight_oihw";
    const int64_t total = (int64_t)p.Ho * p.Wo * p.C_out;
    const int64_t blocks = (total + 255) / 256;
    if (blocks > INT_MAX || p.N > 65535) return "gated_conv2d_forward: the problem is too large for one launch";
    const dim3 grid((unsigned)blocks, (unsigned)p.N);
    void (*kernel)(const GatedConvParams) =
        out_cl ? gated_conv2d_direct_kernel<T, true> : gated_conv2d_direct_kernel<T, false>;
    PYDECOUPLE_LAUNCH(kernel, grid, dim3(256), stream, p);
  } else {
    if (!p.weight) return "gated_conv2d_forward: the GEMM kernel needs the (KH, KW, C_in/groups, C_out) weight";
    const int64_t tiles_m = ((int64_t)p.Ho * p.Wo + kBM - 1) / kBM;
    const int64_t tiles_n = (int64_t)p.groups * ((cout_g + kBN - 1) / kBN);
    if (tiles_m > INT_MAX || tiles_n > 65535 || p.N > 65535)
      return "gated_conv2d_forward: the problem is too large for one launch (grid limits)";
    const dim3 grid((unsigned)tiles_m, (unsigned)tiles_n, (unsigned)p.N);
    void (*kernel)(const GatedConvParams) =
        in_cl ? (out_cl ? gated_conv2d_gemm_kernel<T, true, true> : gated_conv2d_gemm_kernel<T, true, false>)
              : (out_cl ? gated_conv2d_gemm_kernel<T, false, true> : gated_conv2d_gemm_kernel<T, false, false>);
    PYDECOUPLE_LAUNCH(kernel, grid, dim3(kThreads), stream, p);
  }
  return launch_error();
}

}  // namespace

bool uses_direct_kernel(int c_in_per_group, int c_out_per_group, int groups) {
  return groups > 1 && (c_in_per_group < kMinGemmChannels || c_out_per_group < kMinGemmChannels);
}

const char* gated_masks_to_indices(const uint8_t* mask, int rows, int cols, int32_t* idx, int32_t* cnt,
                                   cudaStream_t stream) {
  if (rows < 0 || cols < 0) return "gated_masks_to_indices: negative size";
  if (rows == 0) return nullptr;
  if (!mask || !idx || !cnt) return "gated_masks_to_indices: null pointer";
  if (rows > INT_MAX) return "gated_masks_to_indices: too many rows";
  PYDECOUPLE_LAUNCH(gated_masks_to_indices_kernel, dim3(rows), dim3(kScanThreads), stream, mask, cols, idx, cnt);
  return launch_error();
}

const char* gated_conv2d_forward(const GatedConvParams& p, cudaStream_t stream) {
  if (p.N < 0 || p.C_in < 1 || p.C_out < 1 || p.groups < 1 || p.KH < 1 || p.KW < 1)
    return "gated_conv2d_forward: bad sizes";
  if (p.C_in % p.groups || p.C_out % p.groups) return "gated_conv2d_forward: channels not divisible by groups";
  if (p.stride_h < 1 || p.stride_w < 1 || p.dil_h < 1 || p.dil_w < 1 || p.pad_t < 0 || p.pad_l < 0)
    return "gated_conv2d_forward: bad stride, dilation or padding";
  if (p.N == 0 || p.Ho <= 0 || p.Wo <= 0) return nullptr;  // nothing to write
  if (!p.x || !p.out) return "gated_conv2d_forward: null x or out";
  if ((p.in_idx == nullptr) != (p.in_cnt == nullptr) || (p.out_idx == nullptr) != (p.out_cnt == nullptr) ||
      (p.out_idx_all == nullptr) != (p.out_cnt_all == nullptr))
    return "gated_conv2d_forward: an index list without its counts (or counts without the list)";
  switch (p.dtype) {
    case DType::kFloat32:
      return launch_typed<float>(p, stream);
    case DType::kFloat16:
      return launch_typed<__half>(p, stream);
    case DType::kBFloat16:
      return launch_typed<__nv_bfloat16>(p, stream);
  }
  return "gated_conv2d_forward: unsupported dtype";
}

}  // namespace cuda
}  // namespace pydecouple
