"""benchmarks/bench_model.py refuses a bad --upsample with a message naming it, before any work."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_model  # noqa: E402


@pytest.mark.parametrize("value", ["0", "-2"])
def test_upsample_below_one_is_refused(value, capsys):
    with pytest.raises(SystemExit) as e:
        bench_model.main(["--arch", "tiny_cnn", "--upsample", value])
    assert e.value.code == 2
    assert f"argument --upsample: must be an integer >= 1, got {value}" in capsys.readouterr().err
