"""Data loading: digits, the CIFAR .npz and batches folder, clear errors."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from pydecouple.data import DataError, augment, channel_stats, load_dataset

CIFAR = Path(os.environ.get("PYDECOUPLE_CIFAR", Path(__file__).resolve().parents[2] / "shared/data/cifar10/cifar10-subset.npz"))


def test_digits_split_deterministic():
    xtr, ytr, classes = load_dataset("digits", "train")
    xte, yte, _ = load_dataset("digits", "test")
    assert xtr.shape[1:] == (1, 8, 8) and xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert len(xtr) + len(yte) == 1797 and 0 <= xtr.min() and xtr.max() <= 1
    assert classes == [str(i) for i in range(10)]
    assert torch.equal(load_dataset("digits", "test")[0], xte)
    assert (torch.bincount(yte) > 30).all()


def test_npz_roundtrip(tmp_path):
    p = tmp_path / "c.npz"
    x = np.random.randint(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    np.savez(p, x_train=x, y_train=np.arange(6, dtype=np.uint8), x_test=x[:2], y_test=np.zeros(2, np.uint8),
             classes=np.array(list("abcdefghij")))
    xt, yt, cl = load_dataset(str(p), "train")
    assert xt.shape == (6, 3, 32, 32) and abs(float(xt[1, 2, 3, 4]) - x[1, 3, 4, 2] / 255.0) < 1e-6
    assert yt.tolist() == list(range(6)) and cl == list("abcdefghij")


def test_cifar_folder(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(d / name, "wb") as f:
            pickle.dump({b"data": np.random.randint(0, 256, (2, 3072), dtype=np.uint8), b"labels": [1, 2]}, f)
    x, y, cl = load_dataset(str(d), "train")
    assert x.shape == (10, 3, 32, 32) and y.tolist() == [1, 2] * 5 and cl[0] == "airplane"
    (d / "test_batch").unlink()
    with pytest.raises(DataError, match="test_batch"):
        load_dataset(str(d), "test")


def test_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="nope.npz: no such file"):
        load_dataset(str(tmp_path / "nope.npz"))
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="bad.npz"):
        load_dataset(str(bad))
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, a=np.zeros(3))
    with pytest.raises(DataError, match=r"wrong.npz: expected arrays"):
        load_dataset(str(wrong))
    txt = tmp_path / "x.txt"
    txt.write_text("hi")
    with pytest.raises(DataError, match="expected a .npz"):
        load_dataset(str(txt))
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", "val")


@pytest.mark.skipif(not CIFAR.is_file(), reason=f"the CIFAR-10 subset is absent ({CIFAR})")
def test_cifar_subset():
    x, y, cl = load_dataset(str(CIFAR), "test")
    assert x.shape == (10000, 3, 32, 32) and len(cl) == 10 and (torch.bincount(y) == 1000).all()


def test_augment_and_stats():
    x = torch.rand(5, 3, 8, 8)
    a = augment(x, pad=2)
    assert a.shape == x.shape
    assert torch.equal(augment(x, pad=0, flip=False), x)
    m, s = channel_stats(x)
    assert len(m) == 3 and all(v > 0 for v in s)
