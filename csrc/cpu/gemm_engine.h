// The GEMM engine of the CPU gated convolution: torch-free building blocks.
//
// A gated convolution is, per sample n, a small dense convolution of its ki
// kept input channels into its ko kept filters. The engine computes it as an
// im2col GEMM in a channels-minor ("pixel-major") layout:
//
//   C[p][m] = sum_{t < KK} sum_{j < ki} X[n][c_j][pos(p, t)] * W[o_m][c_j][t]
//
// with A = im2col of the sample's kept channels (rows: output positions p,
// columns: (tap t, kept channel j)), B = the kept filters' weights over the
// kept channels (rows: (t, j), columns: kept filters m), C in float32.
//
// * Vectors run along filters (B's rows), so a 2x2 or 4x4 image wastes no lane
//   (the direct kernel vectorised along positions and lost half of every
//   vector there). A row of kept filters is padded to a multiple of 8: whole
//   16-filter vectors, then an 8-filter (ymm) tail.
// * B is gathered per sample from weights packed once per weight tensor
//   ([KK][C][Op], filters contiguous; cached by the driver): a kept row is
//   streamed 16 filters at a time through precomputed permutes into full,
//   aligned vectors of kept filters (one load and about one and a half
//   permutes per 16 source filters, one store per 16 kept ones).
// * K (taps x kept channels) is cut into blocks whose source weights fit
//   L2, and a group of samples runs through one block before the next, so
//   that each sample gathers from L2 instead of from memory: a deep layer's
//   weights (9.4 MB at 512 x 512 x 3 x 3, float32) are then read from memory
//   once per group, not once per sample. The cost that remains is the
//   gather itself, about 1 / (f_out * positions) of the GEMM: small on
//   images of 8x8 and more, as large as the GEMM on 4x4, larger on 2x2,
//   where the kernel cannot beat the dense convolution (docs/acceleration.md).
// * bfloat16: A and B stay bfloat16 (B in the VNNI pair layout [K/2][N][2]
//   that vdpbf16ps and AMX read), accumulation is float32, rounding to
//   bfloat16 happens once, in the epilogue.
// * The epilogue adds the bias, applies the ReLU (and, at a ResNet block's
//   end, adds the shortcut and applies the block's ReLU) and writes the
//   output in its layout (NCHW planes through 16x16 register transposes, or
//   NHWC rows), writing the deselected filters too: every output element is
//   written once, no zeroing pass.
//
// Everything here takes raw pointers, so the same source compiles for several
// instruction sets (gemm_engine_impl.h, included by one translation unit per
// ISA) without a torch header inheriting a target attribute.

#pragma once

#include <cstdint>

namespace pydecouple {
namespace cpu {

// Element types of tensors the engine reads and writes.
enum class Elem : int32_t { f32 = 0, bf16 = 1, f16 = 2 };
inline int64_t elem_bytes(Elem e) { return e == Elem::f32 ? 4 : 2; }

// One convolution with groups == 1; padding given by its top/left offsets.
struct ConvShape {
  int64_t C, H, W;       // input channels and size
  int64_t O, KH, KW, KK; // filters and kernel
  int64_t Op;            // O rounded up to 16: the row length of the packed weights
  int64_t sh, sw, pt, pl, dh, dw;
  int64_t Ho, Wo, P;     // output size, P = Ho * Wo
};

// The filters one sample keeps.
struct KeptFilters {
  const int32_t* idx;    // the ko kept filters, increasing
  const uint16_t* bits;  // the out-mask over all O filters, 16 per word
  const int32_t* offs;   // per word: kept filters before it (prefix popcount)
  const int32_t* perm;   // per word, 16 lane indices: its kept lanes first, in order (a vpermps index)
  // Per word, for a gather that streams whole rows into full, aligned
  // vectors: `merge` (a two-source vpermt2ps index) appends the word's kept
  // lanes to the offs % 16 lanes already pending; `rest` (a vpermps index)
  // keeps the word's lanes left over once 16 were complete.
  const int32_t* merge;
  const int32_t* rest;
  int64_t ko;            // kept filters
  int64_t kop;           // ko rounded up to 8: the row length of B and C
};

// What the epilogue writes where, for one sample.
struct Epilogue {
  const float* bias;     // (O,) float32, or null
  bool relu;             // ReLU after the bias, before the mask
  const void* residual;  // the sample's residual, in the output's layout and type, or null
  bool residual_relu;    // ReLU after adding the residual (a ResNet block's end)
  void* out;             // the sample's output: NCHW out[o * P + p], NHWC out[p * O + o]
  Elem ot;
  bool nhwc;
};

// The kernels of one instruction set, for one compute element type
// (float32, or bfloat16 where the ISA has a bfloat16 dot product).
struct EngineKernels {
  const char* name;  // e.g. "avx512"
  Elem compute;      // element type of A and B

  // Kept channels of one sample, as NHWC rows of kip elements (ki kept, then
  // zeros): xg[(h * W + w) * kip + j] = x[cidx[j]][h][w], converted from xt
  // to ct (the compute type, or float32 for a widened bfloat16/float16).
  // x points at the sample; sC, sH, sW are its strides in elements.
  // in_bits: the sample's in-mask, 16 channels per word.
  void (*gather_input)(const void* x, Elem xt, Elem ct, int64_t sC, int64_t sH, int64_t sW, const ConvShape& s,
                       const int32_t* cidx, const uint16_t* in_bits, int64_t ki, int64_t kip, void* xg);

