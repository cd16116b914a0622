"""`make demo`'s code path (python -m pydecouple demo --quick): every step runs and the report holds every figure."""

import json
import math

import pytest

from pydecouple.cli import main as cli_main

KEYS = ("accuracy_dense", "accuracy_decoupled", "flops_ratio", "gates_never_changing", "speedup_batch1",
        "speedup_batched", "kernel_speedup_f05", "path_template_accuracy", "detection_auc_fgsm",
        "detection_auc_pgd", "detection_auc_fgsm_unsupervised", "detection_auc_pgd_unsupervised", "seconds_total")


@pytest.mark.slow
def test_quick_demo_writes_a_complete_report(tmp_path):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--quick", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    for k in KEYS:
        assert k in report, k
        assert report[k] is None or math.isfinite(report[k]), (k, report[k])
    assert 0 < report["accuracy_dense"] <= 1 and 0 < report["flops_ratio"] <= 1
    assert report["speedup_batch1"] > 0 and report["kernel_speedup_f05"] > 0
    md = (out / "report.md").read_text()
    for png in ("analysis/template_similarity.png", "detection/roc_fgsm.png"):
        assert (out / png).stat().st_size > 1000, png
        assert png.split("/")[-1] in md or png.split("/")[0] in md


@pytest.mark.slow
def test_demo_figures_are_deterministic(tmp_path):
    """Same seed, same thread count: the quick demo's accuracy, FLOPs, gate, template and
    AUC figures are identical run to run (the timed steps are left out: only they may differ)."""
    from pydecouple.demo import DETERMINISTIC_KEYS, run

    a = run(quick=True, out=str(tmp_path / "a"), timing=False, threads=1)
    b = run(quick=True, out=str(tmp_path / "b"), timing=False, threads=1)
    assert {k: a[k] for k in DETERMINISTIC_KEYS} == {k: b[k] for k in DETERMINISTIC_KEYS}
    assert a["detection_auc_error"] == b["detection_auc_error"]
    assert json.loads((tmp_path / "a" / "report.json").read_text())["threads"] == 1


def test_auc_interval_matches_the_spread_of_resampled_aucs():
    """The Hanley-McNeil standard error against an independent measurement: the spread of
    the AUC over 2000 fresh samples of the same two score distributions (binormal, AUC ~0.76)
    with the demo's kind of counts (30 positives, 160 negatives)."""
    import numpy as np
    from scipy.stats import rankdata

    from pydecouple.demo import auc_interval

    rng = np.random.default_rng(0)
    n_pos, n_neg = 30, 160

    def auc(pos, neg):  # Mann-Whitney
        r = rankdata(np.r_[pos, neg])[:len(pos)]
        return (r.sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))

    aucs = [auc(rng.normal(1.0, 1, n_pos), rng.normal(0, 1, n_neg)) for _ in range(2000)]
    e = auc_interval(float(np.mean(aucs)), n_pos, n_neg)
    assert abs(e["se"] / np.std(aucs) - 1) < 0.15, (e["se"], np.std(aucs))
    assert e["ci95"][0] < e["auc"] < e["ci95"][1] and abs(e["ci95"][1] - e["ci95"][0] - 2 * 1.96 * e["se"]) < 1e-9
    assert auc_interval(float("nan"), 10, 10)["se"] is None and auc_interval(0.7, 0, 10)["ci95"] is None
    assert auc_interval(0.99, 5, 5)["ci95"][1] == 1.0  # clipped
