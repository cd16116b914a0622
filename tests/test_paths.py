"""pydecouple.paths: containers, templates, similarities, constant gates, layer-wise separability."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pydecouple import paths as P

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def planted_paths(n_per_class=40, k=4, sizes=(6, 10), noise=0.05, informative=(False, True), seed=0,
                  constant_on=0, constant_off=0):
    """Synthetic paths: in informative layers class c switches on its own block of filters."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(k), n_per_class)
    masks = []
    for size, info in zip(sizes, informative):
        m = rng.random((len(labels), size)) < 0.5
        if info:
            block = size // k
            m[:] = False
            for c in range(k):
                m[labels == c, c * block:(c + 1) * block] = True
            m ^= rng.random(m.shape) < noise
        masks.append(m)
    if constant_on or constant_off:
        masks.append(np.concatenate([np.ones((len(labels), constant_on), bool),
                                     np.zeros((len(labels), constant_off), bool)], 1))
    layers = [f"l{i}" for i in range(len(masks))]
    return P.Paths(layers, masks, labels, labels.copy())


# --------------------------------------------------------------------------- container


def test_paths_container_roundtrip(tmp_path):
    p = planted_paths()
    assert p.n == 160 and p.sizes == [6, 10] and p.num_gates == 16
    assert p.offsets.tolist() == [0, 6, 16]
    flat = p.flat()
    assert flat.shape == (160, 16) and flat.dtype == bool
    np.testing.assert_array_equal(flat[:, 6:], p.masks[1])  # layer boundaries kept
    np.testing.assert_array_equal(p.flat([1]), p.masks[1])
    sub = p.subset(np.arange(0, 160, 2))
    assert sub.n == 80 and (sub.labels == p.labels[::2]).all()
    f = tmp_path / "p.npz"
    p.save(str(f))
    q = P.Paths.load(str(f))
    assert q.layers == p.layers
    for a, b in zip(p.masks, q.masks):
        np.testing.assert_array_equal(a, b)


def test_paths_validates_shapes():
    with pytest.raises(ValueError, match="N="):
        P.Paths(["a", "b"], [np.zeros((3, 2)), np.zeros((4, 2))], np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="at least one"):
        P.Paths([], [], np.zeros(0), np.zeros(0))
    q = P.Paths.from_masks({"x": torch.ones(2, 3), "y": torch.zeros(2, 1)}, labels=[0, 1])
    assert q.layers == ["x", "y"] and (q.preds == -1).all()