  // Rows [p0, p0 + M) of A, the im2col of one sample's gathered channels
  // xg (NHWC rows of kip elements of es bytes): a[r][t * kip + j] =
  // xg[pos(p0 + r, t)][j], zero where tap t falls in the padding.
  void (*im2col)(const char* xg, const ConvShape& s, int64_t kip, int64_t es, int64_t p0, int64_t M, char* a);

  // A panel of B: rows (t, j) for taps t in [t0, t1) and kept channels j in
  // [j0, j1) (rows j >= ki are zero), in that order, and columns the kept
  // filters [c0, c1) of the sample (c1 > c0). Row length ldb, a multiple of
  // 8 >= c1 - c0; the columns past c1 - c0 hold anything (the C columns
  // they make are never read). f32: b[row * ldb + m - c0]; bf16: the VNNI
  // layout b[(row / 2) * 2 * ldb + 2 * (m - c0) + (row & 1)], with j0 and
  // j1 - j0 even. Stores may run up to 16 elements (f32) or pairs (bf16)
  // past a row (ldb may be 8): rows are written in increasing order, so the
  // next row's own stores overwrite the overrun, and the buffer has that
  // slack past the last row. wt: the weights packed as
  // [KK][C][Op] in the compute type, zero past O.
  void (*gather_weight)(const void* wt, const ConvShape& s, const int32_t* cidx, int64_t ki, int64_t t0, int64_t t1,
                        int64_t j0, int64_t j1, const KeptFilters& kf, int64_t c0, int64_t c1, int64_t ldb, void* b);

  // C[M][N] (+)= A[M][K] * B[K][N] in float32: C is overwritten, or added
  // to where `accumulate`. N is a multiple of 8. bf16: K is even and B is in
  // the VNNI layout (ldb counts filters: a row of pairs has ldb pairs).
  void (*gemm)(int64_t M, int64_t N, int64_t K, const void* a, int64_t lda, const void* b, int64_t ldb, float* c,
               int64_t ldc, bool accumulate);

  // Output for positions p in [p0, p0 + M) and the kept filters m in
  // [c0, c1): v = relu?(c[(p - p0) * ldc + m - c0] + bias[o]) for
  // o = kf.idx[m], then (with a residual) v = relu?(v + residual(p, o)).
  // write_deselected: also write every deselected filter at these positions
  // (0, or relu?(residual)); then c0 = 0 and c1 = ko.
  void (*epilogue)(const float* c, int64_t ldc, int64_t M, int64_t p0, const KeptFilters& kf, int64_t c0, int64_t c1,
                   bool write_deselected, const ConvShape& s, const Epilogue& e);

  // The dense route's epilogue, in place over a dense conv's output y of
  // type t: v = keep ? relu?(y) : 0, then (with a residual, in y's layout and
  // type) v = relu?(v + residual). NCHW: planes [b, e) of P positions, plane
  // i = n * O + o kept where mask[i]; NHWC: rows [b, e) of O channels, row
  // i = n * P + p, channel o kept where mask[(i / P) * O + o]. mask: (N, O)
  // bytes, 0 or 1. One pass over y (the four ATen calls it replaces were four).
  void (*mask_epilogue)(void* y, Elem t, const uint8_t* mask, int64_t O, int64_t P, bool nhwc, bool relu,
                        const void* residual, bool residual_relu, int64_t b, int64_t e);

  // The gate's input: z[n * C + c] = mean over P positions of x[n][c], for
  // channels [c0, c1) (c1 - c0 <= 64) of sample n of x (type t, NCHW planes
  // or NHWC rows, contiguous), accumulated in double (a mask then differs
  // from the float32 model's only where a logit is within float32 rounding
  // of 0, whichever order that model summed in).
  void (*channel_means)(const void* x, Elem t, int64_t C, int64_t P, bool nhwc, int64_t n, int64_t c0, int64_t c1,
                        float* z);
};

// The bfloat16 GEMM on vdpbf16ps (gemm_engine_avx512bf16.cpp): A [M][K]
// bfloat16 rows, B in the VNNI layout, C float32; K even. nullptr where the
// build lacks it. The caller checks the CPU has AVX512_BF16.
using GemmFn = void (*)(int64_t M, int64_t N, int64_t K, const void* a, int64_t lda, const void* b, int64_t ldb,
                        float* c, int64_t ldc, bool accumulate);
GemmFn gemm_bf16_avx512();

// The kernels of each instruction set (nullptr where the build lacks it; the
// caller checks the CPU has it).
const EngineKernels* engine_avx512(Elem compute);  // AVX-512F/BW/VL/DQ (+ AVX512_BF16 for bf16 compute)
const EngineKernels* engine_avx2(Elem compute);    // AVX2 + FMA, float32 compute
const EngineKernels* engine_generic(Elem compute); // any CPU, float32 compute

}  // namespace cpu
}  // namespace pydecouple
