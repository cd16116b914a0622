"""Data sets as in-memory tensors: float images (N, C, H, W) in [0, 1], int64 labels.

Specs accepted by :func:`load_dataset`:

* ``"digits"``: scikit-learn's 8x8 handwritten digits (1,797 images, shipped with
  scikit-learn, no download), 1 channel, a fixed stratified 80/20 train/test split.
* a path to a CIFAR-10 ``.npz`` with ``x_train, y_train, x_test, y_test``
  (uint8 NHWC images) and optionally ``classes`` (the shared subset's format).
* a ``cifar-10-batches-py`` folder (the standard Python pickles).

Environment variable ``PYDECOUPLE_CIFAR`` may name the ``.npz`` or folder; the
spec ``"cifar10"`` then resolves to it.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch

__all__ = ["load_dataset", "channel_stats", "augment", "CIFAR10_CLASSES", "DataError"]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class DataError(ValueError):
    """A data file is missing or not what was expected (the message names it)."""


def _digits(split: str) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    # Deterministic stratified split: every 5th image of each class goes to test.
    test = torch.zeros(len(y), dtype=torch.bool)
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        test[idx[::5]] = True
    sel = test if split == "test" else ~test
    return x[sel].contiguous(), y[sel].contiguous(), [str(i) for i in range(10)]


def _from_nhwc(x: np.ndarray, path: Path, key: str) -> torch.Tensor:
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"{path}: array {key!r} should be uint8 images (N, H, W, C) with C = 1 or 3, got shape {x.shape}")
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def _cifar_npz(path: Path, split: str) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            need = {f"x_{split}", f"y_{split}"}
            if not need <= keys:
                raise DataError(f"{path}: expected arrays {sorted(need)} in the .npz (CIFAR-10 subset format), "
                                f"found {sorted(keys)}")
            x, y = f[f"x_{split}"], f[f"y_{split}"]
            classes = [str(c) for c in f["classes"]] if "classes" in keys else list(CIFAR10_CLASSES)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: not a readable .npz file with CIFAR-10 arrays "
                        f"(x_train, y_train, x_test, y_test): {type(e).__name__}: {e}") from e
    if len(x) != len(y):
        raise DataError(f"{path}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: expected integer class labels of shape (N,) in y_{split}, got {y.dtype} of shape {y.shape}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
        # Labels past the class list fail later, inside the loss, as an index error.
        raise DataError(f"{path}: expected labels from 0 to {len(classes) - 1} in y_{split} (the file names "
                        f"{len(classes)} classes), got labels from {int(y.min())} to {int(y.max())}")
    return _from_nhwc(x, path, f"x_{split}"), torch.from_numpy(y.astype(np.int64)), classes


def _cifar_folder(path: Path, split: str) -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    files = [path / f"data_batch_{i}" for i in range(1, 6)] if split == "train" else [path / "test_batch"]
    xs, ys = [], []
    for f in files:
        if not f.is_file():
            raise DataError(f"{f}: missing; a cifar-10-batches-py folder holds data_batch_1..5 and test_batch")
        try:
            with open(f, "rb") as fh:
                d = pickle.load(fh, encoding="bytes")  # the standard format is a pickle; only open trusted folders
            data, labels = d[b"data"], d[b"labels"]
        except Exception as e:
            raise DataError(f"{f}: not a CIFAR-10 python batch (a pickled dict with b'data' and b'labels'): "
                            f"{type(e).__name__}: {e}") from e
        xs.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(labels, dtype=np.int64))
    classes = list(CIFAR10_CLASSES)
    meta = path / "batches.meta"
    if meta.is_file():
        try:
            with open(meta, "rb") as fh:
                classes = [c.decode() for c in pickle.load(fh, encoding="bytes")[b"label_names"]]
        except Exception:
            pass
    x = torch.from_numpy(np.concatenate(xs)).float().div_(255.0)
    return x.contiguous(), torch.from_numpy(np.concatenate(ys)), classes


def load_dataset(spec: str, split: str = "train") -> Tuple[torch.Tensor, torch.Tensor, List[str]]:
    """Load a data set split.

    Args:
        spec: ``"digits"``, ``"cifar10"`` (uses ``$PYDECOUPLE_CIFAR``), a CIFAR ``.npz``
            path, or a ``cifar-10-batches-py`` folder.
        split: ``"train"`` or ``"test"``.

    Returns:
        (images float32 (N, C, H, W) in [0, 1], labels int64 (N,), class names).

    Raises:
        DataError: a missing file or a file of the wrong format, naming the file
        and what was expected.
    """
    if split not in ("train", "test"):
        raise ValueError(f"load_dataset: split must be 'train' or 'test', got {split!r}")
    if spec == "digits":
        return _digits(split)
    if spec == "cifar10":
        env = os.environ.get("PYDECOUPLE_CIFAR")
        if not env:
            raise DataError("load_dataset('cifar10'): set PYDECOUPLE_CIFAR to the CIFAR-10 .npz or "
                            "cifar-10-batches-py folder, or pass its path")
        spec = env
    path = Path(spec).expanduser()
    if path.is_dir():
        return _cifar_folder(path, split)
    if not path.exists():
        raise DataError(f"{path}: no such file; expected 'digits', a CIFAR-10 .npz file or a "
                        f"cifar-10-batches-py folder")
    if path.suffix != ".npz":
        raise DataError(f"{path}: expected a .npz file (x_train, y_train, x_test, y_test) or a "
                        f"cifar-10-batches-py folder, got a {path.suffix or 'suffix-less'} file")
    return _cifar_npz(path, split)


def channel_stats(x: torch.Tensor) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Per-channel mean and std of images (N, C, H, W)."""
    m = x.mean(dim=(0, 2, 3))
    s = x.std(dim=(0, 2, 3))
    return tuple(float(v) for v in m), tuple(float(v) for v in s)


def dataset_stats(spec: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """Mean/std of a data set's training images (for ``models.Normalize``)."""
    x, _, _ = load_dataset(spec, "train")
    return channel_stats(x)


def augment(x: torch.Tensor, pad: int = 4, flip: bool = True, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random crop with zero padding and horizontal flip, per sample, on a batch.

    Digits (8x8) use ``pad=1, flip=False``.
    """
    n, c, h, w = x.shape
    if pad > 0:
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        off = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator)
        rows = (off[:, 0, None] + torch.arange(h)[None, :])  # (n, h)
        cols = (off[:, 1, None] + torch.arange(w)[None, :])  # (n, w)
        idx_r = rows[:, None, :, None].expand(n, c, h, w + 2 * pad)
        xp = torch.gather(xp, 2, idx_r)
        idx_c = cols[:, None, None, :].expand(n, c, h, w)
        x = torch.gather(xp, 3, idx_c)
    if flip:
        f = torch.rand(n, generator=generator) < 0.5
        x = torch.where(f[:, None, None, None], x.flip(3), x)
    return x
