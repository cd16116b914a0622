#!/usr/bin/env bash
# One command for a person with a CUDA GPU:
#
#   benchmarks/gpu_check.sh RESULTS_DIR
#
# 1. builds pydecouple in place against the PyTorch, Triton and nvcc already
#    installed (pip install --no-build-isolation --no-deps -e .; nothing is
#    downloaded), for this GPU's architecture only;
# 2. runs the GPU tests (pytest -m gpu: Triton and CUDA backends, every dtype,
#    poisoned outputs, float64 reference, CUDA graphs, torch.compile);
# 3. runs the CUDA benchmark (benchmarks/bench_gated_conv_cuda.py --quick);
# and prints a short table last. Everything goes to RESULTS_DIR: build.log,
# gpu_tests.log, gpu_tests.xml, bench.log, cuda_kernel.{csv,md}, env.txt.
# Sized for under 6 minutes on an H100 (each step has a time limit; the
# benchmark stops starting new cases when its budget is spent).
#
# Environment: PYTHON (default .venv/bin/python if present, else python3),
# MAX_JOBS (parallel compile jobs, default: all cores), TORCH_CUDA_ARCH_LIST
# (default: this GPU's), BUILD_TIMEOUT / TEST_TIMEOUT / TOTAL_BUDGET / BENCH_BUDGET
# (seconds; by default the benchmark gets what is left of 340 s, at least 60).
# Triton compiles each kernel variant once (cached in ~/.triton/cache): a first
# run on a fresh machine spends much of its time compiling, a second run measures more.
set -uo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 RESULTS_DIR" >&2
    exit 2
fi
OUT=$1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi
BUILD_TIMEOUT=${BUILD_TIMEOUT:-180}
TEST_TIMEOUT=${TEST_TIMEOUT:-200}
TOTAL_BUDGET=${TOTAL_BUDGET:-340}  # seconds for everything; the benchmark gets what is left
START=$(date +%s)
status=0

step() { echo; echo "== $* ($(( $(date +%s) - START )) s)"; }

step "environment"
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi not found"
    command -v nvcc >/dev/null && nvcc --version | tail -2 || echo "nvcc not on PATH"
    "$PY" - <<'PYEOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton not importable:", e)
PYEOF
} 2>&1 | tee "$OUT/env.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA GPU visible to PyTorch ($PY): nothing to check" >&2
    exit 2
fi

step "build (pip install --no-build-isolation --no-deps -e .), log: $OUT/build.log"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
    export TORCH_CUDA_ARCH_LIST
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"
if timeout "$BUILD_TIMEOUT" "$PY" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
    echo "built"
else
    echo "BUILD FAILED or timed out (see $OUT/build.log); the tests go on with what imports" >&2
    tail -20 "$OUT/build.log" >&2
    status=1
fi
"$PY" - <<'PYEOF' 2>&1 | tee -a "$OUT/env.txt"
import torch, pydecouple
ok = pydecouple.extension_available()
print("extension:", "loaded" if ok else "NOT loaded",
      "| CUDA op:", "yes" if hasattr(torch.ops.pydecouple, "gated_conv2d_cuda") else "no")
for name, why in pydecouple.explain_backends(torch.empty(1, device="cuda")):
    print(f"  backend {name}: {'ok' if why is None else why}")
PYEOF

step "GPU tests (pytest -m gpu), log: $OUT/gpu_tests.log"
timeout "$TEST_TIMEOUT" "$PY" -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider \
    --junitxml="$OUT/gpu_tests.xml" >"$OUT/gpu_tests.log" 2>&1
test_rc=$?
tail -25 "$OUT/gpu_tests.log"
test_line=$(grep -E "(passed|failed|error|skipped)" "$OUT/gpu_tests.log" | tail -1)
if [ $test_rc -eq 124 ]; then test_line="TIMED OUT after ${TEST_TIMEOUT} s: $test_line"; fi
[ $test_rc -ne 0 ] && status=1

BENCH_BUDGET=${BENCH_BUDGET:-$(( TOTAL_BUDGET - ($(date +%s) - START) - 30 ))}
[ "$BENCH_BUDGET" -lt 60 ] && BENCH_BUDGET=60
step "benchmark (budget ${BENCH_BUDGET} s), log: $OUT/bench.log"
timeout $(( BENCH_BUDGET + 60 )) "$PY" benchmarks/bench_gated_conv_cuda.py --quick --compare-compaction \
    --time-budget "$BENCH_BUDGET" --out "$OUT" >"$OUT/bench.log" 2>&1
bench_rc=$?
[ $bench_rc -ne 0 ] && status=1

echo
echo "================================================================ gpu_check summary"
echo "took $(( $(date +%s) - START )) s; results in $OUT"
echo "tests: ${test_line:-no result} (rc $test_rc)"
if [ $bench_rc -eq 0 ]; then
    # The benchmark prints its short table last, after a marker line.
    sed -n '/^== short table/,$p' "$OUT/bench.log" | sed '1d'
else
    echo "benchmark failed or timed out (rc $bench_rc); last lines of $OUT/bench.log:"
    tail -15 "$OUT/bench.log"
fi
exit $status
