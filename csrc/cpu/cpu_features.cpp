#include "cpu_features.h"

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "gemm_engine.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#endif

namespace pydecouple {
namespace cpu {
namespace {

#if defined(__x86_64__) && defined(__GNUC__)
uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#if defined(__x86_64__) && defined(__GNUC__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid_max(0x80000000u, nullptr) >= 0x80000004u) {
    char brand[49] = {};
    for (unsigned i = 0; i < 3; ++i) {
      __get_cpuid(0x80000002u + i, &a, &b, &c, &d);
      std::memcpy(brand + 16 * i, &a, 4);
      std::memcpy(brand + 16 * i + 4, &b, 4);
      std::memcpy(brand + 16 * i + 8, &c, 4);
      std::memcpy(brand + 16 * i + 12, &d, 4);
    }
    f.model = brand;
    while (!f.model.empty() && f.model.back() == ' ') f.model.pop_back();
    while (!f.model.empty() && f.model.front() == ' ') f.model.erase(f.model.begin());
  }
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = (c >> 27) & 1;
  f.fma = (c >> 12) & 1;
  f.f16c = (c >> 29) & 1;
  const uint64_t xcr0 = osxsave ? xgetbv0() : 0;
  const bool os_ymm = (xcr0 & 0x6) == 0x6;
  const bool os_zmm = (xcr0 & 0xe6) == 0xe6;
  const bool os_tiles = (xcr0 & (3ull << 17)) == (3ull << 17);
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  f.avx2 = os_ymm && ((b >> 5) & 1) && f.fma;
  f.avx512 = os_zmm && ((b >> 16) & 1) && ((b >> 17) & 1) && ((b >> 30) & 1) && ((b >> 31) & 1);
  f.avx512_fp16 = f.avx512 && ((d >> 23) & 1);
  const bool amx_bf16 = (d >> 22) & 1, amx_tile = (d >> 24) & 1;
  f.amx_bf16 = os_tiles && amx_tile && amx_bf16;
  unsigned a1 = 0, b1 = 0, c1 = 0, d1 = 0;
  __cpuid_count(7, 1, a1, b1, c1, d1);
  f.avx512_bf16 = f.avx512 && ((a1 >> 5) & 1);
  f.amx_fp16 = f.amx_bf16 && ((a1 >> 21) & 1);
#endif
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

const char* path_name(CpuPath p) {
  switch (p) {
    case CpuPath::amx: return "amx";
    case CpuPath::onednn: return "onednn";
    case CpuPath::avx512: return "avx512";
    case CpuPath::avx2: return "avx2";
    default: return "generic";
  }
}

bool path_available(CpuPath p, std::string* why_not) {
  const CpuFeatures& f = cpu_features();
  auto no = [&](const char* why) {
    if (why_not) *why_not = why;
    return false;
  };
  switch (p) {
    case CpuPath::amx:
#if !defined(__x86_64__)
      return no("AMX exists on x86-64 only");
#endif
      if (!f.amx_bf16) return no("this CPU (or its OS) has no AMX tiles for bfloat16 (cpuid amx_bf16/amx_tile, XCR0)");
      return true;
    case CpuPath::onednn:
#if !defined(__x86_64__)
      return no("PyTorch enables oneDNN's brgemm micro-kernel on x86-64 only");
#endif
      if (!f.avx2) return no("oneDNN's brgemm micro-kernel needs at least AVX2");
      return true;
    case CpuPath::avx512:
      if (!f.avx512) return no("this CPU has no AVX-512 (F, BW, VL, DQ with the OS saving zmm registers)");
      if (engine_avx512(Elem::f32) == nullptr) return no("the extension was built without the AVX-512 kernels");
      return true;
    case CpuPath::avx2:
      if (!f.avx2) return no("this CPU has no AVX2 + FMA");
      if (engine_avx2(Elem::f32) == nullptr) return no("the extension was built without the AVX2 kernels");
      return true;
    default:
      return true;
  }
}

CpuPath current_path() {
  const char* env = std::getenv("PYDECOUPLE_CPU_ISA");
  if (env != nullptr && *env != '\0') {
    CpuPath want;
    const std::string v(env);
    if (v == "amx") want = CpuPath::amx;
    else if (v == "onednn") want = CpuPath::onednn;
    else if (v == "avx512") want = CpuPath::avx512;
    else if (v == "avx2") want = CpuPath::avx2;
    else if (v == "generic") want = CpuPath::generic;
    else TORCH_CHECK(false, "PYDECOUPLE_CPU_ISA must be one of amx, onednn, avx512, avx2, generic; got '", v, "'");
    std::string why;
    TORCH_CHECK(path_available(want, &why), "PYDECOUPLE_CPU_ISA=", v, " was requested but cannot run here: ", why);
    return want;
  }
  static const CpuPath best = [] {
    // AMX where present (oneDNN's tiles, several times a zmm dot product);
    // otherwise pydecouple's own AVX-512 kernels: on Zen 4 they measured as
    // fast as oneDNN's brgemm behind the same gathers (within run-to-run
    // noise, benchmarks/bench_gated_conv.py --paths), without depending on
    // oneDNN's internal ISA choice.
    for (CpuPath p : {CpuPath::amx, CpuPath::avx512, CpuPath::avx2}) {
      if (path_available(p, nullptr)) return p;
    }
    return CpuPath::generic;
  }();
  return best;
}

std::string describe_cpu() {
  const CpuFeatures& f = cpu_features();
  std::ostringstream s;
  s << "cpu=" << (f.model.empty() ? "unknown" : f.model) << "\n";
  s << "features=";
  const char* sep = "";
  auto add = [&](bool on, const char* name) {
    if (on) {
      s << sep << name;
      sep = ",";
    }
  };
  add(f.avx2, "avx2");
  add(f.fma, "fma");
  add(f.f16c, "f16c");
  add(f.avx512, "avx512");
  add(f.avx512_bf16, "avx512_bf16");
  add(f.avx512_fp16, "avx512_fp16");
  add(f.amx_bf16, "amx_bf16");
  add(f.amx_fp16, "amx_fp16");
  s << "\n";
  for (CpuPath p : {CpuPath::amx, CpuPath::onednn, CpuPath::avx512, CpuPath::avx2, CpuPath::generic}) {
    std::string why;
    const bool ok = path_available(p, &why);
    s << "path." << path_name(p) << "=" << (ok ? "available" : "unavailable: " + why) << "\n";
  }
  std::string now;
  try {
    now = path_name(current_path());
  } catch (const c10::Error& e) {
    now = std::string("error: ") + e.what_without_backtrace();
  }
  s << "path=" << now << "\n";
  return s.str();
}

}  // namespace cpu
}  // namespace pydecouple
