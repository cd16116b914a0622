"""accelerate(..., executor="trace"): traced graphs per input signature, the
same function as the eager modules, and eager wherever a trace would be wrong
(probes, grad, autocast, an outer capture)."""

import pytest
import torch

from pydecouple.accelerate import accel_layers, accelerate, profile
from pydecouple.accelerate.modules import AccelEntry
from test_accelerate import assert_logits_match, make_model


@pytest.mark.parametrize("arch", ["small_vgg", "resnet20"])
def test_traced_executor_matches_the_decoupled_model_for_new_masks_and_shapes(arch):
    torch.manual_seed(1234)
    model, _ = make_model(arch, 3, 32, 4)
    accel = accelerate(model, executor="trace")
    assert isinstance(accel, AccelEntry) and accel.executor == "trace"
    with torch.no_grad():
        for batch in (3, 5, 3):  # different masks on every call; batch 3 twice: its trace is reused
            x = torch.rand(batch, 3, 32, 32)
            assert_logits_match(accel(x), model(x))
        assert len(accel._traces) == 2
        # the gates change after the trace (the trace shares the parameters): it must follow
        for _, lay in accel_layers(accel):
            if lay.gate is not None:
                lay.gate.b2.sub_(torch.rand_like(lay.gate.b2))
        x = torch.rand(3, 3, 32, 32)
        assert_logits_match(accel(x), accel.inner(x))


def test_traced_executor_bfloat16_channels_last_equals_its_eager_twin():
    torch.manual_seed(99)
    model, x = make_model("resnet20", 3, 16, 6)
    traced = accelerate(model, dtype=torch.bfloat16, channels_last=True, executor="trace")
    eager = accelerate(model, dtype=torch.bfloat16, channels_last=True)
    with torch.no_grad():
        out, ref = traced(x), eager(x)
    assert len(traced._traces) == 1 and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_traced_executor_runs_eager_when_a_trace_would_be_wrong():
    torch.manual_seed(5)
    model, x = make_model("small_vgg", 3, 32, 2)
    accel = accelerate(model, executor="trace")
    rows = profile(accel, x).layers  # probes are Python: the eager modules must run (timed layers)
    assert rows and all(lay.conv_s > 0 for lay in rows)
    accel._traces.clear()  # (profile's warm-up calls run without probes, hence traced)
    out = accel(x)  # grad enabled: eager (a trace records no autograd graph of ours)
    assert accel._traces == {}
    with torch.no_grad():
        assert_logits_match(out, model(x))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        accel(x)
    assert accel._traces == {}
    with torch.no_grad():
        accel(x)
    assert len(accel._traces) == 1
    accel.float()  # .to()/.float(): traced graphs hold the old tensors, so they are dropped
    assert accel._traces == {}


def test_executor_argument_is_checked_before_conversion():
    model, _ = make_model("small_vgg", 3, 32, 1)
    with pytest.raises(ValueError, match="argument 'executor' must be one of .*got 'jit'"):
        accelerate(model, executor="jit")


def test_dtype_argument_is_named_when_wrong():
    model, _ = make_model("small_vgg", 3, 32, 1)
    with pytest.raises(ValueError, match=r"accelerate: argument 'dtype' must be torch.float32, torch.bfloat16 or "
                                         r"torch.float16, got torch.int32"):
        accelerate(model, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_keeps_its_gates_float32_values(dtype):
    # The gates decide in float32: their weights must be the float32 model's,
    # not values rounded through `dtype` and widened back (which flipped 3-5%
    # of the gates of trained digits models).
    torch.manual_seed(7)
    model, _ = make_model("small_vgg", 3, 16, 2)
    ref = dict(accel_layers(accelerate(model)))
    low = accelerate(model, dtype=dtype, channels_last=True)
    gated = 0
    for name, lay in accel_layers(low):
        assert lay.weight.dtype == dtype
        if lay.gate is None:
            continue
        gated += 1
        for p in ("w1", "b1", "w2", "b2"):
            got, want = getattr(lay.gate, p), getattr(ref[name.removeprefix("inner.")].gate, p)
            assert got.dtype == torch.float32 and torch.equal(got, want), (name, p)
    assert gated > 0
