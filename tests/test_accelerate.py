"""pydecouple.accelerate: the accelerated module computes the decoupled model's
eval function (masked dense) with gated kernels, on every zoo model, on a
trained checkpoint when one exists, with all gates on (= the dense model), and
under torch.compile."""

import copy
import glob
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from pydecouple.accelerate import accel_layers, accelerate, profile
from pydecouple.models import build
from pydecouple.nn import gate_modules, set_gates_open

REPO = Path(__file__).resolve().parents[1]
CIFAR = Path(os.environ.get("PYDECOUPLE_CIFAR", Path(__file__).resolve().parents[1].parent / "shared/data/cifar10/cifar10-subset.npz"))

# (arch, in_channels, image size, batch, build kwargs): small batches keep the deep models fast.
ZOO = [
    ("tiny_cnn", 1, 8, 8, {}),
    ("small_vgg", 3, 32, 6, {}),
    ("vgg16", 3, 32, 3, {}),
    ("vgg_cfg_e", 3, 32, 2, {}),
    ("resnet20", 3, 32, 6, {}),
    ("resnet56", 3, 32, 2, {}),
    # the block variants accelerate() handles: gated 1x1 shortcuts, bottlenecks
    ("resnet20", 3, 32, 3, {"decouple_kwargs": {"gate_downsample": True}}),
    ("resnet20", 3, 32, 3, {"block": "bottleneck", "decouple_kwargs": {"gate_downsample": True}}),
    # ACMs with a BatchNorm on their logits (folded into fc2)
    ("small_vgg", 3, 32, 4, {"decouple_kwargs": {"logit_norm": True}}),
]
ZOO_IDS = ["tiny_cnn", "small_vgg", "vgg16", "vgg_cfg_e", "resnet20", "resnet56", "resnet20-gated-shortcut",
           "resnet20-bottleneck-gated-shortcut", "small_vgg-logit-norm"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a loaded 2-core machine every parallel region of a
    2-thread run can wait tens of ms for a descheduled worker, which made this
    file take minutes. (The kernel's split over threads is the kernel tests'
    business: test_ops runs with PyTorch's default thread count.)"""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomize_bn(model: nn.Module) -> None:
    """Non-trivial eval statistics and affine parameters in every BN."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0.0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.6, 1.4)
                m.bias.normal_(0.0, 0.2)


def mix_gates(model: nn.Module, x: torch.Tensor) -> None:
    """Make the gates input-dependent and about half on: W2 of unit scale, then
    each channel's b2 set so that its logit's median over ``x`` is zero."""
    gates = gate_modules(model)
    with torch.no_grad():
        for _, g in gates:
            g.fc2.weight.normal_(0.0, 1.0 / g.hidden ** 0.5)
            g.fc2.bias.zero_()
            norm = getattr(g, "norm", None)  # logit_norm=True: a BatchNorm1d on the logits
            if norm is not None:
                norm.running_mean.normal_(0.0, 0.1)
                norm.running_var.uniform_(0.5, 2.0)
                norm.weight.uniform_(0.5, 1.5)
        model.eval()(x)
        for _, g in gates:
            norm = getattr(g, "norm", None)
            (norm.bias if norm is not None else g.fc2.bias).sub_(g.last_logits.median(dim=0).values)


def make_model(arch: str, cin: int, size: int, batch: int, **build_kwargs):
    model = build(arch, decoupled=True, in_channels=cin, **build_kwargs)
    randomize_bn(model)
    x = torch.rand(batch, cin, size, size)
    mix_gates(model, torch.rand(8, cin, size, size))
    return model.eval(), x


def assert_logits_match(out: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * max(scale, 1e-6))
    # identical classes wherever the top-2 margin is above the float32 noise
    top2 = ref.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-4 * max(scale, 1e-6)
    assert torch.equal(out.argmax(1)[clear], ref.argmax(1)[clear])


@pytest.mark.parametrize("arch,cin,size,batch,kwargs", ZOO, ids=ZOO_IDS)
def test_zoo_equivalence(arch, cin, size, batch, kwargs):
    model, x = make_model(arch, cin, size, batch, **kwargs)
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        ref = model(x)
        kept = torch.cat([g.last_mask.float().flatten() for _, g in gate_modules(model)]).mean().item()
        per_sample = [g.last_mask for _, g in gate_modules(model)]
        accel = accelerate(model)
        out = accel(x)
    assert 0.15 < kept < 0.85, f"gates not mixed: {kept:.2f} kept"
    assert any((m != m[:1]).any() for m in per_sample), "masks do not vary between samples"
    assert_logits_match(out, ref)
    # the input model is untouched
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training and not accel.training
    n_gated = sum(1 for _, m in accel_layers(accel) if m.gate is not None)
    assert n_gated == len(gate_modules(model))
    assert not any(p.requires_grad for p in accel.parameters())


@pytest.mark.parametrize("arch,kwargs", [("small_vgg", {}), ("resnet20", {}),
                                         ("resnet20", {"block": "bottleneck",
                                                       "decouple_kwargs": {"gate_downsample": True}})],
                         ids=["small_vgg", "resnet20", "resnet20-bottleneck"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gate_means_travel_from_the_layer_that_wrote_the_input(monkeypatch, arch, kwargs, channels_last):
    """A gated layer whose output the next gated layer reads returns its
    channel means (emit_means), and the consumer's gate uses them instead of
    reading its input: every linked consumer receives them, nothing else
    does, and the logits are the decoupled model's."""
    from pydecouple import _backend
    from pydecouple.accelerate.modules import AccelResidual
    model, x = make_model(arch, 3, 32, 5, **kwargs)
    with torch.no_grad():
        ref = model(x)
    accel = accelerate(model, channels_last=channels_last)
    layers = [m for _, m in accel_layers(accel)]
    emitting = [m for m in layers if m.emit_means]
    assert emitting, "no layer was linked"
    for block in (m for m in accel.modules() if isinstance(m, AccelResidual)):
        assert all(c.emit_means for c in block.convs[:-1])  # conv1 (-> conv2) feed the next conv's gate
    calls = []
    real = _backend._call_fused

    def spy(*args):
        out = real(*args)
        calls.append((args[-2] is not None, args[-1], out[2]))
        return out

    monkeypatch.setattr(_backend, "_call_fused", spy)
    with torch.no_grad():
        out = accel(x)
    assert_logits_match(out, ref)
    assert sum(emit for _, emit, _ in calls) == len(emitting)
    # each consumer call right after an emitting call got its means, and only those
    got = [given for given, _, _ in calls]
    assert sum(got) >= 1 and all(not g or calls[i - 1][1] or _downsample_between(calls, i) for i, g in enumerate(got))
    for given, emit, means in calls:
        assert (means.shape[0] == x.shape[0]) if emit else means.numel() == 0
    # without the links: the same logits, every gate reading its input
    for m in emitting:
        m.emit_means = False
    calls.clear()
    with torch.no_grad():
        assert_logits_match(accel(x), ref)
    assert not any(given for given, _, _ in calls)


def _downsample_between(calls, i):
    """A block's gated shortcut conv runs between the previous block's last
    conv (the producer) and this block's conv1: look one call further back."""
    return i >= 2 and calls[i - 2][1]


@pytest.mark.parametrize("arch", ["small_vgg", "resnet20"])
def test_masked_dense_route_equivalence(arch):
    """use_kernel=False (dense conv + mask, the benchmark's comparison) and the
    public op's dispatch (a forced backend) compute the same function."""
    model, x = make_model(arch, 3, 32, 4)
    with torch.no_grad():
        ref = model(x)
        assert_logits_match(accelerate(model, use_kernel=False)(x), ref)


def test_forced_backend_goes_through_the_op(monkeypatch):
    model, x = make_model("resnet20", 3, 32, 3)
    with torch.no_grad():
        ref = model(x)
        monkeypatch.setenv("PYDECOUPLE_BACKEND", "reference")
        accel = accelerate(model)
        monkeypatch.delenv("PYDECOUPLE_BACKEND")
        out = accel(x)  # the environment was read at conversion, once, and pinned on every layer
    assert_logits_match(out, ref)
    assert {m.backend for _, m in accel_layers(accel)} == {"reference"}


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_warns_on_a_cpu_that_widens_it(monkeypatch, native):
    """A CPU without AVX512_BF16 or AMX runs bfloat16 slower than float32:
    accelerate(dtype=bfloat16) says so there, and only there."""
    import warnings

    from pydecouple import isa

    monkeypatch.setattr(isa, "has_bfloat16_dot", lambda: native)
    model, _ = make_model("small_vgg", 3, 16, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        accelerate(model, dtype=torch.bfloat16)
        accelerate(model)  # float32 never warns
    said = [str(w.message) for w in caught if "bfloat16 dot product" in str(w.message)]
    assert len(said) == (0 if native else 1), said


@pytest.mark.parametrize("arch", ["small_vgg", "resnet20"])
def test_all_gates_on_equals_dense(arch):
    dense = build(arch)
    randomize_bn(dense)
    dense.eval()
    dec = build(arch, decoupled=True)
    missing, unexpected = dec.load_state_dict(dense.state_dict(), strict=False)
    assert not unexpected and all(".gate." in k for k in missing)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        ref = dense(x)
        # gates forced open on the model: the ACMs are not evaluated
        set_gates_open(dec, True)
        assert_logits_match(accelerate(dec)(x), ref)
        set_gates_open(dec, False)
        # gates computed, and all on (the dense fallback of gating_pays runs)
        for _, g in gate_modules(dec):
            g.fc2.bias.fill_(1e4)
        accel = accelerate(dec)
        assert_logits_match(accel(x), ref)
        assert_logits_match(accelerate(dense)(x), ref)  # a dense model: folded convs only


def test_unrecognised_block_is_converted_child_by_child():
    """A residual block with its own forward keeps that forward; its conv/BN
    pairs are still folded and gated (no in-mask chaining inside it)."""
    from pydecouple.nn import decouple
    from pydecouple.nn.modules import BasicBlock

    class HalfBlock(BasicBlock):
        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + x) * 0.5

    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), HalfBlock(16, 16),
                        HalfBlock(16, 16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    model = decouple(net)
    randomize_bn(model)
    mix_gates(model, torch.rand(12, 3, 32, 32))
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        ref = model.eval()(x)
        accel = accelerate(model)
        assert_logits_match(accel(x), ref)
    assert sum(1 for _, m in accel_layers(accel) if m.gate is not None) == 4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in accel.modules())


def test_profile_covers_every_layer():
    model, x = make_model("resnet20", 3, 32, 2)
    accel = accelerate(model)
    prof = profile(accel, x, repeats=2, warmup=1)
    assert len(prof.layers) == len(accel_layers(accel))
    assert prof.total_s > 0 and prof.conv_s > 0 and prof.gate_s > 0
    gated = [lay for lay in prof.layers if lay.gated]
    assert gated and all(0.0 <= lay.kept <= 1.0 for lay in gated)
    assert "conv" in prof.table()
    with torch.no_grad():  # the profiler is off again: no timers in the forward
        assert_logits_match(accel(x), model(x))


# Inductor (C++ code generation) on the small VGG-style model; the residual
# model through Dynamo + AOTAutograd only (the same graph capture, no C++
# build: Inductor on ResNet-20 alone takes about 30 s on 2 cores).
@pytest.mark.parametrize("arch,size,cin,compile_backend", [("tiny_cnn", 8, 1, "inductor"),
                                                           ("resnet20", 32, 3, "aot_eager")])
def test_compile_fullgraph_matches_eager(arch, size, cin, compile_backend):
    model, x = make_model(arch, cin, size, 4)
    accel = accelerate(model)
    torch._dynamo.reset()
    compiled = torch.compile(accel, fullgraph=True, dynamic=False, backend=compile_backend)
    with torch.no_grad():
        eager = accel(x)
        out = compiled(x)
        out2 = compiled(x.flip(0))  # other masks, same graph (masks are data)
        eager2 = accel(x.flip(0))
    assert_logits_match(out, eager)
    assert_logits_match(out2, eager2)


def _decoupled_checkpoints():
    found = []
    for p in sorted(glob.glob(str(REPO / "runs" / "**" / "*.pt"), recursive=True)):
        try:
            blob = torch.load(p, map_location="cpu", weights_only=True)
        except Exception:
            continue
        if isinstance(blob, dict) and blob.get("meta", {}).get("decoupled"):
            found.append(p)
    return found


def test_trained_checkpoint():
    ckpts = _decoupled_checkpoints()
    if not ckpts:
        pytest.skip(f"no decoupled checkpoint under {REPO / 'runs'} (train one: pydecouple train --decoupled ...)")
    from pydecouple.checkpoint import load_model

    model, meta = load_model(ckpts[0])
    x = None
    if int(meta.get("in_channels", 3)) == 3 and CIFAR.is_file():
        from pydecouple.data import load_dataset

        x = load_dataset(str(CIFAR), "test")[0][:64]
    elif int(meta.get("in_channels", 3)) == 1:
        from pydecouple.data import load_dataset

        x = load_dataset("digits", "test")[0][:64]
    if x is None:
        pytest.skip(f"{ckpts[0]}: no test images for its input ({CIFAR} absent)")
    with torch.no_grad():
        ref = model(x)
        out = accelerate(model)(x)
    assert_logits_match(out, ref)
    assert torch.equal(out.argmax(1), ref.argmax(1))


def test_benchmark_models_api(tmp_path, monkeypatch):
    """pydecouple.benchmarking.benchmark_models (benchmarks/bench_model.py and the demo use it)."""
    from pydecouple.accelerate import tuning
    from pydecouple.benchmarking import PROVIDERS, benchmark_models

    dense = build("tiny_cnn", in_channels=1).eval()
    dec = build("tiny_cnn", decoupled=True, in_channels=1)
    dec.load_state_dict(dense.state_dict(), strict=False)
    mix_gates(dec, torch.rand(8, 1, 8, 8))
    images, labels = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    rows = benchmark_models(dense, dec, images, [1, 8], repeats=1, labels=labels, min_time=0.0)
    untuned = [p for p in PROVIDERS if p != "accelerated traced rule"]  # that one only beside tuned models
    assert [(r["batch"], r["provider"]) for r in rows] == [(b, p) for b in (1, 8) for p in untuned]
    for r in rows:
        assert r["latency_ms"] > 0 and 0 < r["flops_ratio"] <= 1.0 + 1e-9 or r["provider"] == "accelerated all-on"
        if r["provider"] in ("dense folded", "accelerated nchw", "accelerated", "decoupled masked-dense"):
            assert 0.0 <= r["accuracy"] <= 1.0
    assert next(r for r in rows if r["provider"] == "dense best")["speedup"] == 1.0
    for b in (1, 8):  # the baseline is the faster dense layout, the accelerated row the faster of its own
        by = {r["provider"]: r for r in rows if r["batch"] == b}
        assert by["dense best"]["latency_ms"] == min(by[p]["latency_ms"] for p in
                                                     ("dense folded", "dense folded cl", "dense folded traced"))
        assert by["accelerated"]["latency_ms"] == min(by[p]["latency_ms"] for p in
                                                      ("accelerated nchw", "accelerated cl", "accelerated traced"))
    rows = benchmark_models(dense, dec, images, [2], repeats=1, labels=labels, min_time=0.0, dtypes=[torch.bfloat16])
    by = {r["provider"]: r for r in rows}
    assert by["accelerated"]["dtype"] == "bfloat16" and 0.0 <= by["accelerated"]["agreement"] <= 1.0
    # tune=True: the accelerated models route by measured crossovers, the rule's traced model beside them
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / "crossovers.json"))
    rows = benchmark_models(dense, dec, images, [2], repeats=1, min_time=0.0, tune=True)
    assert [r["provider"] for r in rows] == PROVIDERS
    assert (tmp_path / "crossovers.json").is_file()
