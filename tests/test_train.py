"""Training: a few steps on tiny data, checkpoints, resume, the command, safety."""

import json
from pathlib import Path

import pytest
import torch

from pydecouple import checkpoint as ckpt
from pydecouple.data import load_dataset
from pydecouple.losses import DecouplingLoss
from pydecouple.models import build
from pydecouple.train import evaluate, gate_statistics, train

ROOT = Path(__file__).resolve().parents[1]
META = {"arch": "tiny_cnn", "num_classes": 10, "in_channels": 1, "decoupled": True, "dataset": "digits"}


@pytest.fixture(scope="module")
def digits():
    xtr, ytr, _ = load_dataset("digits", "train")
    xte, yte, _ = load_dataset("digits", "test")
    return (xtr[:256], ytr[:256]), (xte[:100], yte[:100])


def test_dense_then_decoupled_train(digits, tmp_path):
    torch.manual_seed(0)
    model = build("tiny_cnn", in_channels=1)
    h = train(model, *digits, epochs=2, batch_size=64, lr=0.1, progress=False, out_dir=str(tmp_path / "d"),
              meta=dict(META, decoupled=False))
    assert len(h) == 2 and 0 <= h[-1]["test_acc"] <= 1 and "train_ce" in h[-1]
    lines = (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2]
    dense, meta = ckpt.load_model(tmp_path / "d" / "last.pt")
    assert meta["arch"] == "tiny_cnn" and not meta["decoupled"]
    from pydecouple.nn import decouple

    dec = decouple(dense).train()
    loss = DecouplingLoss(dec, 10, lam_m=1.0, lam_s=1e-2, rho=0.5)
    h = train(dec, *digits, epochs=1, batch_size=64, lr=0.01, loss=loss, gate_lr_mult=10, progress=False,
              max_steps_per_epoch=3)
    r = h[-1]
    for k in ("train_mi", "train_kl", "train_sparsity", "kept", "flops_ratio", "constant_gates", "mi", "mi_chance"):
        assert k in r, k
    assert len(r["kept"]) == 2
    st = gate_statistics(dec, *digits[0], *digits[1], loss=loss, max_fit=200)
    assert len(st["predictability"]) == 2 and 0 <= st["constant_gates"] <= 1


def test_resume_repeats_uninterrupted_run(digits, tmp_path):
    def run(out, stop, resume=False):
        torch.manual_seed(1)
        m = build("tiny_cnn", in_channels=1, decoupled=True)
        loss = DecouplingLoss(m, 10, lam_m=0.5)
        train(m, *digits, epochs=2, stop_after_epochs=stop, batch_size=64, lr=0.05, loss=loss, progress=False, seed=3,
              out_dir=str(out), meta=META, resume=resume, max_steps_per_epoch=2)
        return m

    full = run(tmp_path / "a", None)
    run(tmp_path / "b", 1)
    resumed = run(tmp_path / "b", 2, resume=True)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 2


def test_checkpoint_roundtrip_and_errors(tmp_path):
    m = build("tiny_cnn", in_channels=1, decoupled=True).eval()
    p = ckpt.save(tmp_path / "m.pt", m, META)
    m2, meta = ckpt.load_model(p)
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(m(x), m2(x))
    assert meta == META and not list(tmp_path.glob("*.tmp"))
    data = p.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="trunc.pt"):
        ckpt.load_model(tmp_path / "trunc.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(ckpt.CheckpointError, match="foreign.pt: not a pydecouple checkpoint"):
        ckpt.load_model(tmp_path / "foreign.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ckpt.CheckpointError, match="text.pt"):
        ckpt.load(tmp_path / "text.pt")
    with pytest.raises(ckpt.CheckpointError, match="missing.pt: no such"):
        ckpt.load(tmp_path / "missing.pt")
    ckpt.save(tmp_path / "wrong.pt", build("tiny_cnn", in_channels=1), META)  # dense weights, decoupled meta
    with pytest.raises(ckpt.CheckpointError, match="do not fit"):
        ckpt.load_model(tmp_path / "wrong.pt")


def test_evaluate_dense_model(digits):
    r = evaluate(build("tiny_cnn", in_channels=1), *digits[1])
    assert set(r) == {"acc", "ce"}


def _cli(*args):
    from pydecouple.cli import main

    return main(["train", *args])


def test_command_dense_decouple_resume(tmp_path, capsys):
    out = tmp_path / "dense"
    assert _cli("--data", "digits", "--epochs", "1", "--max-steps-per-epoch", "2", "--out", str(out), "--no-progress",
                "--test-subset", "50") == 0
    assert _cli("--data", "digits", "--init", str(out / "last.pt"), "--decouple", "--epochs", "2",
                "--max-steps-per-epoch", "2", "--out", str(tmp_path / "dec"), "--no-progress", "--lam-m", "1",
                "--rho", "0.5", "--test-subset", "50", "--stop-after-epochs", "1") == 0
    assert _cli("--data", "digits", "--init", str(out / "last.pt"), "--decouple", "--epochs", "2",
                "--max-steps-per-epoch", "2", "--out", str(tmp_path / "dec"), "--no-progress", "--lam-m", "1",
                "--rho", "0.5", "--test-subset", "50", "--resume") == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["epoch"] == 2 and "flops_ratio" in last
    lines = (tmp_path / "dec" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["epoch"] for l in lines] == [1, 2]
    m, meta = ckpt.load_model(tmp_path / "dec" / "last.pt")
    assert meta["decoupled"] and meta["init"].endswith("last.pt")
    assert _cli("--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "x")) == 3
    assert "missing.npz" in capsys.readouterr().err
    assert _cli("--data", "digits", "--init", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x")) == 3
    assert _cli("--data", "digits", "--arch", "alexnet", "--out", str(tmp_path / "x")) == 2
