"""The Triton kernels against the reference, on CPU tensors under TRITON_INTERPRET=1.

``TRITON_INTERPRET`` must be set before Triton is imported, and must not leak
into the other test modules; so the checks run in one subprocess (this file
run as a script with ``--worker``) with ``TRITON_INTERPRET=1`` and
``PYDECOUPLE_BACKEND=triton``, and pytest reports one test per case from its
JSON answer. Every case runs three times: through ``pydecouple.ops.gated_conv2d``
(dispatch included), through the launcher into a NaN-poisoned output (every
element must be written) with the input-compaction pass switched the other way
from its policy, and through ``gated_conv2d_triton``. Input channels that are
off hold NaN and inf: they must never be read into the sum.

Shapes are small: the interpreter runs each program in numpy, slowly.

One more subprocess, without the interpreter, compiles the kernels ahead of
time for sm_80 and sm_90 (no GPU needed: Triton ships ptxas) and checks the
code uses tensor cores and, for the compacted channels_last path, async copies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.triton

# name -> problem. k: (KH, KW); padding: (top, bottom, left, right);
# masks: random | none | out_only | in_only | all_on | all_off | one | mixed.
CASES = {
    "3x3_odd_channels_relu": dict(n=2, cin=7, cout=33, hw=(5, 6), k=(3, 3), stride=(1, 1), padding=(1, 1, 1, 1)),
    "65_in_channels_multi_kblock": dict(n=2, cin=65, cout=17, hw=(5, 3), k=(3, 3), stride=(2, 2),
                                        padding=(1, 0, 2, 1), relu=False),
    "dilation_stride_rect_kernel": dict(n=2, cin=9, cout=18, hw=(9, 7), k=(3, 2), stride=(2, 1),
                                        padding=(2, 2, 1, 1), dilation=(2, 3)),
    "1x1_h1": dict(n=3, cin=20, cout=24, hw=(1, 5), k=(1, 1)),
    "h31_narrow": dict(n=1, cin=8, cout=16, hw=(31, 2), k=(3, 3), padding=(1, 1, 1, 1)),
    "stride_no_pad_valid": dict(n=2, cin=16, cout=16, hw=(8, 8), k=(3, 3), stride=(2, 2), padding=(0, 0, 0, 0)),
    "groups2_gemm": dict(n=2, cin=32, cout=48, hw=(5, 5), k=(3, 3), padding=(1, 1, 1, 1), groups=2),
    "groups4_gemm_16": dict(n=2, cin=64, cout=64, hw=(4, 3), k=(3, 3), padding=(1, 1, 1, 1), groups=4),
    "depthwise": dict(n=2, cin=12, cout=12, hw=(6, 5), k=(3, 3), padding=(1, 1, 1, 1), groups=12),
    "depthwise_multiplier_5x5": dict(n=2, cin=6, cout=12, hw=(7, 6), k=(5, 5), padding=(2, 2, 2, 2), groups=6),
    "depthwise_stride2_channels_last": dict(n=2, cin=10, cout=10, hw=(7, 7), k=(3, 3), stride=(2, 2),
                                            padding=(1, 1, 1, 1), groups=10, channels_last=True),
    "thin_groups3": dict(n=2, cin=12, cout=9, hw=(5, 4), k=(3, 3), padding=(1, 1, 1, 1), groups=3),
    "masks_none": dict(n=2, cin=7, cout=9, hw=(5, 5), k=(3, 3), padding=(1, 1, 1, 1), masks="none"),
    "out_mask_only": dict(n=2, cin=7, cout=33, hw=(4, 5), k=(3, 3), padding=(1, 1, 1, 1), masks="out_only"),
    "in_mask_only": dict(n=2, cin=33, cout=7, hw=(4, 5), k=(3, 3), padding=(1, 1, 1, 1), masks="in_only"),
    "masks_all_on": dict(n=2, cin=7, cout=9, hw=(5, 5), k=(3, 3), padding=(1, 1, 1, 1), masks="all_on"),
    "masks_all_off": dict(n=2, cin=7, cout=9, hw=(5, 5), k=(3, 3), padding=(1, 1, 1, 1), masks="all_off"),
    "masks_one_channel": dict(n=3, cin=17, cout=19, hw=(4, 4), k=(3, 3), padding=(1, 1, 1, 1), masks="one"),
    "masks_mixed_samples": dict(n=4, cin=17, cout=19, hw=(4, 4), k=(3, 3), padding=(1, 1, 1, 1), masks="mixed"),
    "depthwise_all_off_and_one": dict(n=3, cin=8, cout=8, hw=(4, 4), k=(3, 3), padding=(1, 1, 1, 1), groups=8,
                                      masks="mixed"),
    "no_bias": dict(n=2, cin=7, cout=9, hw=(5, 5), k=(3, 3), padding=(1, 1, 1, 1), bias=False),
    "channels_last_f32": dict(n=2, cin=20, cout=36, hw=(5, 6), k=(3, 3), padding=(1, 1, 1, 1), channels_last=True),
    "channels_last_bf16": dict(n=2, cin=20, cout=36, hw=(5, 6), k=(3, 3), padding=(1, 1, 1, 1),
                               channels_last=True, dtype="bfloat16"),
    "f16": dict(n=2, cin=24, cout=20, hw=(5, 4), k=(3, 3), padding=(1, 1, 1, 1), dtype="float16"),
    "bf16_groups2": dict(n=2, cin=32, cout=32, hw=(4, 4), k=(3, 3), padding=(1, 1, 1, 1), groups=2,
                         dtype="bfloat16"),
    "f16_depthwise": dict(n=2, cin=8, cout=8, hw=(5, 5), k=(3, 3), padding=(1, 1, 1, 1), groups=8, dtype="float16"),
    "f64": dict(n=2, cin=9, cout=17, hw=(4, 5), k=(3, 3), padding=(1, 1, 1, 1), dtype="float64"),
    "non_contiguous_view": dict(n=2, cin=12, cout=16, hw=(5, 5), k=(3, 3), padding=(1, 1, 1, 1), view=True),
}

# Random problems drawn from a seeded generator (PYDECOUPLE_FUZZ_SEED to vary it).
_FUZZ = int(os.environ.get("PYDECOUPLE_FUZZ_CASES", "8"))
_FUZZ_SEED = int(os.environ.get("PYDECOUPLE_FUZZ_SEED", "1234"))

DEFAULTS = dict(stride=(1, 1), padding=(0, 0, 0, 0), dilation=(1, 1), groups=1, relu=True, bias=True,
                masks="random", dtype="float32", channels_last=False, view=False)

# Tolerances: the project's one table (tests/tolerances.py), against float64.


def _fuzz_cases(count: int, seed: int) -> dict:
    import random

    rng = random.Random(seed)
    cases = {}
    for i in range(count):
        groups = rng.choice([1, 1, 1, 2, 3])
        cin = groups * rng.choice([1, 2, 5, 8, 16, 17])
        cout = groups * rng.choice([1, 3, 8, 16, 19])
        kh, kw = rng.choice([1, 2, 3]), rng.choice([1, 3])
        sh, sw = rng.choice([1, 2]), rng.choice([1, 2])
        dh, dw = rng.choice([1, 2]), 1
        pad = tuple(rng.choice([0, 1, 2]) for _ in range(4))
        h = rng.randint(max(1, dh * (kh - 1) + 1 - pad[0] - pad[1]), 7)
        w = rng.randint(max(1, dw * (kw - 1) + 1 - pad[2] - pad[3]), 7)
        cases[f"fuzz{seed}_{i}"] = dict(
            n=rng.choice([1, 2, 3]), cin=cin, cout=cout, hw=(h, w), k=(kh, kw), stride=(sh, sw), padding=pad,
            dilation=(dh, dw), groups=groups, relu=rng.random() < 0.5, bias=rng.random() < 0.7,
            masks=rng.choice(["random", "random", "mixed", "one", "none"]),
            dtype=rng.choice(["float32", "float32", "bfloat16", "float16"]), channels_last=rng.random() < 0.4,
        )
    return cases


ALL_CASES = {**CASES, **_fuzz_cases(_FUZZ, _FUZZ_SEED)}


# ----------------------------------------------------------------------------- the worker (subprocess)


def _ensure_kernels_package():
    """Make ``pydecouple.kernels`` importable from ./kernels without an install."""
    import importlib.util

    try:
        import pydecouple.kernels  # noqa: F401
        return
    except ImportError:
        pass
    spec = importlib.util.spec_from_file_location(
        "pydecouple.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["pydecouple.kernels"] = mod
    spec.loader.exec_module(mod)


def _make_masks(kind, n, cin, cout, gen):
    import torch

    if kind == "none":
        return None, None
    if kind == "random":
        return torch.rand(n, cout, generator=gen) < 0.5, torch.rand(n, cin, generator=gen) < 0.5
    if kind == "out_only":
        return torch.rand(n, cout, generator=gen) < 0.5, None
    if kind == "in_only":
        return None, torch.rand(n, cin, generator=gen) < 0.5
    if kind == "all_on":
        return torch.ones(n, cout, dtype=torch.bool), torch.ones(n, cin, dtype=torch.bool)
    if kind == "all_off":
        return torch.zeros(n, cout, dtype=torch.bool), torch.zeros(n, cin, dtype=torch.bool)
    if kind == "one":
        om = torch.zeros(n, cout, dtype=torch.bool)
        im = torch.zeros(n, cin, dtype=torch.bool)
        om[torch.arange(n), torch.randint(cout, (n,), generator=gen)] = True
        im[torch.arange(n), torch.randint(cin, (n,), generator=gen)] = True
        return om, im
    if kind == "mixed":  # sample 0 all off, sample 1 all on, others: one channel, random
        om = torch.rand(n, cout, generator=gen) < 0.5
        im = torch.rand(n, cin, generator=gen) < 0.5
        om[0], im[0] = False, False
        if n > 1:
            om[1], im[1] = True, True
        if n > 2:
            om[2], im[2] = False, False
            om[2, cout - 1], im[2, 0] = True, True
        return om, im
    raise ValueError(kind)


def _run_case(name: str, spec: dict, seed: int) -> dict:
    import torch
    from pydecouple.kernels import gated_conv2d_triton
    from pydecouple.kernels.gated_conv2d import compact_input_policy, gated_conv2d_fwd, uses_direct_kernel
    from tolerances import assert_matches_reference

    import pydecouple
    from pydecouple.reference import gated_conv2d_reference

    c = {**DEFAULTS, **spec}
    dtype = getattr(torch, c["dtype"])
    gen = torch.Generator().manual_seed(seed)
    n, cin, cout, (h, w), (kh, kw), groups = c["n"], c["cin"], c["cout"], c["hw"], c["k"], c["groups"]
    x = torch.randn(n, cin, h, w, generator=gen).to(dtype)
    weight = (torch.randn(cout, cin // groups, kh, kw, generator=gen) / (cin // groups * kh * kw) ** 0.5).to(dtype)
    bias = torch.randn(cout, generator=gen).to(dtype) if c["bias"] else None
    out_mask, in_mask = _make_masks(c["masks"], n, cin, cout, gen)
    if in_mask is not None:
        # Channels that are off hold garbage: the kernel must never read them into a sum.
        bad = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
        garbage = bad[torch.randint(3, x.shape, generator=gen)]
        x = torch.where(in_mask[:, :, None, None], x, garbage)
    if c["channels_last"]:
        x = x.to(memory_format=torch.channels_last)
    if c["view"]:
        big = torch.randn(n, cin, h + 2, w + 3, generator=gen).to(dtype)
        big[:, :, 1:1 + h, 2:2 + w] = x
        x = big[:, :, 1:1 + h, 2:2 + w]  # a strided view, neither contiguous format
    stride, padding, dilation, relu = tuple(c["stride"]), tuple(c["padding"]), tuple(c["dilation"]), c["relu"]
    args = (x, weight, bias, out_mask, in_mask, stride, padding, dilation, groups, relu)

    ref64 = gated_conv2d_reference(
        x.double(), weight.double(), bias.double() if bias is not None else None, out_mask, in_mask,
        stride, padding, dilation, groups, relu)

    t0 = time.perf_counter()
    # 1. Through the public op: PYDECOUPLE_BACKEND=triton must pick the kernel.
    from pydecouple import _backend

    assert _backend.choose(x, weight, out_mask, in_mask, groups) == "triton"
    # The public op takes F.conv2d-style symmetric padding; the four-sided one
    # goes through the registered op, as ops.gated_conv2d passes it.
    if padding[0] == padding[1] and padding[2] == padding[3]:
        out_op = pydecouple.gated_conv2d(x, weight, bias, out_mask, in_mask, stride, (padding[0], padding[2]),
                                         dilation, groups, relu=relu)
    else:
        out_op = torch.ops.pydecouple.gated_conv2d(*args)
    # 2. The launcher directly, into a NaN-poisoned output, with the input
    # compaction pass the other way round from the policy's choice.
    poisoned = torch.full_like(ref64, float("nan"), dtype=dtype)
    if c["channels_last"]:
        poisoned = poisoned.to(memory_format=torch.channels_last)
    policy = compact_input_policy(x, in_mask, cout // groups, kh, kw, stride)
    out_direct = gated_conv2d_fwd(*args, out=poisoned, compact=not policy)
    out_plain = gated_conv2d_triton(*args)
    secs = time.perf_counter() - t0

    problems = []
    for label, o in (("op", out_op), ("launcher", out_direct), ("gated_conv2d_triton", out_plain)):
        if o.dtype != dtype or tuple(o.shape) != tuple(ref64.shape):
            problems.append(f"{label}: got {o.dtype} {tuple(o.shape)}, want {dtype} {tuple(ref64.shape)}")
            continue
        if not torch.isfinite(o).all():
            problems.append(f"{label}: {(~torch.isfinite(o)).sum().item()} non-finite outputs")
        try:
            assert_matches_reference(o, *args)
        except AssertionError as e:
            problems.append(f"{label}: {e}")
    if c["channels_last"] and not out_plain.is_contiguous(memory_format=torch.channels_last):
        problems.append("a channels_last input did not give a channels_last output")
    err = (out_plain.double() - ref64).abs().max().item() if out_plain.numel() else 0.0
    path = "direct" if uses_direct_kernel(cin // groups, cout // groups, groups) else "gemm"
    return dict(name=name, ok=not problems, problems=problems, err=err, secs=secs, path=path, seed=seed)


def _worker(names):
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))  # tolerances.py
    _ensure_kernels_package()
    results = []
    for i, name in enumerate(names):
        try:
            results.append(_run_case(name, ALL_CASES[name], seed=1000 + i))
        except Exception as e:  # report, go on with the other cases
            import traceback

            results.append(dict(name=name, ok=False, problems=[f"{type(e).__name__}: {e}",
                                                                traceback.format_exc(limit=4)]))
    print("@@RESULTS@@" + json.dumps(results))


def _refusal_worker():
    """PYDECOUPLE_BACKEND=triton without the interpreter: an error, not a fallback."""
    import torch

    sys.path.insert(0, str(ROOT))
    _ensure_kernels_package()
    import pydecouple

    x = torch.randn(1, 3, 4, 4)
    w = torch.randn(4, 3, 3, 3)
    try:
        pydecouple.gated_conv2d(x, w, padding=1)
    except RuntimeError as e:
        print("@@REFUSED@@" + str(e))
        return
    print("@@RAN@@")


def _aot_worker():
    """Compile the kernels for sm_80 / sm_90 without a GPU; print what the PTX uses."""
    import re

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, str(ROOT))
    _ensure_kernels_package()
    from pydecouple.kernels import gated_conv2d as k

    def compile_(fn, dtype, consts, cap, **opts):
        sig, attrs = {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in consts:
                sig[name] = "constexpr"
            elif name in ("x_ptr", "w_ptr", "b_ptr", "out_ptr", "xc_ptr"):
                sig[name] = "*" + dtype
            elif name == "in_mask_ptr":
                sig[name] = "*u8"
            elif name.endswith("_ptr"):
                sig[name] = "*i32"
            else:
                sig[name] = "i32"
            if sig[name] != "constexpr" and (name.endswith("_ptr") or name.startswith(("s", "C_"))):
                attrs[(i,)] = [["tt.divisibility", 16]]  # what Triton's launcher infers for aligned shapes
        src = ASTSource(fn=fn, signature=sig, constexprs={(fn.arg_names.index(a),): v for a, v in consts.items()},
                        attrs=attrs)
        ptx = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=opts).asm["ptx"]
        return sorted(set(re.findall(r"\b(wgmma|mma\.sync|cp\.async)\b", ptx)))

    report = {}
    for cap in (80, 90):
        for dtype in ("bf16", "fp32"):  # float16 compiles as bfloat16 does
            for compact in (False, True):
                consts = dict(KH=3, KW=3, STRIDE_H=1, STRIDE_W=1, HAS_BIAS=True, RELU=True, GATHER_IN=True,
                              GATHER_OUT=True, A_COMPACT=compact, USE_DOT=True,
                              INPUT_PRECISION="tf32" if dtype == "fp32" else None, ACC_DTYPE=tl.float32,
                              UPCAST_DOT=False, BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, sxc=1)
                report[f"gemm_sm{cap}_{dtype}_compact{int(compact)}"] = compile_(
                    k._gated_conv2d_fwd_kernel, dtype, consts, cap, num_warps=8, num_stages=3)
        consts = dict(KH=1, KW=1, STRIDE_H=2, STRIDE_W=2, HAS_BIAS=False, RELU=False, GATHER_IN=False,
                      GATHER_OUT=False, A_COMPACT=False, USE_DOT=True, INPUT_PRECISION=None,
                      ACC_DTYPE=tl.float32, UPCAST_DOT=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64)
        report[f"gemm_sm{cap}_bf16_nomasks"] = compile_(k._gated_conv2d_fwd_kernel, "bf16", consts, cap,
                                                        num_warps=4, num_stages=4)
        consts = dict(KH=3, KW=3, STRIDE_H=1, STRIDE_W=1, HAS_BIAS=False, RELU=False, GATHER_IN=True,
                      GATHER_OUT=True, A_COMPACT=False, USE_DOT=False, INPUT_PRECISION=None,
                      ACC_DTYPE=tl.float64, UPCAST_DOT=False, BLOCK_M=32, BLOCK_N=32, BLOCK_K=8)
        report[f"gemm_sm{cap}_fp64"] = compile_(k._gated_conv2d_fwd_kernel, "fp64", consts, cap, num_warps=4,
                                                num_stages=2)
        consts = dict(KH=3, KW=3, STRIDE_H=2, STRIDE_W=2, HAS_BIAS=True, RELU=True, GATHER_IN=True,
                      GATHER_OUT=True, ACC_DTYPE=tl.float32, BLOCK_M=64, BLOCK_N=32)
        report[f"direct_sm{cap}_bf16"] = compile_(k._gated_conv2d_direct_kernel, "bf16", consts, cap, num_warps=4)
        consts = dict(GATHER_IN=True, BLOCK_P=64, BLOCK_C=64)
        report[f"compact_sm{cap}_bf16"] = compile_(k._gated_conv2d_compact_kernel, "bf16", consts, cap, num_warps=4)
    print("@@AOT@@" + json.dumps(report))


# ----------------------------------------------------------------------------- pytest side


def _subprocess(args, env_extra, timeout):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYDECOUPLE_BACKEND")}
    env.update(env_extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=str(ROOT))


@pytest.fixture(scope="module")
def interpret_results():
    try:
        import triton  # noqa: F401
    except ImportError as e:
        pytest.skip(f"Triton is not installed ({e}): the interpreter tests need it")
    t0 = time.perf_counter()
    proc = _subprocess(["--worker", *ALL_CASES], {"TRITON_INTERPRET": "1", "PYDECOUPLE_BACKEND": "triton"},
                       timeout=900)
    marker = "@@RESULTS@@"
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(marker)]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"the interpreter worker failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-5000:]}")
    results = {r["name"]: r for r in json.loads(lines[-1][len(marker):])}
    results["__wall__"] = time.perf_counter() - t0
    return results


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_triton_interpreter_matches_reference(interpret_results, name):
    r = interpret_results[name]
    assert r["ok"], f"case {name} ({ALL_CASES[name]}): " + "\n".join(r["problems"])


def test_triton_cases_cover_both_kernels(interpret_results):
    paths = {r.get("path") for k, r in interpret_results.items() if k != "__wall__"}
    assert {"gemm", "direct"} <= paths


def test_forced_triton_without_interpreter_is_an_error():
    try:
        import triton  # noqa: F401
    except ImportError as e:
        pytest.skip(f"Triton is not installed ({e})")
    proc = _subprocess(["--refusal"], {"PYDECOUPLE_BACKEND": "triton"}, timeout=300)
    assert "@@REFUSED@@" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "TRITON_INTERPRET" in proc.stdout


def test_triton_kernels_compile_for_sm80_and_sm90():
    try:
        import triton  # noqa: F401
    except ImportError as e:
        pytest.skip(f"Triton is not installed ({e})")
    proc = _subprocess(["--aot"], {}, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@AOT@@")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-5000:]
    report = json.loads(lines[-1][len("@@AOT@@"):])
    for dtype in ("bf16", "fp32"):
        for compact in (0, 1):
            assert "wgmma" in report[f"gemm_sm90_{dtype}_compact{compact}"], report
            assert "mma.sync" in report[f"gemm_sm80_{dtype}_compact{compact}"], report
    assert "wgmma" in report["gemm_sm90_bf16_nomasks"], report
    # The compacted channels_last A operand is contiguous: Triton pipelines it with async copies.
    assert "cp.async" in report["gemm_sm80_bf16_compact1"], report
    assert "cp.async" in report["gemm_sm90_bf16_compact1"], report


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("run the worker with TRITON_INTERPRET=1 (set before Triton is imported)")
        _worker(sys.argv[2:] or list(ALL_CASES))
    elif len(sys.argv) > 1 and sys.argv[1] == "--refusal":
        _refusal_worker()
    elif len(sys.argv) > 1 and sys.argv[1] == "--aot":
        _aot_worker()
    else:
        sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-q", __file__]))
