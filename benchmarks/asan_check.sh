#!/usr/bin/env bash
# AddressSanitizer run of the C++ CPU extension (issue 12), in a copy of the
# committed tree so that the working tree and its build stay untouched.
#
#   benchmarks/asan_check.sh [DEST] [TEST_FILE ...]
#
# DEST (default /work/asan) receives `git archive HEAD`, unless it already
# exists (then it is reused as is, and its build is incremental). The
# extension is built there in place with PYDECOUPLE_ASAN=1 (setup.py adds
# -fsanitize=address -fno-omit-frame-pointer -g -O1), then the tests that call
# the compiled ops run with libasan preloaded into the (uninstrumented) Python
# and DEST first on PYTHONPATH. The script checks that pydecouple._C is the
# ASan build from DEST before running anything. PY overrides the interpreter
# (default: the repository's .venv). Exit status: pytest's, or 1 with an ASan
# report; ASan ends the process (halt_on_error=1) at its first report, which
# is printed from DEST/asan-logs at the end.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$REPO/.venv/bin/python}
DEST=${1:-/work/asan}
shift || true
TESTS=("$@")
if [ ${#TESTS[@]} -eq 0 ]; then
    # Every test file that reaches torch.ops.pydecouple (grep -l torch.ops.pydecouple tests/*.py).
    TESTS=(tests/test_ops.py tests/test_accel_op.py tests/test_op_arguments.py tests/test_dispatch.py
           tests/test_errors.py)
fi

if [ ! -d "$DEST" ]; then
    mkdir -p "$DEST"
    git -C "$REPO" archive HEAD | tar -x -C "$DEST"
fi
cd "$DEST"

# One compile job at a time: the machine is shared.
PYDECOUPLE_ASAN=1 PYDECOUPLE_CUDA=0 MAX_JOBS=1 nice -n 10 "$PY" setup.py build_ext --inplace

# libstdc++ is preloaded after libasan: python does not link it, so at ASan's
# start the real __cxa_throw is not found, and the first C++ exception (any
# TORCH_CHECK reaching the dispatcher) dies in "CHECK failed:
# asan_interceptors.cpp:320 real___cxa_throw != 0" (exit 1), not an ASan finding.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
# Reports go to files: pytest captures stderr, and a report that ends the process is lost with it.
LOGDIR=$DEST/asan-logs
rm -rf "$LOGDIR" && mkdir -p "$LOGDIR"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:log_path=$LOGDIR/asan
export PYTHONPATH=$DEST

# The ASan build from DEST must be the one imported (not an installed or editable copy).
nice -n 10 "$PY" - "$DEST" <<'EOF'
import os, sys
import pydecouple, pydecouple._C as C
dest = os.path.realpath(sys.argv[1])
print("pydecouple._C:", C.__file__)
assert os.path.realpath(C.__file__).startswith(dest + os.sep), f"{C.__file__} is not under {dest}"
assert pydecouple.extension_available()
with open(C.__file__, "rb") as f:
    assert b"__asan_init" in f.read(), "pydecouple._C is not an ASan build"
EOF

rc=0
nice -n 10 "$PY" -m pytest -p no:cacheprovider -q "${TESTS[@]}" || rc=$?
if compgen -G "$LOGDIR/asan.*" >/dev/null; then
    echo "ASan reports ($LOGDIR):"; cat "$LOGDIR"/asan.*
    [ $rc -ne 0 ] || rc=1
else
    echo "no ASan report"
fi
exit $rc
