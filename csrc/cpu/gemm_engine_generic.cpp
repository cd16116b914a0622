// The GEMM engine's kernels in portable C++ (any CPU; float32 compute).
#define ENGINE_NS generic
#define ENGINE_ISA 0
#define ENGINE_NAME "generic"
#include "gemm_engine_impl.h"

namespace pydecouple {
namespace cpu {

const EngineKernels* engine_generic(Elem compute) { return compute == Elem::f32 ? generic::kernels_f32() : nullptr; }

}  // namespace cpu
}  // namespace pydecouple
