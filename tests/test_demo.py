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
