"""Checkpoints: one ``torch.save`` dict, written atomically, read with
``torch.load(weights_only=True)``.

Layout::

    {"format": "pydecouple-checkpoint", "version": 1,
     "meta": {"arch", "num_classes", "in_channels", "decoupled", "dataset", ...},
     "state_dict": model weights,
     "extra": {... training state: optimizer, epoch, loss module, rng ...}}
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn

__all__ = ["save", "load", "load_model", "CheckpointError", "FORMAT"]

FORMAT = "pydecouple-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated or not a pydecouple checkpoint (the message names the file)."""


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def save(path: Union[str, Path], model: nn.Module, meta: Dict[str, Any], extra: Optional[Dict[str, Any]] = None) -> Path:
    """Write ``model``'s weights with ``meta`` to ``path`` atomically (temp file + rename).

    ``meta`` must let :func:`load_model` rebuild the model: ``arch``,
    ``num_classes``, ``in_channels``, ``decoupled`` (and optionally
    ``decouple_kwargs``, ``mean``, ``std``); plain Python values only.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = {"format": FORMAT, "version": VERSION, "meta": dict(meta),
            "state_dict": _unwrap(model).state_dict(), "extra": extra or {}}
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(blob, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _create_temp(path: Path) -> Tuple[int, str]:
    """A new temp file beside ``path``, created with mode 0o666 less the umask, as
    ``torch.save(obj, path)``'s ``open()`` would: ``tempfile.mkstemp`` makes it
    0o600, and the rename would leave every checkpoint unreadable to the group."""
    for _ in range(100):
        tmp = str(path.parent / f"{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{path.parent}: no free temporary file name for {path.name}")


def load(path: Union[str, Path], map_location: str = "cpu") -> Dict[str, Any]:
    """The checkpoint dict, checked. Raises :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable pydecouple checkpoint (truncated, or not written by "
                              f"torch.save, or holding objects other than tensors and plain values): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a pydecouple checkpoint (expected a dict with format={FORMAT!r}, "
                              f"got {type(blob).__name__}{' with keys ' + str(sorted(blob)[:8]) if isinstance(blob, dict) else ''})")
    for k in ("meta", "state_dict"):
        if k not in blob:
            raise CheckpointError(f"{path}: pydecouple checkpoint without {k!r}")
    return blob


def build_from_meta(meta: Dict[str, Any]) -> nn.Module:
    from .models import build

    try:
        return build(meta["arch"], num_classes=int(meta.get("num_classes", 10)), decoupled=bool(meta.get("decoupled", False)),
                     in_channels=int(meta.get("in_channels", 3)), mean=meta.get("mean"), std=meta.get("std"),
                     decouple_kwargs=meta.get("decouple_kwargs") or {})
    except KeyError as e:
        raise CheckpointError(f"checkpoint meta lacks {e}; it needs arch, num_classes, in_channels, decoupled") from e


def load_model(path: Union[str, Path], map_location: str = "cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights.

    Returns ``(model in eval mode, meta)``.
    """
    blob = load(path, map_location)
    meta = blob["meta"]
    model = build_from_meta(meta)
    try:
        model.load_state_dict(blob["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit the model its meta describes "
                              f"({meta.get('arch')}, decoupled={meta.get('decoupled')}): {str(e).splitlines()[0]}") from e
    return model.to(map_location).eval(), meta
