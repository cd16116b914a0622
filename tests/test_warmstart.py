"""Gate warm start: targets, what it touches and what it leaves alone, that it learns."""

import json

import pytest
import torch

from pydecouple.data import load_dataset
from pydecouple.losses import DecouplingLoss
from pydecouple.models import build
from pydecouple.nn.gate import gate_modules
from pydecouple.train import train
from pydecouple.warmstart import saliency_targets, warm_start_gates


@pytest.fixture(scope="module")
def digits():
    xtr, ytr, _ = load_dataset("digits", "train")
    xte, yte, _ = load_dataset("digits", "test")
    return (xtr[:512], ytr[:512]), (xte[:100], yte[:100])


@pytest.fixture
def trained_dense_tiny(digits):
    torch.manual_seed(0)
    model = build("tiny_cnn", in_channels=1)
    train(model, *digits, epochs=2, batch_size=64, lr=0.1, progress=False)
    return model


def test_saliency_targets_pick_the_largest_per_row():
    g = torch.Generator().manual_seed(torch.initial_seed() % 2**31)
    pooled = torch.randn(7, 13, generator=g)
    for keep in (0.01, 0.3, 0.5, 1.0):
        t = saliency_targets(pooled, keep)
        k = min(13, max(1, round(keep * 13)))
        assert t.shape == pooled.shape and t.dtype == pooled.dtype
        assert torch.equal(t.sum(1), torch.full((7,), float(k)))
        # every kept value is >= every dropped value in its row
        for r in range(7):
            on, off = pooled[r][t[r] == 1], pooled[r][t[r] == 0]
            if len(off):
                assert on.min() >= off.max()
    with pytest.raises(ValueError, match="keep must be in"):
        saliency_targets(pooled, 0.0)


def test_warm_start_fits_gates_and_leaves_backbone_alone(trained_dense_tiny, digits):
    from pydecouple.nn import decouple

    model = decouple(trained_dense_tiny, logit_norm=True, bias_init=2.0).train()
    gates = [g for _, g in gate_modules(model)]
    gate_ids = {id(p) for g in gates for p in g.parameters()}
    backbone = {k: v.clone() for k, v in model.state_dict().items() if ".gate." not in k}
    before = {k: v.clone() for k, v in model.state_dict().items() if ".gate." in k}
    hist = warm_start_gates(model, digits[0][0], keep=0.5, steps=150, batch_size=64, lr=2e-2, seed=1)
    # backbone weights and BN statistics untouched; gate parameters moved
    after = model.state_dict()
    for k, v in backbone.items():
        assert torch.equal(after[k], v), k
    assert any(not torch.equal(after[k], v) for k, v in before.items())
    # state restored
    assert model.training
    assert all(not g.force_open and not g.record_pooled and g.last_pooled is None for g in gates)
    assert all(p.requires_grad for p in model.parameters())
    # it learned: the loss fell, and the hard gates agree with the saliency targets on held-out images
    assert hist[-1]["bce"] < hist[0]["bce"]
    model.eval()
    for g in gates:
        g.force_open, g.record_pooled = True, True
    with torch.no_grad():
        model(digits[1][0])
    agree = []
    for g in gates:
        t = saliency_targets(g.last_pooled, 0.5)
        agree.append(float(((g.last_logits > 0).float() == t).float().mean()))
        g.force_open, g.record_pooled = False, False
    assert min(agree) > 0.7, agree  # chance agreement at keep 0.5 is 0.5
    assert gate_ids  # the model has gates


def test_warm_start_errors(trained_dense_tiny, digits):
    with pytest.raises(ValueError, match="no gate modules"):
        warm_start_gates(trained_dense_tiny, digits[0][0], keep=0.5, steps=1)
    from pydecouple.nn import decouple

    model = decouple(trained_dense_tiny)
    with pytest.raises(ValueError, match="keep must be in"):
        warm_start_gates(model, digits[0][0], keep=1.5, steps=1)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        warm_start_gates(model, digits[0][0], keep=0.5, steps=0)
    with pytest.raises(ValueError, match="images must be"):
        warm_start_gates(model, digits[0][0][0], keep=0.5, steps=1)


def test_train_runs_warm_start_once_and_logs_it(trained_dense_tiny, digits, tmp_path):
    from pydecouple.nn import decouple

    model = decouple(trained_dense_tiny, logit_norm=True, bias_init=2.0).train()
    loss = DecouplingLoss(model, 10, lam_m=1.0, lam_s=0.5, rho=0.6)
    train(model, *digits, epochs=2, batch_size=64, lr=0.01, loss=loss, gate_lr_mult=10, progress=False,
          max_steps_per_epoch=2, gate_warm_start_steps=5, out_dir=str(tmp_path), stop_after_epochs=1)
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [0, 1]
    assert recs[0]["gate_warm_start"]["step"] == 5 and "test_acc" in recs[0] and "flops_ratio" in recs[0]
    # a resumed run does not warm-start again
    train(model, *digits, epochs=2, batch_size=64, lr=0.01, loss=loss, gate_lr_mult=10, progress=False,
          max_steps_per_epoch=2, gate_warm_start_steps=5, out_dir=str(tmp_path), resume=True)
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [0, 1, 2]


def test_gate_noise_anneal_reaches_final_value_and_is_restored(trained_dense_tiny, digits, monkeypatch):
    from pydecouple.nn import decouple
    from pydecouple.nn import gate as gate_mod

    model = decouple(trained_dense_tiny, logit_norm=True, bias_init=2.0, noise_std=1.0).train()
    seen = []
    real = gate_mod.semhash

    def spy(logits, noise_std=1.0, hard_fraction=0.5):
        seen.append(noise_std)
        return real(logits, noise_std, hard_fraction)

    monkeypatch.setattr(gate_mod, "semhash", spy)
    loss = DecouplingLoss(model, 10, lam_m=1.0, lam_s=0.5, rho=0.6)
    train(model, *digits, epochs=2, batch_size=64, lr=0.01, loss=loss, progress=False, max_steps_per_epoch=3,
          gate_noise_final=0.2)
    n_gates = len(gate_modules(model))
    per_step = [seen[i] for i in range(0, len(seen), n_gates)]
    assert len(per_step) == 6
    assert per_step[0] == pytest.approx(1.0) and per_step[-1] == pytest.approx(0.2)
    assert all(a > b for a, b in zip(per_step, per_step[1:]))
    assert all(g.noise_std == 1.0 for _, g in gate_modules(model))


def test_train_rejects_bad_warm_start_and_noise_arguments(trained_dense_tiny, digits):
    from pydecouple.nn import decouple

    model = decouple(trained_dense_tiny)
    loss = DecouplingLoss(model, 10, rho=0.5)
    with pytest.raises(ValueError, match=r"gate_warm_start_steps must be >= 0 .* got -3"):
        train(model, *digits, loss=loss, progress=False, gate_warm_start_steps=-3)
    with pytest.raises(ValueError, match=r"gate_noise_final must be >= 0 .* got -0.5"):
        train(model, *digits, loss=loss, progress=False, gate_noise_final=-0.5)
