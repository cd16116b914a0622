"""The method's report scripts (benchmarks/method/): the figures in docs/method.md are drawn by them."""

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CURVES = ROOT / "benchmarks" / "method" / "curves_plot.py"


def _write_run(folder: Path, accs):
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"epoch": 0, "test_acc": accs[0], "flops_ratio": 0.44, "mi": 11.5}) + "\n")
        for e, acc in enumerate(accs[1:], 1):
            f.write(json.dumps({"epoch": e, "lr": 0.01 / e, "test_acc": acc, "flops_ratio": 0.46,
                                "constant_gates": 0.0, "mi": 9.0, "train_acc": acc + 0.05}) + "\n")


def _write_dense_run(folder: Path, accs):
    """A dense run's records: no epoch 0, no gate figures."""
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for e, acc in enumerate(accs, 1):
            f.write(json.dumps({"epoch": e, "lr": 0.03, "test_acc": acc, "train_acc": acc}) + "\n")


def _run(*args):
    return subprocess.run([sys.executable, str(CURVES), *map(str, args)], capture_output=True, text=True)


def test_curves_plot_copies_every_epoch_and_redraws_from_csv(tmp_path):
    _write_run(tmp_path / "run_a", [0.28, 0.52, 0.61])
    _write_run(tmp_path / "run_b", [0.30, 0.55])
    _write_dense_run(tmp_path / "dense", [0.70, 0.74])
    out_csv, png = tmp_path / "curves.csv", tmp_path / "curves.png"
    proc = _run(tmp_path / "run_a", tmp_path / "run_b", tmp_path / "dense", "--csv", out_csv, "--png", png,
                "--dense-acc", 0.765)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(open(out_csv)))
    assert [(r["run"], r["epoch"], float(r["test_acc"])) for r in rows] == [
        ("run_a", "0", 0.28), ("run_a", "1", 0.52), ("run_a", "2", 0.61), ("run_b", "0", 0.30), ("run_b", "1", 0.55),
        ("dense", "1", 0.70), ("dense", "2", 0.74)]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png.unlink()
    proc = _run("--from-csv", "--csv", out_csv, "--png", png)
    assert proc.returncode == 0, proc.stderr
    assert png.is_file()


def test_curves_plot_names_a_folder_without_metrics(tmp_path):
    proc = _run(tmp_path / "missing", "--csv", tmp_path / "c.csv", "--png", tmp_path / "c.png")
    assert proc.returncode != 0
    assert "missing/metrics.jsonl: no such file" in proc.stderr
    proc = _run("--csv", tmp_path / "c.csv", "--png", tmp_path / "c.png")
    assert proc.returncode != 0
    assert "runs: give at least one run folder" in proc.stderr