# --------------------------------------------------------------------------- templates


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(2, 30), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_templates_are_class_means(k, n, d, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    masks = [rng.random((n, d)) < 0.4, rng.random((n, 3)) < 0.6]
    p = P.Paths(["a", "b"], masks, labels, labels)
    t, counts = P.class_templates(p, k)
    flat = p.flat().astype(float)
    for c in range(k):
        assert counts[c] == (labels == c).sum()
        if counts[c]:
            np.testing.assert_allclose(t[c], flat[labels == c].mean(0))
        else:
            assert np.isnan(t[c]).all()
    assert np.nanmin(t) >= 0 and np.nanmax(t) <= 1


def test_templates_by_prediction():
    p = planted_paths()
    p.preds = (p.labels + 1) % 4
    t_lab, _ = P.class_templates(p, 4, by="label")
    t_pred, _ = P.class_templates(p, 4, by="pred")
    np.testing.assert_allclose(t_pred[1], t_lab[0])
    with pytest.raises(ValueError):
        P.class_templates(p, 4, by="nope")


# --------------------------------------------------------------------------- similarities


binary_rows = st.integers(0, 2**31 - 1).map(lambda s: np.random.default_rng(s).random((5, 12)) < 0.4)


@settings(max_examples=30, deadline=None)
@given(binary_rows, binary_rows, st.sampled_from(P.METRICS))
def test_similarity_properties(a, b, metric):
    s_ab = P.similarity(a, b, metric)
    s_ba = P.similarity(b, a, metric)
    np.testing.assert_allclose(s_ab, s_ba.T, atol=1e-12)  # symmetric
    assert (s_ab >= -1e-12).all() and (s_ab <= 1 + 1e-12).all()  # bounded
    np.testing.assert_allclose(np.diag(P.similarity(a, a, metric)), 1.0)  # identical rows -> 1
    # binary Jaccard is the set Jaccard index; Hamming the fraction of agreeing gates
    i, j = 0, 1
    if metric == "jaccard":
        union = (a[i] | b[j]).sum()
        expect = (a[i] & b[j]).sum() / union if union else 1.0
        assert s_ab[i, j] == pytest.approx(expect)
    if metric == "hamming":
        assert s_ab[i, j] == pytest.approx((a[i] == b[j]).mean())


@settings(max_examples=20, deadline=None)
@given(binary_rows, st.integers(0, 2**31 - 1))
def test_weighted_jaccard_for_templates(a, seed):
    t = np.random.default_rng(seed).random((3, 12))
    s = P.similarity(a, t, "jaccard")
    expect = np.minimum(a[:, None, :], t[None]).sum(-1) / np.maximum(a[:, None, :], t[None]).sum(-1)
    np.testing.assert_allclose(s, expect, atol=1e-12)
    # template-to-template (both fractional) takes the general branch
    np.testing.assert_allclose(P.similarity(t, t, "jaccard").diagonal(), 1.0)


def test_jaccard_and_cosine_ignore_shared_off_gates_hamming_does_not():
    a = np.array([[1, 1, 0, 0]], bool)
    b = np.array([[1, 0, 1, 0]], bool)
    pad = lambda x: np.concatenate([x, np.zeros((1, 50), bool)], 1)
    for m in ("jaccard", "cosine"):
        assert P.similarity(a, b, m)[0, 0] == pytest.approx(P.similarity(pad(a), pad(b), m)[0, 0])
    assert P.similarity(pad(a), pad(b), "hamming")[0, 0] > P.similarity(a, b, "hamming")[0, 0]


def test_similarity_edge_cases():
    z = np.zeros((1, 4), bool)
    o = np.ones((1, 4), bool)
    assert P.similarity(z, z, "jaccard")[0, 0] == 1.0  # two empty paths are identical
    assert P.similarity(z, o, "jaccard")[0, 0] == 0.0
    assert P.similarity(z, o, "cosine")[0, 0] == 0.0
    assert P.similarity(z, z, "cosine")[0, 0] == 1.0
    keep = np.array([True, True, False, False])
    assert P.similarity(np.array([[1, 0, 1, 1]]), np.array([[1, 0, 0, 0]]), "jaccard", keep)[0, 0] == 1.0
    with pytest.raises(ValueError, match="unknown metric"):
        P.similarity(z, z, "euclid")
    with pytest.raises(ValueError, match="lengths"):
        P.similarity(z, np.zeros((1, 3)), "jaccard")


# --------------------------------------------------------------------------- constant gates


def test_constant_gates_reported_and_excluded():
    p = planted_paths(constant_on=30, constant_off=5)
    c = P.constant_gates(p)
    assert c["per_layer"][2] == {"layer": "l2", "gates": 35, "always_off": 5, "always_on": 30, "varying": 0}
    assert c["keep"].sum() == 16 and not c["keep"][16:].any()
    assert c["fraction_constant"] == pytest.approx(35 / 51)
    # 30 always-on gates inflate the Jaccard similarity between different classes' templates...
    t, _ = P.class_templates(p, 4)
    raw = P.template_similarity_matrix(t, "jaccard")
    clean = P.template_similarity_matrix(t, "jaccard", c["keep"])
    assert raw[0, 1] > clean[0, 1] + 0.3
    # ...and excluding them gives exactly the analysis without them
    base = planted_paths()
    t_base, _ = P.class_templates(base, 4)
    np.testing.assert_allclose(clean, P.template_similarity_matrix(t_base, "jaccard", P.constant_gates(base)["keep"]))
    sep = P.layerwise_template_accuracy(p, p, 4, "jaccard")
    assert np.isnan(sep["single"][2])  # a layer without varying gates predicts nothing
    assert sep["full"] == P.layerwise_template_accuracy(base, base, 4, "jaccard")["full"]


# --------------------------------------------------------------------------- class structure


def test_layerwise_accuracy_shows_where_paths_become_class_specific():
    ref = planted_paths(seed=1)
    test = planted_paths(seed=2)
    for metric in P.METRICS:
        sep = P.layerwise_template_accuracy(ref, test, 4, metric)
        assert sep["cumulative"][0] < 0.5 and sep["single"][0] < 0.5  # layer 0 is noise
        assert sep["single"][1] > 0.95 and sep["full"] > 0.95
        assert sep["ratio"] == pytest.approx(sep["full"] / 1.0)
        assert sep["chance"] == 0.25


def test_nearest_template_and_own_class_similarity():
    ref, test = planted_paths(seed=3), planted_paths(seed=4)
    t, _ = P.class_templates(ref, 4)
    assert (P.nearest_template(test, t) == test.labels).mean() > 0.95
    st_ = P.sample_template_similarity(test, t)
    assert (st_.argmax(0) == np.arange(4)).all() and (st_.argmax(1) == np.arange(4)).all()


def test_class_specific_filters_margin():
    t = np.array([[0.9, 0.5, 0.1], [0.1, 0.4, 0.1], [0.2, 0.45, 0.7]])
    f = P.class_specific_filters(t, [1, 2], margin=0.3, class_names=["a", "b", "c"])
    got = {(d["layer_index"], d["channel"], d["class_name"]) for d in f}
    assert got == {(0, 0, "a"), (1, 1, "c")}
    assert f[0]["gap"] == pytest.approx(0.7) and f[0]["runner_up_freq"] == pytest.approx(0.2)
    assert P.class_specific_filters(t, [1, 2], margin=0.8) == []
    assert len(P.class_specific_filters(t, [1, 2], margin=0.0)) == 3


def test_top_pairs_and_kept_fraction():
    m = np.array([[1, 0.2, 0.9], [0.2, 1, 0.5], [0.9, 0.5, 1]])
    pairs = P.top_similar_pairs(m, ["cat", "car", "dog"], top=2)
    assert [(p["a"], p["b"]) for p in pairs] == [("cat", "dog"), ("car", "dog")]
    p = planted_paths()
    kf = P.kept_fraction_per_class(p, 4)
    assert kf.shape == (4, 2)
    np.testing.assert_allclose(kf[2, 1], p.masks[1][p.labels == 2].mean())


def test_balanced_subset():
    labels = np.r_[np.zeros(100), np.ones(5), np.full(50, 2)].astype(int)
    idx = P.balanced_subset(labels, 30)
    assert len(idx) == 30 and len(set(idx)) == 30
    assert np.bincount(labels[idx]).tolist() == [13, 5, 12] or sorted(np.bincount(labels[idx])) == [5, 12, 13]
    assert len(P.balanced_subset(labels, None)) == len(labels)


# --------------------------------------------------------------------------- extraction from a model


class FakeGate(nn.Module):
    """Stand-in for ArchitectureControl: exposes last_logits / last_mask after each forward."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.fc = nn.Linear(cin, cout)
        self.last_mask = None
        self.last_logits = None

    def forward(self, x):
        y = self.fc(x.mean((2, 3)))
        self.last_logits, self.last_mask = y, (y > 0).detach()
        return torch.sigmoid(y) if self.training else (y > 0).float()


class FakeNet(nn.Module):
    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.g1 = FakeGate(4, 6)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1)
        self.g2 = FakeGate(6, 5)
        self.c3 = nn.Conv2d(6, 5, 3, padding=1)
        self.fc = nn.Linear(5, k)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        h = torch.relu(self.c2(h)) * self.g1(h)[:, :, None, None]
        h = torch.relu(self.c3(h)) * self.g2(h)[:, :, None, None]
        return self.fc(h.mean((2, 3)))


def test_extract_paths_from_a_model():
    torch.manual_seed(0)
    net = FakeNet().train()
    x = torch.rand(23, 1, 6, 6)
    y = torch.randint(0, 3, (23,))
    p = P.extract_paths(net, x, y, batch_size=5, progress=False)
    assert net.training  # mode restored
    assert p.layers == ["g1", "g2"] and p.sizes == [6, 5] and p.n == 23
    net.eval()
    with torch.no_grad():
        out = net(x)
        ref1 = net.g1.fc(torch.relu(net.c1(x)).mean((2, 3))) > 0
    np.testing.assert_array_equal(p.preds, out.argmax(1).numpy())
    np.testing.assert_array_equal(p.masks[0], ref1.numpy())
    np.testing.assert_allclose(p.probs.sum(1), 1, rtol=1e-5)
    assert p.logits is not None and p.logits[1].shape == (23, 5)
    np.testing.assert_array_equal(p.logits[0] > 0, p.masks[0])


def test_extract_paths_needs_gates():
    with pytest.raises(ValueError, match="no gate modules"):
        P.extract_paths(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), torch.rand(2, 1, 2, 2), progress=False)


def test_extract_paths_real_decoupled_model():
    models = pytest.importorskip("pydecouple.models", reason="pydecouple.models (issue 4) is not built yet")
    torch.manual_seed(0)
    net = models.build("tiny_cnn", num_classes=10, decoupled=True, in_channels=1)
    from pydecouple.nn import gate_modules

    x = torch.rand(9, 1, 8, 8)
    p = P.extract_paths(net, x, torch.zeros(9, dtype=torch.long), batch_size=4, progress=False)
    gm = gate_modules(net)
    assert p.layers == [n for n, _ in gm] and p.sizes == [g.out_channels for _, g in gm]


# --------------------------------------------------------------------------- the analysis and its pictures


def test_analyze_writes_pictures_and_report(tmp_path):
    ref, test = planted_paths(seed=5, constant_on=3), planted_paths(seed=6, constant_on=3)
    names = ["airplane", "automobile", "bird", "cat"]
    rep = P.analyze(None, None, None, names, str(tmp_path), paths=test, ref_paths=ref, margin=0.5)
    pngs = ["template_similarity.png", "sample_template_similarity.png", "filter_frequency.png",
            "kept_fraction.png", "separability.png", "path_pca.png"]
    for f in pngs:
        data = (tmp_path / f).read_bytes()
        assert data[:8] == PNG_MAGIC and 5_000 < len(data) < 300_000, f
    js = json.loads((tmp_path / "report.json").read_text())
    assert js["template_accuracy"] > 0.95 and js["all_classes_own_template_most_similar"]
    assert js["constant_gates"]["per_layer"][2]["always_on"] == 3
    assert js["class_specific_filters"]["count"] >= 8
    md = (tmp_path / "report.md").read_text()
    for f in pngs:
        assert f"({f})" in md
    assert len(js["figures"]) == len(pngs)
    assert rep["template_accuracy"] == js["template_accuracy"]


def test_analyze_splits_a_single_set(tmp_path):
    torch.manual_seed(0)
    net = FakeNet(k=3)
    x = torch.rand(60, 1, 6, 6)
    y = torch.arange(60) % 3
    rep = P.analyze(net, x, y, ["a", "b", "c"], str(tmp_path), progress=False, plots=False)
    assert rep["n_ref"] == 30 and rep["n_eval"] == 30
    assert rep["template_counts"] == [10, 10, 10]  # class-balanced halves
    assert not os.path.exists(tmp_path / "report.md")  # plots=False: numbers only
