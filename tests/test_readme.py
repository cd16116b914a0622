"""The README's five-minute tour runs as printed (the README stays true)."""

import os
import re
import runpy
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_tour_runs(tmp_path, monkeypatch):
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    tour = next(b for b in blocks if "import torch, pydecouple" in b)
    script = tmp_path / "tour.py"
    script.write_text(tour)
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(script), run_name="__main__")
    assert os.path.exists(tmp_path / "out" / "detection" / "report.json")
