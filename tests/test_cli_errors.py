"""Every command-line misuse ends in one line naming the argument, what was
expected and what was given, with a non-zero exit code and no traceback
(issue 16, case 8; the cases after the issue's list were found the same way).

The commands run in this process (fast); three run as `python -m pydecouple`
to check what a user really sees on stderr.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pydecouple.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Untrained tiny-CNN checkpoints (dense and decoupled, 1 channel), a 3-channel
    .npz, a .npz whose labels go past its class list, a file to put folders under,
    and run folders whose last.pt is truncated or belongs to another model."""
    from pydecouple import checkpoint as ckpt
    from pydecouple.models import build

    d = tmp_path_factory.mktemp("cli")
    meta = {"arch": "tiny_cnn", "num_classes": 10, "in_channels": 1, "decoupled": False, "dataset": "digits"}
    torch.manual_seed(0)
    dense = ckpt.save(d / "dense.pt", build("tiny_cnn", num_classes=10, in_channels=1), meta)
    dec = ckpt.save(d / "dec.pt", build("tiny_cnn", num_classes=10, decoupled=True, in_channels=1),
                    {**meta, "decoupled": True})
    rng = np.random.default_rng(0)
    img = lambda n, c: rng.integers(0, 256, (n, 8, 8, c), dtype=np.uint8)
    np.savez(d / "rgb.npz", x_train=img(40, 3), y_train=np.arange(40) % 10, x_test=img(20, 3), y_test=np.arange(20) % 10)
    np.savez(d / "labels.npz", x_train=img(40, 1), y_train=np.arange(40) % 13, x_test=img(20, 1),
             y_test=np.arange(20) % 10, classes=np.array([str(i) for i in range(10)]))
    (d / "a_file").write_text("not a folder")
    (d / "truncated").mkdir()
    (d / "truncated" / "last.pt").write_bytes(Path(dense).read_bytes()[:5000])
    (d / "other_model").mkdir()
    ckpt.save(d / "other_model" / "last.pt", build("tiny_cnn", num_classes=10, in_channels=1), meta,
              {"epoch": 0, "optimizer": {}, "scheduler": {}})
    return {"dir": d, "dense": str(dense), "dec": str(dec), "rgb": str(d / "rgb.npz"),
            "labels": str(d / "labels.npz"), "file": str(d / "a_file"), "truncated": str(d / "truncated"),
            "other_model": str(d / "other_model")}


def _fill(argv, files, tmp_path):
    return [a.format(**files, tmp=tmp_path) for a in argv]


def _run(argv, capsys, caplog):
    """Exit code and what the user is shown: stderr, and the ERROR records (the
    analyze/detect commands log their one line; under pytest, logging goes to caplog)."""
    caplog.set_level(logging.INFO)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    return code, "\n".join([err.strip()] * bool(err.strip()) + logged)


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks --device cuda on a machine without CUDA")

A = ["analyze", "--checkpoint", "{dec}", "--out", "{tmp}/o", "--no-progress", "--limit", "20", "--ref-limit", "20"]
D = ["detect", "--checkpoint", "{dec}", "--out", "{tmp}/o", "--no-progress", "--ref-limit", "20"]
T = ["train", "--out", "{tmp}/run", "--no-progress", "--epochs", "1", "--max-steps-per-epoch", "1", "--test-subset", "20"]

