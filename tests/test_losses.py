"""L_MI, L_KL, L_S and DecouplingLoss."""

import math

import pytest
import torch
import torch.nn as nn

from pydecouple.losses import METHOD_DEFAULTS, DecouplingLoss, kl_loss, mi_loss, sparsity_loss
from pydecouple.models import build
from pydecouple.nn import gate_modules


def test_mi_loss_chance_with_zero_classifiers():
    gates = [torch.rand(8, 5), torch.rand(8, 7)]
    cls = [nn.Linear(5, 10, bias=False), nn.Linear(7, 10, bias=False)]
    for c in cls:
        nn.init.zeros_(c.weight)
    y = torch.randint(0, 10, (8,))
    assert mi_loss(gates, y, cls).item() == pytest.approx(2 * math.log(10), rel=1e-5)
    with pytest.raises(ValueError):
        mi_loss(gates, y, cls[:1])


def test_kl_loss_directions():
    o, m = torch.randn(4, 6), torch.rand(4, 6)
    assert kl_loss([o], [o]).item() == pytest.approx(0.0, abs=1e-6)
    a, b = kl_loss([o], [m], "output_gate"), kl_loss([o], [m], "gate_output")
    p, q = o.softmax(1), m.softmax(1)
    assert a.item() == pytest.approx((p * (p.log() - q.log())).sum(1).mean().item(), rel=1e-4)
    assert b.item() == pytest.approx((q * (q.log() - p.log())).sum(1).mean().item(), rel=1e-4)
    with pytest.raises(ValueError):
        kl_loss([o], [m], "sideways")


def test_sparsity_loss_rho():
    m = torch.ones(4, 10)
    assert sparsity_loss([m]).item() == pytest.approx(10.0)
    assert sparsity_loss([m], rho=0.6).item() == pytest.approx(4.0)
    assert sparsity_loss([m * 0.6], rho=0.6).item() == pytest.approx(0.0, abs=1e-5)
    assert sparsity_loss([m], rho=0.6, normalize=True).item() == pytest.approx(0.4)


def test_decoupling_loss_terms_and_gradients():
    model = build("tiny_cnn", in_channels=1, decoupled=True).train()
    loss = DecouplingLoss(model, 10)
    assert (loss.lam_k, loss.lam_m, loss.lam_s, loss.rho) == tuple(METHOD_DEFAULTS[k] for k in ("lam_k", "lam_m", "lam_s", "rho"))
    assert loss.mi_chance == pytest.approx(2 * math.log(10))
    x, y = torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,))
    total, terms = loss(model(x), y)
    assert set(terms) == {"ce", "kl", "mi", "sparsity", "total"}
    assert all(not t.requires_grad for t in terms.values())
    expect = terms["ce"] + loss.lam_k * terms["kl"] + loss.lam_m * terms["mi"] + loss.lam_s * terms["sparsity"]
    assert total.item() == pytest.approx(expect.item(), rel=1e-5)
    total.backward()
    assert all(c.weight.grad is not None for c in loss.classifiers)
    assert all(g.fc1.weight.grad is not None for _, g in gate_modules(model))
    assert "classifiers.0.weight" in loss.state_dict() and not any("gate" in k for k in loss.state_dict())


def test_decoupling_loss_needs_gates():
    with pytest.raises(ValueError, match="decouple"):
        DecouplingLoss(build("tiny_cnn", in_channels=1), 10)


def test_mi_init_zero_starts_at_chance():
    model = build("tiny_cnn", in_channels=1, decoupled=True).train()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    _, terms = DecouplingLoss(model, 10)(model(x), y)
    assert terms["mi"].item() == pytest.approx(2 * math.log(10), rel=1e-5)
    loss = DecouplingLoss(model, 10, mi_init="default")
    assert any(c.weight.abs().sum() > 0 for c in loss.classifiers)
    with pytest.raises(ValueError):
        DecouplingLoss(model, 10, mi_init="ones")
