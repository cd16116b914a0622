"""`python -m pydecouple analyze` and `detect`: end to end on a tiny checkpoint, and their failures."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from pydecouple.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A decoupled tiny CNN trained briefly on the digits, and a dense one (no gates)."""
    models = pytest.importorskip("pydecouple.models", reason="pydecouple.models (issue 4) is not built yet")
    ckpt = pytest.importorskip("pydecouple.checkpoint", reason="pydecouple.checkpoint (issue 4) is not built yet")
    from pydecouple.data import load_dataset
    from pydecouple.nn import gate_modules

    x, y, _ = load_dataset("digits", "train")
    torch.manual_seed(0)
    net = models.build("tiny_cnn", num_classes=10, decoupled=True, in_channels=1)
    gates = [g for _, g in gate_modules(net)]
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    g = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(120):
        idx = torch.randint(0, len(y), (64,), generator=g)
        loss = F.cross_entropy(net(x[idx]), y[idx]) + 0.05 * sum(gt.last_gate.mean() for gt in gates)
        opt.zero_grad()
        loss.backward()
        opt.step()
    d = tmp_path_factory.mktemp("ckpt")
    meta = {"arch": "tiny_cnn", "num_classes": 10, "in_channels": 1, "decoupled": True, "dataset": "digits"}
    dec = ckpt.save(d / "tiny_decoupled.pt", net.eval(), meta)
    dense = ckpt.save(d / "tiny_dense.pt", models.build("tiny_cnn", num_classes=10, in_channels=1),
                      {**meta, "decoupled": False})
    foreign = d / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    return {"decoupled": str(dec), "dense": str(dense), "foreign": str(foreign)}


def _read(path, mode="r"):
    with open(path, mode) as f:
        return f.read()


def _pngs_ok(out, names):
    for n in names:
        data = _read(os.path.join(out, n), "rb")
        assert data[:8] == PNG_MAGIC and len(data) < 300_000, n


def test_analyze_command(checkpoints, tmp_path):
    out = str(tmp_path / "analysis")
    rc = main(["analyze", "--checkpoint", checkpoints["decoupled"], "--data", "digits", "--out", out,
               "--limit", "150", "--ref-limit", "300", "--no-progress", "--layer", "-1"])
    assert rc == 0
    _pngs_ok(out, ["template_similarity.png", "sample_template_similarity.png", "filter_frequency.png",
                   "kept_fraction.png", "separability.png", "path_pca.png"])
    rep = json.loads(_read(os.path.join(out, "report.json")))
    assert rep["n_eval"] == 150 and rep["n_ref"] == 300
    assert rep["run"]["checkpoint"] == os.path.abspath(checkpoints["decoupled"]) and rep["run"]["arch"] == "tiny_cnn"
    assert rep["class_names"] == [str(i) for i in range(10)]
    assert 0.5 < rep["network_accuracy"] <= 1
    assert rep["filter_plot_layer"] == rep["layers"][-1]["name"]
    md = _read(os.path.join(out, "report.md"))
    assert md.count("![") == len(rep["figures"]) == 6


def test_detect_command(checkpoints, tmp_path):
    out = str(tmp_path / "detection")
    rc = main(["detect", "--checkpoint", checkpoints["decoupled"], "--data", "digits", "--out", out,
               "--limit", "120", "--ref-limit", "200", "--eps", "25/255", "--pgd-steps", "2", "--C", "0.1",
               "--no-progress"])
    assert rc == 0
    _pngs_ok(out, ["roc_fgsm.png", "roc_pgd.png", "unsupervised_scores.png"])
    rep = json.loads(_read(os.path.join(out, "report.json")))
    assert rep["eps_str"] == "25/255" and rep["pgd"]["iters"] == 2
    assert set(rep["headline"]) == {"fgsm", "pgd"}
    assert "(roc_pgd.png)" in _read(os.path.join(out, "report.md"))


@pytest.mark.parametrize("which,extra", [
    ("missing", []),
    ("foreign", []),
    ("dense", []),
    ("decoupled", ["--data", "/nonexistent/cifar.npz"]),
    ("decoupled", ["--layer", "no_such_layer"]),
])
def test_analyze_bad_input_exits_2(checkpoints, tmp_path, which, extra, caplog):
    path = checkpoints.get(which, str(tmp_path / "missing.pt"))
    args = ["analyze", "--checkpoint", path, "--data", "digits", "--out", str(tmp_path / "o"), "--limit", "50",
            "--ref-limit", "50", "--no-progress"] + extra
    assert main(args) == 2
    assert caplog.records and caplog.records[-1].levelname == "ERROR"


def test_detect_bad_arguments(checkpoints, tmp_path):
    base = ["detect", "--checkpoint", checkpoints["decoupled"], "--data", "digits", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        main(base + ["--eps", "two"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main(base + ["--eps", "3"])  # pixel units: eps must lie in [0, 1]
    assert main(base + ["--attacks", "fgsm,cw"]) == 2
    assert main(["detect", "--checkpoint", checkpoints["dense"], "--data", "digits", "--out", str(tmp_path),
                 "--limit", "40", "--ref-limit", "40", "--no-progress"]) == 2


def test_eps_parsing():
    from pydecouple.commands.detect import parse_eps

    assert parse_eps("8/255") == pytest.approx(8 / 255)
    assert parse_eps("0.03") == pytest.approx(0.03)


def test_help(capsys):
    for cmd, flag in (("analyze", "--margin"), ("detect", "--eps")):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "--checkpoint" in out and flag in out
