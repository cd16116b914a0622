"""What the commands share: argument types that refuse misuse while parsing,
checks that need the device, the output folder, the data or the checkpoint,
and the error that carries one line to the user.

Every message names the argument, what was expected and what was given
(``argument --batch-size: expected an integer >= 1, got '0'``). A type below
raises ``argparse.ArgumentTypeError``, which the parser (pydecouple.cli) prints
as one line with exit code 2; a check in a command's ``run`` raises
:class:`UsageError`, which the command prints the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
from typing import Any, Callable, Iterator, Optional, Sequence

EXIT_USAGE = 2


class UsageError(Exception):
    """An argument that cannot work; ``str()`` is the one line to print."""

    def __init__(self, arg: str, expected: str, given: str) -> None:
        super().__init__(f"argument {arg}: expected {expected}, got {given}")
        self.arg = arg

    @classmethod
    def from_loader(cls, arg: str, error: Exception) -> "UsageError":
        """A loader's own error (DataError, CheckpointError): it names the file, what was
        expected and what was found already; this adds the argument it came from."""
        e = cls.__new__(cls)
        Exception.__init__(e, f"argument {arg}: {error}")
        e.arg = arg
        return e


def integer(minimum: Optional[int] = None, maximum: Optional[int] = None, note: str = "") -> Callable[[str], int]:
    """An argparse type: an int in [minimum, maximum]; ``note`` says what the bound means."""
    if minimum is not None and maximum is not None:
        expected = f"an integer from {minimum} to {maximum}"
    elif minimum is not None:
        expected = f"an integer >= {minimum}"
    elif maximum is not None:
        expected = f"an integer <= {maximum}"
    else:
        expected = "an integer"
    expected += f" ({note})" if note else ""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return v

    parse.__name__ = "integer"
    return parse


def number(low: Optional[float] = None, high: Optional[float] = None, *, low_open: bool = False,
           high_open: bool = False, note: str = "") -> Callable[[str], float]:
    """An argparse type: a finite float in the interval given (open or closed at each end).

    'nan' and 'inf' are refused: float() takes them, and a NaN learning rate
    trains to NaN and exits 0."""
    if low is not None and high is not None:
        expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        expected = f"a number {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        expected = f"a number {'<' if high_open else '<='} {high:g}"
    else:
        expected = "a finite number"
    expected += f" ({note})" if note else ""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        bad = not math.isfinite(v)
        if low is not None:
            bad |= v <= low if low_open else v < low
        if high is not None:
            bad |= v >= high if high_open else v > high
        if bad:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return v

    parse.__name__ = "number"
    return parse


def check_device(arg: str, spec: Optional[str]) -> Optional[Any]:
    """``spec`` as a torch.device this machine has (None / 'auto': None, the caller's default).

    Checked before anything runs: ``--device cuda`` without CUDA otherwise ends in
    torch's AssertionError deep inside the first ``.to()``."""
    if spec is None or spec == "auto":
        return None
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise UsageError(arg, "cpu, cuda or cuda:N", repr(spec)) from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            why = ("this PyTorch build has no CUDA" if not torch.backends.cuda.is_built()
                   else "no CUDA device is visible")
            raise UsageError(arg, f"cpu ({why})", repr(spec))
        if dev.index is not None and dev.index >= n:
            raise UsageError(arg, f"cpu, cuda or cuda:0 to cuda:{n - 1} ({n} CUDA device{'s' * (n > 1)} here)",
                             repr(spec))
        return dev
    if dev.type == "mps" and getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return dev
    raise UsageError(arg, "cpu, cuda or cuda:N", repr(spec))


def make_out_dir(arg: str, path: str) -> str:
    """Create the output folder now, so that a path under a file or without
    permission fails here, in one line, and not after minutes of work."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(arg, "a folder (created if missing)", f"{path!r}, which is a file")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(arg, "a folder that can be created", f"{path!r} ({e.strerror or type(e).__name__})") from None
    return path


@contextlib.contextmanager
def quiet_rebuild() -> Iterator[None]:
    """Rebuilding a checkpoint's model calls decouple(), which logs its summary at
    INFO: news when the user decouples, noise when a checkpoint is loaded."""
    lg = logging.getLogger("pydecouple.nn.decouple")
    level = lg.level
    lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        lg.setLevel(level)


def check_model_fits_data(model: Any, images: Any, labels: Sequence[Any], model_arg: str, model_given: str,
                          data_arg: str, data_given: str, meta: Optional[dict] = None) -> None:
    """Refuse data the model cannot take: other channel count, more classes than
    outputs, images too small for its pooling. One forward of two images in
    eval mode (no state changes) finds what the metadata does not say."""
    import torch

    shape = tuple(images.shape[1:])
    meta = meta or {}
    cin = meta.get("in_channels")
    if cin is not None and int(cin) != shape[0]:
        raise UsageError(data_arg, f"{int(cin)}-channel images, as {model_arg} {model_given!r} takes",
                         f"{data_given!r} with {shape[0]}-channel images")
    was = model.training
    model.eval()
    try:
        dev = next(model.parameters()).device
        with torch.no_grad():
            out = model(images[:2].to(dev))
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(data_arg, f"images {model_arg} {model_given!r} can take",
                         f"{data_given!r} with images of shape {shape}, which it refuses ({first})") from None
    finally:
        model.train(was)
    k = int(out.shape[-1])
    top = int(labels.max()) if len(labels) else -1
    if top >= k:
        raise UsageError(data_arg, f"labels below {k}, the number of classes {model_arg} {model_given!r} predicts",
                         f"{data_given!r} with labels up to {top}")
