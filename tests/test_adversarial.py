"""pydecouple.adversarial: FGSM/PGD defining properties, detection metrics and detectors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pydecouple import adversarial as A
from pydecouple.paths import Paths

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32)[:, None]
    return x, torch.tensor(d.target, dtype=torch.long)


@pytest.fixture(scope="module")
def trained(digits):
    """The zoo's decoupled tiny CNN, trained for a few hundred steps on 1,200 digits (~2 s)."""
    models = pytest.importorskip("pydecouple.models", reason="pydecouple.models (issue 4) is not built yet")
    from pydecouple.nn import gate_modules

    x, y = digits
    torch.manual_seed(0)
    net = models.build("tiny_cnn", num_classes=10, decoupled=True, in_channels=1)
    gates = [g for _, g in gate_modules(net)]
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(150):
        idx = torch.randint(0, 1200, (64,), generator=g)
        loss = F.cross_entropy(net(x[idx]), y[idx])
        loss = loss + 0.05 * sum(gt.last_gate.mean() for gt in gates)  # a little sparsity: gates that vary
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return net.eval()


def _acc(net, x, y):
    with torch.no_grad():
        return float((net(x).argmax(1) == y).float().mean())


# --------------------------------------------------------------------------- attacks


@settings(max_examples=10, deadline=None)
@given(st.sampled_from([0.0, 1 / 255, 8 / 255, 0.1, 0.3]), st.sampled_from(["fgsm", "pgd"]), st.integers(0, 1000))
def test_perturbation_within_eps_and_clipped(trained_small, eps, method, seed):
    net, x, y = trained_small
    adv = A.attack(net, x, y, method, eps, batch_size=16, progress=False, seed=seed, iters=3)
    assert adv.shape == x.shape and adv.dtype == torch.float32
    assert float((adv - x).abs().max()) <= eps + 1e-6
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    if eps == 0:
        torch.testing.assert_close(adv, x)


@pytest.fixture(scope="module")
def trained_small(trained, digits):
    x, y = digits
    # include pixels at 0 and 1 so the clipping is exercised
    return trained, x[1200:1240], y[1200:1240]


def test_attacks_leave_the_model_in_its_mode_and_its_weights_unchanged(trained_small):
    net, x, y = trained_small
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    A.attack(net, x, y, "pgd", 0.1, progress=False, iters=2)
    assert net.training
    net.eval()
    for k, v in net.state_dict().items():
        if v.dtype.is_floating_point:
            torch.testing.assert_close(v, before[k])
    assert all(p.grad is None for p in net.parameters())  # gradients are taken w.r.t. the input only


def test_pgd_lowers_accuracy_at_least_as_much_as_fgsm(trained, digits):
    x, y = digits
    xt, yt = x[1200:1500], y[1200:1500]
    clean = _acc(trained, xt, yt)
    assert clean > 0.85
    for eps in (0.1,):
        a_fgsm = _acc(trained, A.attack(trained, xt, yt, "fgsm", eps, batch_size=256, progress=False), yt)
        a_pgd = _acc(trained, A.attack(trained, xt, yt, "pgd", eps, batch_size=256, progress=False, iters=10), yt)
        assert a_fgsm < clean
        assert a_pgd <= a_fgsm + 0.005, (eps, clean, a_fgsm, a_pgd)


def test_pgd_random_start_and_step():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    x = torch.rand(8, 1, 2, 2)
    y = torch.randint(0, 2, (8,))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    a = A.pgd(net, x, y, 0.1, step=0.0, iters=1, random_start=True, generator=g1)
    b = A.pgd(net, x, y, 0.1, step=0.0, iters=1, random_start=True, generator=g2)
    assert not torch.equal(a, b) and float((a - x).abs().max()) <= 0.1 + 1e-7
    c = A.pgd(net, x, y, 0.1, step=0.0, iters=1, random_start=False)
    torch.testing.assert_close(c, x)
    # one step from the clean image with step = eps is FGSM
    torch.testing.assert_close(A.pgd(net, x, y, 0.1, step=0.1, iters=1, random_start=False), A.fgsm(net, x, y, 0.1))
    with pytest.raises(ValueError):
        A.fgsm(net, x, y, -0.1)
    with pytest.raises(ValueError):
        A.attack(net, x, y, "cw", 0.1)


def test_fgsm_increases_the_loss():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    x = torch.rand(32, 1, 4, 4) * 0.5 + 0.25
    y = torch.randint(0, 3, (32,))
    adv = A.fgsm(net, x, y, 0.05)
    assert F.cross_entropy(net(adv), y) > F.cross_entropy(net(x), y)


# --------------------------------------------------------------------------- metrics and detectors


