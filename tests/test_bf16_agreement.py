"""benchmarks/bf16_agreement.py: runs on a small decoupled checkpoint, writes its
table, counts gate flips between the float32 and bfloat16 accelerated models,
and refuses a missing checkpoint by name."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bf16_agreement  # noqa: E402

from pydecouple import checkpoint as ckpt  # noqa: E402
from pydecouple import models  # noqa: E402
from pydecouple.accelerate import accelerate  # noqa: E402


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    net = models.build("tiny_cnn", num_classes=10, decoupled=True, in_channels=1).eval()
    meta = {"arch": "tiny_cnn", "num_classes": 10, "in_channels": 1, "decoupled": True, "dataset": "digits"}
    return str(ckpt.save(tmp_path_factory.mktemp("ckpt") / "tiny.pt", net, meta)), net


def test_gate_masks_one_per_gated_layer_and_equal_for_the_same_model(tiny_checkpoint):
    _, net = tiny_checkpoint
    x = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    accel = accelerate(net)
    a, b = bf16_agreement.gate_masks(accel, x), bf16_agreement.gate_masks(accel, x)
    gated = [m for m in accel.modules() if getattr(m, "gate", None) is not None]
    assert len(a) == len(gated) > 0
    assert all(m.shape == (5, g.out_channels) for m, g in zip(a, gated))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_script_writes_its_table(tiny_checkpoint, tmp_path):
    path, _ = tiny_checkpoint
    assert bf16_agreement.main([path, "--name", "t", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "t.md").read_text()
    assert "bf16 agreement median" in text and path in text
    row = bf16_agreement.measure(path)
    assert 0 <= row["bf16_differ"] <= row["images"] == 364
    assert 0.0 <= row["gate_flips"] <= 1.0
    assert row["bf16_agreement"] == pytest.approx(1 - row["bf16_differ"] / row["images"])


def test_missing_checkpoint_is_named(tmp_path, capsys):
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(SystemExit) as e:
        bf16_agreement.main([missing])
    assert e.value.code == 2
    assert f"argument checkpoints: no such file: {missing}" in capsys.readouterr().err
