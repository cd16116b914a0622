"""Two gloo processes on CPU train a decoupled model for a few steps: both ranks
end with identical weights (model, gates and MI classifiers)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, out):
    torch.set_num_threads(1)
    # A file store, not a TCP store: with TCP, rank 0's process hosts the store server, so
    # rank 0 exiting first can pull it from under rank 1's teardown, and a free port picked
    # before the bind can be taken by another process. A CI run once saw rank 1 abort
    # ("terminate called without an active exception") at teardown; both races are gone here.
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(out, 'store')}", rank=rank, world_size=world)
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
