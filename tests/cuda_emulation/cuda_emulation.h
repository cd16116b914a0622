// Runs CUDA kernels on CPU threads, for a functional check of
// csrc/cuda/kernels/*.cu on machines without a GPU (tests/test_cuda_emulated.py).
//
// Force-included (g++ -include) before the kernel source, compiled as C++20:
// a block is blockDim std::threads that run the kernel body; __shared__
// variables become function statics (blocks run one after another, so one copy
// serves every block); __syncthreads is a std::barrier over the block, and the
// warp intrinsics the kernels use exchange values through the block with a
// barrier per warp. Tensor-core paths are compiled out (no __CUDA_ARCH__):
// the FMA paths run. Slow; for small problems only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#define PYDECOUPLE_CUDA_EMULATION 1

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __shared__
#define __shared__ static
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace emu {

struct Block {
  explicit Block(int n) : threads(n), bar(n), values(n, 0u) {
    for (int w = 0; w < (n + 31) / 32; ++w) warp_bars.emplace_back(std::make_unique<std::barrier<>>(std::min(32, n - 32 * w)));
  }
  int threads;
  std::barrier<> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
  std::vector<unsigned> values;
};

inline thread_local Block* block = nullptr;
inline thread_local dim3 thread_idx, block_idx, block_dim, grid_dim;

template <class F>
void launch(dim3 grid, dim3 blk, F&& body) {
  const int n = static_cast<int>(blk.x * blk.y * blk.z);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        Block b(n);
        std::vector<std::thread> ts;
        ts.reserve(n);
        for (int t = 0; t < n; ++t) {
          ts.emplace_back([&, t] {
            block = &b;
            thread_idx = dim3(t % blk.x, (t / blk.x) % blk.y, t / (blk.x * blk.y));
            block_idx = dim3(bx, by, bz);
            block_dim = blk;
            grid_dim = grid;
            body();
          });
        }
        for (auto& th : ts) th.join();
      }
}

inline int linear_tid() { return thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z); }

}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::block->bar.arrive_and_wait(); }

inline unsigned __ballot_sync(unsigned, int pred) {
  const int t = emu::linear_tid(), w = t / 32;
  auto& wb = *emu::block->warp_bars[w];
  emu::block->values[t] = pred ? 1u : 0u;
  wb.arrive_and_wait();
  unsigned r = 0;
  for (int l = 0; l < 32 && 32 * w + l < emu::block->threads; ++l) r |= emu::block->values[32 * w + l] << l;
  wb.arrive_and_wait();
  return r;
}

inline int __shfl_down_sync(unsigned, int v, unsigned delta) {
  const int t = emu::linear_tid(), w = t / 32, lane = t % 32;
  auto& wb = *emu::block->warp_bars[w];
  emu::block->values[t] = static_cast<unsigned>(v);
  wb.arrive_and_wait();
  const int src = lane + static_cast<int>(delta);
  const int r = src < 32 && 32 * w + src < emu::block->threads ? static_cast<int>(emu::block->values[32 * w + src]) : v;
  wb.arrive_and_wait();
  return r;
}

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int min(int a, int b) { return a < b ? a : b; }

#define PYDECOUPLE_LAUNCH(kernel, grid, block, stream, ...) \
  ((void)(stream), emu::launch(dim3(grid), dim3(block), [&] { kernel(__VA_ARGS__); }))

#ifdef PYDECOUPLE_CUDA_EMULATION_WMMA
// A software WMMA: every thread of a warp holds the whole 16x16 tile (the
// hardware spreads it over the lanes), loads and multiplies it, and lane 0
// stores it. Enough to check the kernels' tile addressing and layouts.
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

inline float to_float(float v) { return v; }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment {
  float v[16][16] = {};
};

template <int M, int N, int K, class T>
void fill_fragment(fragment<accumulator, M, N, K, T>& f, float value) {
  for (auto& r : f.v)
    for (auto& e : r) e = value;
}

// matrix_a: element (m, k); matrix_b: element (k, n).
template <class Use, int M, int N, int K, class T, class Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const T* p, unsigned ldm) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.v[r][c] = to_float(std::is_same<Layout, row_major>::value ? p[r * ldm + c] : p[r + c * ldm]);
}

template <int M, int N, int K, class T, class LA, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  float out[16][16];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float s = c.v[m][n];
      for (int k = 0; k < 16; ++k) s += a.v[m][k] * b.v[k][n];
      out[m][n] = s;
    }
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) d.v[m][n] = out[m][n];
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  if (emu::linear_tid() % 32 != 0) return;
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) (layout == mem_row_major ? p[m * ldm + n] : p[m + n * ldm]) = f.v[m][n];
}
}  // namespace wmma
}  // namespace nvcuda
#endif