# (argv, the argument the line must name, a piece of what was given)
CASES = {
    # the list
    "analyze_ckpt_data_channels": (A + ["--data", "{rgb}"], "--data", "3-channel"),
    "train_init_data_channels": (T + ["--init", "{dense}", "--data", "{rgb}"], "--data", "3-channel"),
    "train_device_cuda": pytest.param(T + ["--device", "cuda"], "--device", "'cuda'", marks=NO_CUDA),
    "analyze_device_cuda": pytest.param(A + ["--device", "cuda"], "--device", "'cuda'", marks=NO_CUDA),
    "train_resume_truncated": (T + ["--resume", "--out", "{truncated}"], "--resume", "last.pt"),
    "train_batch_size_0": (T + ["--batch-size", "0"], "--batch-size", "'0'"),
    "train_lr_negative": (T + ["--lr", "-1"], "--lr", "'-1'"),
    "train_out_under_file": (T + ["--out", "{file}/run"], "--out", "a_file/run"),
    "analyze_out_under_file": (A + ["--out", "{file}/o"], "--out", "a_file/o"),
    "analyze_layer_99": (A + ["--layer", "99"], "--layer", "'99'"),
    "train_epochs_0": (T + ["--epochs", "0"], "--epochs", "'0'"),
    "train_rho_1.5": (T + ["--decouple", "--rho", "1.5"], "--rho", "'1.5'"),
    "analyze_limit_negative": (A + ["--limit", "-5"], "--limit", "'-5'"),
    "detect_limit_1": (D + ["--limit", "1"], "--limit", "1"),
    # found beyond the list, in the same commands
    "train_arch_too_deep_for_images": (T + ["--arch", "vgg16"], "--data", "(1, 8, 8)"),
    "train_device_meta": (T + ["--device", "meta"], "--device", "'meta'"),
    "train_device_unknown": (T + ["--device", "gpu"], "--device", "'gpu'"),
    "train_threads_negative": (T + ["--threads", "-1"], "--threads", "'-1'"),
    "train_warmup_negative": (T + ["--lr-warmup-steps", "-3"], "--lr-warmup-steps", "'-3'"),
    "train_momentum_above_1": (T + ["--momentum", "1.5"], "--momentum", "'1.5'"),
    "train_weight_decay_negative": (T + ["--weight-decay", "-1"], "--weight-decay", "'-1'"),
    "train_lr_nan": (T + ["--lr", "nan"], "--lr", "'nan'"),
    "train_test_subset_negative": (T + ["--test-subset", "-5"], "--test-subset", "'-5'"),
    "train_train_subset_0": (T + ["--train-subset", "0"], "--train-subset", "'0'"),
    "train_max_steps_0": (T + ["--max-steps-per-epoch", "0"], "--max-steps-per-epoch", "'0'"),
    "train_stop_after_0": (T + ["--stop-after-epochs", "0"], "--stop-after-epochs", "'0'"),
    "train_warm_start_negative": (T + ["--decouple", "--gate-warm-start", "-1"], "--gate-warm-start", "'-1'"),
    "train_noise_final_negative": (T + ["--decouple", "--gate-noise-final", "-1"], "--gate-noise-final", "'-1'"),
    "train_milestones_without_step": (T + ["--milestones", "3"], "--milestones", "[3]"),
    "train_milestones_past_epochs": (T + ["--schedule", "step", "--milestones", "30"], "--milestones", "[30]"),
    "train_rho_on_dense_model": (T + ["--rho", "0.5"], "--rho", "0.5"),
    "train_gate_arg_on_decoupled_init": (T + ["--init", "{dec}", "--gate-bias-init", "5"], "--gate-bias-init", "dec.pt"),
    "train_arch_with_other_init": (T + ["--init", "{dense}", "--arch", "resnet20"], "--arch", "'resnet20'"),
    "train_warm_start_keep_alone": (T + ["--decouple", "--gate-warm-start-keep", "0.5"], "--gate-warm-start-keep", "0.5"),
    "train_resume_other_model": (T + ["--decouple", "--resume", "--out", "{other_model}"], "--resume", "last.pt"),
    "train_labels_past_classes": (T + ["--data", "{labels}"], "--data", "labels from 0 to 12"),
    "analyze_dense_checkpoint": (A + ["--checkpoint", "{dense}"], "--checkpoint", "dense.pt"),
    "analyze_batch_size_0": (A + ["--batch-size", "0"], "--batch-size", "'0'"),
    "analyze_margin_above_1": (A + ["--margin", "2"], "--margin", "'2'"),
    "analyze_seed_negative": (A + ["--seed", "-1"], "--seed", "'-1'"),
    "analyze_threads_negative": (A + ["--threads", "-1"], "--threads", "'-1'"),
    "analyze_device_unknown": (A + ["--device", "gpu"], "--device", "'gpu'"),
    "detect_limit_below_two_per_class": (D + ["--limit", "10"], "--limit", "10"),
    "detect_C_negative": (D + ["--C", "-1"], "--C", "'-1'"),
    "detect_eps_0": (D + ["--eps", "0"], "--eps", "'0'"),
    "detect_pgd_steps_0": (D + ["--pgd-steps", "0"], "--pgd-steps", "'0'"),
    "detect_save_paths_under_file": (D + ["--limit", "20", "--save-paths", "{file}/p"], "--save-paths", "a_file/p"),
    "demo_out_under_file": (["demo", "--quick", "--out", "{file}/demo"], "--out", "a_file/demo"),
}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("argv,arg,given", list(CASES.values()), ids=list(CASES))
def test_misuse_is_one_line_naming_the_argument(files, tmp_path, capsys, caplog, argv, arg, given):
    code, shown = _run(_fill(argv, files, tmp_path), capsys, caplog)
    assert code not in (0, None), f"exit code {code}; shown: {shown!r}"
    lines = [l for l in shown.splitlines() if l.strip()]
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{shown}"
    assert f"argument {arg}" in lines[0] and "expected" in lines[0] and given in lines[0], lines[0]
    assert "Traceback" not in shown and "unexpected" not in lines[0], lines[0]


