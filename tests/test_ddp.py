"""Two gloo processes on CPU train a decoupled model for a few steps: both ranks
end with identical weights (model, gates and MI classifiers); and the train command
runs unchanged under torchrun, logging and checkpointing from rank 0 only."""

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, out):
    torch.set_num_threads(1)
    # A file store, not a TCP store: with TCP, rank 0's process hosts the store server (and
    # may leave first), and a free port picked before the bind can be taken by another process.
    # (The teardown abort a CI run once saw here was elsewhere: see the end of train().)
    # The timeout: a rank that fails leaves the other waiting in a collective; fail, don't hang.
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out, 'store')}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    ok = False
    try:
        from pydecouple.data import load_dataset
        from pydecouple.losses import DecouplingLoss
        from pydecouple.models import build
        from pydecouple.train import train

        torch.manual_seed(100 + rank)  # different init per rank: DDP must broadcast rank 0's
        x, y, _ = load_dataset("digits", "train")
        model = build("tiny_cnn", in_channels=1, decoupled=True)
        loss = DecouplingLoss(model, 10, lam_m=1.0, lam_s=1e-3, rho=0.5)
        train(model, (x[:256], y[:256]), (x[:64], y[:64]), epochs=1, batch_size=32, lr=0.05, loss=loss,
              gate_lr_mult=10, progress=False, max_steps_per_epoch=3, device="cpu")
        sd = {f"model.{k}": v for k, v in model.state_dict().items()}
        sd.update({f"loss.{k}": v for k, v in loss.state_dict().items()})
        torch.save(sd, os.path.join(out, f"rank{rank}.pt"))
        ok = True
    finally:
        if ok:
            dist.barrier()  # no rank tears down while the other may still be talking to it
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is unavailable")
def test_two_gloo_ranks_end_identical(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    torch.manual_seed(100)
    from pydecouple.models import build

    ref = build("tiny_cnn", in_channels=1, decoupled=True).state_dict()
    assert not torch.equal(ref["features.3.weight"], a["model.features.3.weight"]), "no training happened"


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is unavailable")
def test_train_command_under_torchrun(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "pydecouple", "train", "--data", "digits", "--decouple", "--epochs", "2",
           "--max-steps-per-epoch", "3", "--threads", "1", "--no-progress", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    # A rank that aborts at teardown fails here even when training finished: the exit code counts.
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2], "one line per epoch: only rank 0 logs"
    assert (out / "last.pt").is_file()
    # stdout: rank 0 prints the last epoch's record once; rank 1 prints nothing.
    printed = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and json.loads(printed[0])["epoch"] == 2, proc.stdout[-2000:]
