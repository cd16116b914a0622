"""One dispatch point (issue 16): every caller goes through pydecouple._backend.run,
and a caller pins a backend with ``gated_conv2d(..., backend=...)``."""

import ast
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import pydecouple
from pydecouple import _backend, gated_conv2d
from pydecouple.accelerate import accel_layers, accelerate
from pydecouple.reference import gated_conv2d_reference
from test_accelerate import make_model

REPO = Path(__file__).resolve().parents[1]
needs_kernel = pytest.mark.skipif(not pydecouple.extension_available(), reason="the C++ extension is not built")


def _problem(n=2, cin=8, cout=6, h=7):
    x, w, b = torch.randn(n, cin, h, h), torch.randn(cout, cin, 3, 3), torch.randn(cout)
    return x, w, b, torch.ones(n, cout, dtype=torch.bool), torch.ones(n, cin, dtype=torch.bool)


@needs_kernel
def test_backend_argument_pins_the_kernel(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    x, w, b, om, im = _problem()
    om[0, 1] = im[1, 2] = False
    # everything but two channels kept: the automatic choice is dense conv, the pin is the kernel
    assert _backend.choose(x, w, om, im, 1) == "dense"
    assert _backend.choose(x, w, om, im, 1, backend="cpu") == "cpu"
    ran = []
    real = _backend.BACKENDS["cpu"].run
    monkeypatch.setattr(_backend.BACKENDS["cpu"], "run", lambda *a: ran.append(1) or real(*a))
    want = gated_conv2d_reference(x, w, b, om, im, (1, 1), (1, 1, 1, 1), (1, 1), 1, True)
    for backend in ("cpu", "dense", "reference", "auto", None):
        out = gated_conv2d(x, w, b, om, im, padding=1, relu=True, backend=backend)
        torch.testing.assert_close(out, want, atol=2e-4, rtol=2e-4)
    assert len(ran) == 1  # only the pinned call ran the kernel


def test_backend_argument_beats_the_environment(backend):
    backend("reference")
    x, w, b, om, im = _problem()
    assert _backend.choose(x, w, None, None, 1) == "reference"
    assert _backend.choose(x, w, None, None, 1, backend="auto") == "dense"
    assert _backend.choose(x, w, None, None, 1, backend="dense") == "dense"


@pytest.mark.parametrize("bad", ["fastest", "CPU", 1, True], ids=repr)
def test_unknown_backend_argument_names_it(bad):
    x, w, *_ = _problem()
    with pytest.raises(ValueError, match=r"argument 'backend' must be None, 'auto' or one of \[.*'cpu'.*\], got "
                                         + re.escape(repr(bad))):
        gated_conv2d(x, w, backend=bad)


def test_pinned_backend_that_cannot_run_says_why():
    x, w, *_ = _problem()
    with pytest.raises(RuntimeError, match=r"backend=cuda was requested but cannot run: .*CUDA"):
        gated_conv2d(x, w, backend="cuda")
    with pytest.raises(RuntimeError, match=r"backend=cpu was requested but cannot run: .*float64"):
        gated_conv2d(x.double(), w.double(), backend="cpu")


def test_backend_argument_reaches_the_registered_op():
    """Under autograd the registered op runs; the pin goes through its schema."""
    x, w, b, om, im = _problem()
    x.requires_grad_(True)
    out = gated_conv2d(x, w, b, om, im, padding=1, backend="reference")
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert "str? backend=None" in str(torch.ops.pydecouple.gated_conv2d.default._schema)


def test_explain_needs_no_argument():
    reasons = dict(pydecouple.explain_backends())
    assert set(reasons) == set(_backend.BACKENDS) and reasons["reference"] is None


@needs_kernel
def test_accelerated_model_runs_every_conv_through_the_dispatcher(monkeypatch):
    model, x = make_model("resnet20", 3, 32, 2)
    accel = accelerate(model)
    calls = []
    real, real_layer = _backend.run, _backend.run_gated_layer
    monkeypatch.setattr(_backend, "run", lambda *a, **k: calls.append(k.get("backend")) or real(*a, **k))

    def layer_spy(*a, **k):  # a gated layer in one call (gate + conv); None: it took run() instead
        out = real_layer(*a, **k)
        if out is not None:
            calls.append(k.get("backend"))
        return out

    monkeypatch.setattr(_backend, "run_gated_layer", layer_spy)
    with torch.no_grad():
        accel(x)
    assert len(calls) == len(accel_layers(accel))
    assert set(calls) == {"auto"}
    calls.clear()
    with torch.no_grad():
        accelerate(model, use_kernel=False)(x)
    assert set(calls) == {"dense"}


def test_no_module_but_the_dispatcher_calls_a_compiled_kernel():
    """The rule of which implementation runs lives in pydecouple/_backend.py
    only: no other module's code names a compiled kernel op (docstrings may)."""
    offenders = []
    for path in sorted(list((REPO / "pydecouple").rglob("*.py")) + list((REPO / "benchmarks").rglob("*.py"))):
        if path.name == "_backend.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("gated_conv2d_cpu", "gated_conv2d_cuda", "accel_conv_cpu") \
                    and isinstance(node.value, ast.Attribute) and node.value.attr == "pydecouple":
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, offenders


def test_dense_route_applies_masks_under_jit_trace():
    """run_dense skips all-on masks eagerly; a trace must not freeze that skip."""
    x, w, b, om, im = _problem()

    def f(x, om):
        return _backend.run_dense(x, w, b, om, None, (1, 1), (1, 1, 1, 1), (1, 1), 1, False)

    traced = torch.jit.trace(f, (x, om))
    om2 = om.clone()
    om2[:, ::2] = False
    torch.testing.assert_close(traced(x, om2), F.conv2d(x, w, b, padding=1) * om2[:, :, None, None])