def test_detection_metrics():
    rng = np.random.default_rng(0)
    clean = rng.normal(0, 1, 500)
    m = A.detection_metrics(clean, clean + 100)
    assert m["auc"] == 1.0 and m["tpr_at_5fpr"] == 1.0
    m = A.detection_metrics(clean, rng.normal(0, 1, 500))
    assert abs(m["auc"] - 0.5) < 0.06 and m["tpr_at_5fpr"] < 0.15
    m = A.detection_metrics(clean, clean - 100)
    assert m["auc"] == 0.0
    assert np.isnan(A.detection_metrics(clean, [])["auc"])


def _synthetic(n=200, k=4, d=24, seed=0, adversarial=False):
    """Clean: class c uses block c. Adversarial: predicted as c, but the path is another class's."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    src = (labels + rng.integers(1, k, n)) % k if adversarial else labels
    m = np.zeros((n, d), bool)
    b = d // k
    for i, c in enumerate(src):
        m[i, c * b:(c + 1) * b] = True
    m ^= rng.random(m.shape) < 0.03
    preds = labels  # the network is fooled into predicting `labels`
    return Paths(["l0", "l1"], [m[:, : d // 2], m[:, d // 2:]], labels, preds)


def test_unsupervised_detector_separable_case():
    ref = _synthetic(seed=1)
    det = A.TemplateDetector().fit(ref, 4)
    m = A.detection_metrics(det.score(_synthetic(seed=2)), det.score(_synthetic(seed=3, adversarial=True)))
    assert m["auc"] > 0.99 and m["tpr_at_5fpr"] > 0.95


@pytest.mark.parametrize("features", ["path", "logits"])
def test_learned_detector_separable_case(features):
    def with_logits(p, seed):
        rng = np.random.default_rng(seed)
        p.logits = [np.where(mk, 1.0, -1.0) + 0.1 * rng.normal(size=mk.shape) for mk in p.masks]
        return p

    ref = _synthetic(seed=1)
    det = A.LearnedDetector(features=features).set_templates(ref, 4)
    det.fit(with_logits(_synthetic(seed=4), 4), with_logits(_synthetic(seed=5, adversarial=True), 5))
    m = A.detection_metrics(det.score(with_logits(_synthetic(seed=6), 6)),
                            det.score(with_logits(_synthetic(seed=7, adversarial=True), 7)))
    assert m["auc"] > 0.99


def test_regularisation_chosen_on_training_data_only():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 5))
    y = (x[:, 0] + 0.3 * rng.normal(size=120) > 0).astype(float)
    assert A._choose_C(x, y, 0) in A.AUTO_CS
    det = A.LearnedDetector(C="auto").set_templates(_synthetic(seed=1), 4)
    det.fit(_synthetic(seed=4), _synthetic(seed=5, adversarial=True))
    assert det.chosen_C in A.AUTO_CS


def test_bernoulli_loglik():
    t = np.array([[0.9, 0.1], [0.5, 0.5]])
    ll = A.bernoulli_loglik(np.array([[1, 0]], bool), t)
    np.testing.assert_allclose(ll, [[np.log(0.9), np.log(0.5)]])
    assert np.isfinite(A.bernoulli_loglik(np.array([[1, 1]]), np.array([[0.0, 1.0]]))).all()  # clipped


def test_path_features_shape():
    p = _synthetic()
    from pydecouple.paths import class_templates

    t, _ = class_templates(p, 4)
    f = A.path_features(p, t, None)
    assert f.shape == (p.n, 24 + 8 * 2)


# --------------------------------------------------------------------------- the experiment


def test_detect_end_to_end(trained, digits, tmp_path):
    x, y = digits
    rep = A.detect(trained, x[1200:1400], y[1200:1400], str(tmp_path), eps=0.1, pgd_iters=3, C=0.1,
                   ref_images=x[:400], ref_labels=y[:400], progress=False)
    for a in ("fgsm", "pgd"):
        assert 0 < rep["attacks"][a]["success_rate"] <= 1
        h = rep["headline"][a]
        assert 0 <= h["unsupervised_auc"] <= 1 and 0 <= h["max_softmax_auc"] <= 1
        assert "fgsm" in rep["detectors"]["learned"]["trained_on_pgd"]  # cross-attack evaluation
        data = (tmp_path / f"roc_{a}.png").read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) < 300_000
    assert (tmp_path / "unsupervised_scores.png").read_bytes()[:8] == PNG_MAGIC
    js = json.loads((tmp_path / "report.json").read_text())
    assert js["eps_str"] == "0.1" and js["n_fit"] + js["n_test"] == 200
    md = (tmp_path / "report.md").read_text()
    assert "(roc_fgsm.png)" in md and "(roc_pgd.png)" in md
