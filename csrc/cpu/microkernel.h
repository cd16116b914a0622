// The register-tiled micro-kernel of the CPU gated convolution. Torch-free.
//
// One call computes a tile of MR kept filters x (NV * 16) output positions of
// one sample and one group, reducing over the sample's kept input channels and
// the kernel taps:
//
//   acc[r][p] = sum_{j < ki} sum_{t < KK} W[o_r][cin(j)][t] * Xc[j][p + toff[t]]
//
// * Filters are addressed through row pointers (`wrows[r]` = &W[o_r][0][0]) and
//   input channels through offsets (`cin_off[j]` = local channel * KK): the
//   kept filters' weights are read in place, never gathered or copied, so a
//   deselected filter or input channel costs nothing.
// * Xc holds the sample's kept input channels only, zero padded, flattened
//   with the padded row pitch (the "padded-width" trick: positions whose
//   column falls in the padding are computed and discarded, which keeps every
//   tap a contiguous vector load). Strided convolutions read stride-phase
//   planes, so every tap is still a unit-stride load; `toff[t]` folds the
//   phase plane and the tap's shift into one offset.
// * Vectors run along output positions, filters along registers: 6 x 4 zmm
//   accumulators, 4 input vectors and 1 broadcast use 29 of AVX-512's 32
//   registers (the classic direct-convolution tile, cf. oneDNN's jit conv).
//
// The same source is compiled twice (microkernel_avx512.cpp with AVX-512
// enabled, microkernel_generic.cpp for any x86-64/arm64 machine) through GCC's
// vector extensions, and chosen at run time.

#pragma once

#include <cstdint>

namespace pydecouple {
namespace cpu {

constexpr int kVecLen = 16;   // the widest vector (one zmm); 8-float (ymm) tiles serve small images
constexpr int kMaxMR = 6;     // filters per register tile
constexpr int kMaxNV = 4;     // vectors per register tile

struct TileArgs {
  const float* const* wrows;  // MR row pointers into the weight, one per kept filter
  const int32_t* cin_off;     // ki offsets (local input channel * KK) into a weight row
  int64_t ki;                 // kept input channels of this sample and group
  int64_t kk;                 // kernel taps KH * KW
  const int64_t* toff;        // kk offsets into Xc (phase plane + tap shift)
  const float* x;             // Xc + first position of the tile
  int64_t plane;              // floats between consecutive channels of Xc
  float* acc;                 // out: MR x (NV * VL) floats, row-major
};

using TileFn = void (*)(const TileArgs&);

// tile_fn(vl, mr, nv, kk): the micro-kernel for vectors of vl floats (8 or
// 16), mr filters (1..6) and nv vectors (1..4); kk = 9 and kk = 1 get fully
// unrolled tap loops.
TileFn tile_fn_avx512(int vl, int mr, int nv, int64_t kk);
TileFn tile_fn_generic(int vl, int mr, int nv, int64_t kk);

// Whether this CPU runs the AVX-512 build (checked once).
bool cpu_has_avx512();

}  // namespace cpu
}  // namespace pydecouple
