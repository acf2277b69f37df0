"""The command line: bad input exits 2 with one line naming the field or file, and leaves no run behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _fedsim(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedsim", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["rounds=3", "unknown_key=1"], "unknown_key"),
        (["rounds=-1"], "rounds"),
        (["model.family=gpt2"], "model.family"),
        (["data.source=missing/file.json"], "missing/file.json"),
        (["strategy.name=fedbar"], "strategy.name"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(args: list[str], named: str, tmp_path: Path) -> None:
    # Execute
    proc = _fedsim("run", "--config", str(REPO / "configs" / "demo.yaml"), f"out_dir={tmp_path}/runs",
                   f"cache_dir={tmp_path}/cache", *args, cwd=tmp_path)
    # Assert
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fedsim: error: ") and named in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


def test_cli_missing_config_file_exits_2(tmp_path: Path) -> None:
    proc = _fedsim("run", "--config", "nope.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert "nope.yaml" in proc.stderr and "Traceback" not in proc.stderr
