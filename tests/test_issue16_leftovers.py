"""Issue 16's leftovers: one home for conv geometry (the Triton launcher
included), no private helper imported by the package's entry point, and
documents that cite only what a fresh clone has and state the CLI's exit codes
as pydecouple/cli.py implements them. The Triton launcher's behaviour is held
to the reference by test_triton_interpret.py (TRITON_INTERPRET=1 on CPU)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tree(rel: str) -> ast.Module:
    return ast.parse((REPO / rel).read_text(encoding="utf-8"))


def test_package_init_imports_no_private_names():
    """pydecouple/__init__.py loads the extension through a public function, not a private helper."""
    private = [f"{node.module}.{a.name}" for node in ast.walk(_tree("pydecouple/__init__.py"))
               if isinstance(node, ast.ImportFrom) for a in node.names if a.name.startswith("_")]
    assert not private, private


def test_triton_launcher_takes_geometry_from_pydecouple_geometry():
    """kernels/gated_conv2d.py (installed as pydecouple.kernels) imports the output size, the
    output layout rule and the kept-first index lists instead of restating them."""
    tree = _tree("kernels/gated_conv2d.py")
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.level == 2 and node.module == "geometry" for a in node.names}
    assert {"masks_to_indices", "output_memory_format", "output_size"} <= imported
    defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert not {d for d in defined if "masks_to_indices" in d or "memory_format" in d}, defined
    src = (REPO / "kernels/gated_conv2d.py").read_text(encoding="utf-8")
    assert "argsort" not in src  # the kept-first lists
    assert not re.search(r"\(\s*kh\s*-\s*1\s*\)\s*-\s*1\s*\)\s*//", src)  # the output-size formula


def test_docs_cite_no_method_md():
    """The documents point to files a fresh clone has (docs/method.md, not METHOD.md)."""
    found = [f"{p.relative_to(REPO)}:{i}" for p in [*sorted((REPO / "docs").glob("*.md")), REPO / "README.md"]
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if re.search(r"(?<![\w/.])METHOD\.md", line)]
    assert not found, found


def test_method_md_exit_codes_match_the_cli():
    """docs/method.md's exit codes are the ones the CLI returns, with the traceback switch it reads."""
    from pydecouple import cli
    from pydecouple.commands import _common, train

    text = (REPO / "docs/method.md").read_text(encoding="utf-8")
    m = re.search(r"Exit codes: (.*?interrupted)\.", text, re.S)
    assert m, "docs/method.md lost its exit-code statement"
    stated = re.findall(r"(?:^|; )(\d+) ", m.group(1).replace("\n", " "))
    assert sorted(map(int, stated)) == [0, 1, 2, 3, 130], stated
    assert (cli.EXIT_BUG, cli.EXIT_INTERRUPTED, _common.EXIT_USAGE) == (1, 130, 2)
    assert (train.EXIT_OK, train.EXIT_USAGE, train.EXIT_DATA) == (0, 2, 3)
    assert f"`{cli.TRACEBACK_ENV}=1` shows the traceback" in m.group(1).replace("\n", " ")
    assert "unexpected error" in m.group(1) and "stderr" in text[m.start() - 200:m.start()]