@pytest.mark.parametrize("argv", [
    ["train", "--out", "{tmp}/run", "--batch-size", "0"],
    ["analyze", "--checkpoint", "{dec}", "--data", "{rgb}", "--out", "{tmp}/o", "--no-progress"],
    ["train", "--resume", "--out", "{truncated}", "--epochs", "1", "--no-progress"],
], ids=["parse_time", "analyze_after_loading", "train_resume"])
def test_user_sees_one_stderr_line(files, tmp_path, argv):
    """What `python -m pydecouple` prints: the checks above, outside pytest's log capture."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "pydecouple", *_fill(argv, files, tmp_path)], capture_output=True,
                       text=True, env=env, timeout=300, cwd=tmp_path)
    assert p.returncode in (2, 3), p.stderr
    assert p.stdout == "" and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert p.stderr.startswith(f"pydecouple {argv[0]}: argument --"), p.stderr


def test_unexpected_error_is_one_line_with_a_way_to_the_traceback(monkeypatch, capsys):
    """The last resort: a bug still reaches the user as one line, exit code 1."""
    import pydecouple.commands.train as cmd

    def boom(args):
        raise RuntimeError("an internal failure\nwith a second line")

    monkeypatch.setattr(cmd, "run", boom)
    assert main(["train"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "RuntimeError: an internal failure" in err[0] and "PYDECOUPLE_TRACEBACK=1" in err[0]
    monkeypatch.setenv("PYDECOUPLE_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="an internal failure"):
        main(["train"])


def test_epoch_metrics_printed_once(tmp_path):
    """Each epoch's record appears once: a short progress line on stderr, the full
    record in metrics.jsonl, the last one as the result on stdout (it used to be
    logged whole on stderr too, so the last epoch showed twice)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "pydecouple", "train", "--data", "digits", "--epochs", "2",
                        "--max-steps-per-epoch", "1", "--test-subset", "20", "--no-progress", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert p.stdout.strip() == json.dumps(records[-1])
    for r in records:
        assert (p.stdout + p.stderr).count(f'"seconds": {json.dumps(r["seconds"])}, "train_acc"') <= 1
    assert (p.stdout + p.stderr).count(json.dumps(records[-1])) == 1, p.stderr
    assert [l.split(" pydecouple.train ")[1].split(":")[0] for l in p.stderr.splitlines()
            if " pydecouple.train " in l] == ["epoch 1/2", "epoch 2/2"], p.stderr


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(epochs=0), r"train: epochs must be an int >= 1, got 0"),
    (dict(batch_size=0), r"train: batch_size must be an int >= 1, got 0"),
    (dict(lr=-1.0), r"train: lr must be a finite number > 0, got -1.0"),
    (dict(lr=float("nan")), r"train: lr must be a finite number > 0, got nan"),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_train_function_checks_its_arguments(kwargs, pattern):
    """train(), the function the command wraps: epochs=0 returned [] silently,
    batch_size=0 divided by zero."""
    from pydecouple.models import build
    from pydecouple.train import train

    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 2
    with pytest.raises(ValueError, match=pattern):
        train(build("tiny_cnn", num_classes=2, in_channels=1), (x, y), **{"epochs": 1, "progress": False, **kwargs})


def test_train_function_resume_from_another_models_checkpoint(files):
    from pydecouple.checkpoint import CheckpointError
    from pydecouple.models import build
    from pydecouple.train import train

    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 2
    with pytest.raises(CheckpointError, match=r"last.pt: cannot resume from it: it is not this run's training state"):
        train(build("tiny_cnn", num_classes=2, decoupled=True, in_channels=1), (x, y), epochs=1, progress=False,
              out_dir=files["other_model"], resume=True)
