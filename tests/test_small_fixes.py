"""Issue 16, case 9's smaller items: checkpoint file mode, explain_backends()
without arguments, no citation of METHOD.md (a file a fresh clone lacks).
The op's argument types (relu, numpy / tensor integers) are in test_op_arguments.py,
the metrics line printed once in test_cli_errors.py."""

from __future__ import annotations

import inspect
import os
import re
import stat
from pathlib import Path

import pytest
import torch

import pydecouple
from pydecouple import _backend, checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_checkpoint_mode_follows_umask(tmp_path, umask):
    """As torch.save(obj, path) does: 0o666 less the umask (mkstemp made every checkpoint 0o600)."""
    old = os.umask(umask)
    try:
        path = ckpt.save(tmp_path / "m.pt", torch.nn.Linear(2, 2), {"arch": "x"})
        torch.save({}, tmp_path / "plain.pt")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o666 & ~umask == stat.S_IMODE((tmp_path / "plain.pt").stat().st_mode), oct(mode)


def test_checkpoint_write_stays_atomic(tmp_path, monkeypatch):
    """A failed write leaves the previous checkpoint and no temp file behind."""
    path = ckpt.save(tmp_path / "m.pt", torch.nn.Linear(2, 2), {"arch": "first"})

    def fail(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(path, torch.nn.Linear(2, 2), {"arch": "second"})
    assert ckpt.load(path)["meta"]["arch"] == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


# The default is being added in pydecouple/_backend.py (another engineer's file) while this is
# written: expected to fail only while explain's x has no default, so that change does not
# trip a strict xfail, and the test checks the behaviour once it lands.
_X = inspect.signature(_backend.explain).parameters.get("x")
_NO_DEFAULT = _X is not None and _X.default is inspect.Parameter.empty


@pytest.mark.xfail(_NO_DEFAULT, strict=True, reason="pydecouple/_backend.py's explain(x) has no default for x yet")
def test_explain_backends_needs_no_argument():
    reasons = dict(pydecouple.explain_backends())
    assert set(reasons) == set(_backend.BACKENDS) and reasons["reference"] is None


def _citations(root: Path):
    for path in sorted(root.rglob("*.py")):
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"(?<![\w/.])METHOD\.md", line):
                yield f"{path.relative_to(REPO)}:{i}: {line.strip()}"


def test_code_cites_no_method_md():
    """Code, docstrings and printed summaries point to a document the clone has."""
    found = [c for d in ("pydecouple", "kernels") for c in _citations(REPO / d)]
    assert not found, "\n".join(found)
