"""Two gloo processes on CPU train a decoupled model for a few steps: both ranks
end with identical weights (model, gates and MI classifiers)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
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
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is unavailable")
def test_two_gloo_ranks_end_identical(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    torch.manual_seed(100)
    from pydecouple.models import build

    ref = build("tiny_cnn", in_channels=1, decoupled=True).state_dict()
    assert not torch.equal(ref["features.3.weight"], a["model.features.3.weight"]), "no training happened"
