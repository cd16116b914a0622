"""pydecouple.accelerate.tune: each gated layer's dense-or-kernel crossover
measured on this machine, cached per machine, and used by the fused layer.

Timings are never asserted: the tests check that the measuring gate gives
the masks it is built for, that the crossover is read off the measured
ratios, that the cache is written, reused and never corrupted, that the
layers route by the measured crossover, and that tuning changes no result."""

import json

import pytest
import torch
from pydecouple import _backend
from pydecouple.accelerate import accel_layers, accelerate, tune
from pydecouple.accelerate import tuning
from test_accelerate import assert_logits_match, make_model


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "cache" / "crossovers.json"
    monkeypatch.setenv(tuning.CACHE_ENV, str(path))
    return path


@pytest.mark.parametrize("n,c,o", [(1, 2, 5), (2, 3, 8), (3, 16, 7), (7, 5, 33), (64, 64, 96)])
def test_mask_gate_gives_exactly_the_mask(n, c, o):
    """The fused op's gate, fed _mask_gate's parameters and means, computes
    the mask it was built from: random rows, an all-on and an all-off row."""
    mask = torch.rand(n, o) < 0.5
    mask[0] = True
    if n > 1:
        mask[-1] = False
    *gate, z = [t.float().contiguous() for t in tuning._mask_gate(mask, c)]
    x = torch.randn(n, c, 6, 6)
    w, b = torch.randn(o, c, 3, 3), torch.randn(o)
    _, got, _ = torch.ops.pydecouple.accel_conv_cpu(x, None, w, b, *gate, [1, 1], [1] * 4, [1, 1], True, None, False,
                                                    -1.0, z, False)
    assert torch.equal(got, mask)


def test_crossover_reads_the_measured_ratios():
    # kernel faster up to 0.5, slower from 0.64 (ratio 1 crossed a quarter of the way from 0.5 to 0.64)
    ratios = {0.04: 0.3, 0.25: 0.6, 0.5: 0.9, 0.64: 1.3, 1.0: 1.6}
    assert tuning.crossover(ratios) == pytest.approx(0.5 + 0.14 * 0.25)
    assert tuning.crossover({0.25: 1.2, 0.5: 1.5}) == 0.0  # slower everywhere: dense
    assert tuning.crossover({0.25: 0.5, 1.0: 0.9}) == 1.0  # faster everywhere: the kernel always
    # the first crossing counts, not a later dip below 1 (noise)
    assert tuning.crossover({0.2: 0.5, 0.4: 1.5, 0.6: 0.9}) == pytest.approx(0.2 + 0.2 * 0.5 / 1.0)
    assert tuning.crossover({}) == 0.0


def test_tune_measures_caches_and_keeps_the_function(cache_file, monkeypatch):
    model, x = make_model("resnet20", 3, 16, 4)
    with torch.no_grad():
        ref = model(x)
    accel = accelerate(model, channels_last=True)
    report = tune(accel, x, batches=[1, 4], repeats=1)
    gated = [m for _, m in accel_layers(accel) if m.gate is not None]
    keys = {t.key for t in report.layers}  # resnet20's blocks repeat shapes: each problem is measured once
    assert report.layers and report.measured == len(keys) < len(report.layers)
    assert {t.source for t in report.layers} == {"measured", "shared"}
    assert {t.batch for t in report.layers} == {1, 4}
    assert all(0.0 <= t.dense_above <= 1.0 and t.ratios for t in report.layers)
    assert all(m.crossovers for m in gated)  # every gated layer got its crossover
    assert "| layer | batch |" in report.table() and report.fingerprint in report.table()
    with torch.no_grad():
        assert_logits_match(accel(x), ref)

    data = json.loads(cache_file.read_text())
    entries = data["machines"][tuning.machine_fingerprint()]
    assert {t.key for t in report.layers} <= set(entries)
    assert not list(cache_file.parent.glob("*.tmp"))  # the temporary file was renamed, not left

    # A second model of the same shapes measures nothing: every crossover from the cache.
    def no_measuring(*a, **k):
        raise AssertionError("measured although cached")

    monkeypatch.setattr(tuning, "measure_crossover", no_measuring)
    again = accelerate(model, channels_last=True)
    report2 = tune(again, x, batches=[1, 4])
    assert report2.measured == 0 and [t.dense_above for t in report2.layers] == [t.dense_above for t in report.layers]


def test_layers_route_by_the_measured_crossover(cache_file, monkeypatch):
    """A layer's measured crossover is what the fused op is told, for the
    nearest measured batch size; an unmeasured image size keeps the rule."""
    model, x = make_model("small_vgg", 3, 16, 8)
    accel = accelerate(model)
    first, (c, h, w), *_ = tuning._gated_shapes(accel, x)[0]
    first.set_crossover(h, w, 1, 0.9)
    first.set_crossover(h, w, 32, -1.0)
    seen = []
    real = _backend._call_fused

    def spy(*args):
        if args[2] is first.weight:
            seen.append(args[14])
        return real(*args)

    monkeypatch.setattr(_backend, "_call_fused", spy)
    with torch.no_grad():
        for n in (1, 2, 8, 64):
            accel(torch.rand(n, 3, 16, 16))
    # n = 1, 2 -> batch 1's 0.9; 8, 64 -> batch 32's -1 (log scale: 8 is nearer 32 than 1)
    assert seen == [0.9, 0.9, -1.0, -1.0]
    seen.clear()
    with torch.no_grad():
        accel(torch.rand(2, 3, 24, 24))  # another image size: the rule
    h2 = w2 = h * 24 // 16
    kh, kw = first.kernel_size
    assert seen == [_backend.gating_threshold(2, h2 * w2, c * kh * kw, first.out_channels)]


def test_tune_clears_traces_and_leaves_a_bad_cache_alone(cache_file):
    model, x = make_model("tiny_cnn", 1, 8, 4)
    accel = accelerate(model, executor="trace")
    with torch.no_grad():
        ref = accel(x)
    assert accel._traces
    cache_file.parent.mkdir(parents=True)
    cache_file.write_text("{not json")
    with pytest.warns(UserWarning, match=r"crossover cache .* could not be read"):
        report = tune(accel, x, repeats=1)
    assert report.measured == len({t.key for t in report.layers}) > 0
    assert cache_file.read_text() == "{not json"  # untouched
    assert not accel._traces  # retraced with the new crossovers on the next call
    with torch.no_grad():
        torch.testing.assert_close(accel(x), ref)


def test_tune_refuses_bad_arguments(cache_file):
    model, x = make_model("tiny_cnn", 1, 8, 2)
    accel = accelerate(model)
    with pytest.raises(ValueError, match=r"tune: argument 'x' must be a batch \(N, C, H, W\) with N >= 1, "
                                         r"got \(1, 8, 8\)"):
        tune(accel, x[0])
    with pytest.raises(ValueError, match=r"tune: argument 'batches' must hold positive batch sizes, got \[0\]"):
        tune(accel, x, batches=[0])
    with pytest.raises(ValueError, match=r"measure_crossover: layer .* reads 1 channel\(s\); the mask gate needs "
                                         r"at least 2"):
        layer = [m for _, m in accel_layers(accel) if m.gate is not None][0]
        tuning.measure_crossover(layer, tuning._Shape(2, 1, 8, 8, torch.float32, False, False, layer))
