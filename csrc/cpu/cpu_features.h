// What this CPU can run, read once from cpuid, and which code path the CPU
// kernels take: chosen at run time, never at build time (the same .so runs on
// an AVX2 machine, a Zen 4 and a Xeon with AMX).
#pragma once

#include <string>

namespace pydecouple {
namespace cpu {

struct CpuFeatures {
  std::string model;  // the brand string, e.g. "AMD EPYC 9B14"
  bool avx2 = false, fma = false, f16c = false;
  bool avx512 = false;       // F + BW + VL + DQ, with the OS saving the zmm state
  bool avx512_bf16 = false;  // vdpbf16ps
  bool avx512_fp16 = false;
  bool amx_bf16 = false;     // AMX tiles usable for bfloat16 (cpuid and OS state)
  bool amx_fp16 = false;
};

const CpuFeatures& cpu_features();

// The code paths of the GEMM engine, best first. `amx` is oneDNN's brgemm
// micro-kernel (at::native::cpublas::brgemm) on a CPU with AMX, where oneDNN
// uses AMX tiles for bfloat16; `onednn` is the same micro-kernel on any CPU
// (oneDNN's own ISA choice); the others are pydecouple's own micro-kernels.
enum class CpuPath { amx, onednn, avx512, avx2, generic };

const char* path_name(CpuPath p);

// Whether this CPU (and build) can run the path; else why not.
bool path_available(CpuPath p, std::string* why_not);

// The path the kernels take now: PYDECOUPLE_CPU_ISA (amx, onednn, avx512,
// avx2, generic) if set, else the best available. A requested path the CPU
// cannot run is an error naming the reason.
CpuPath current_path();

// One line per fact, for `python -m pydecouple info`.
std::string describe_cpu();

}  // namespace cpu
}  // namespace pydecouple
