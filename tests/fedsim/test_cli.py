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


@pytest.mark.ray
def test_cli_workers_that_do_not_fit_exit_2_before_any_run_dir(tmp_path: Path) -> None:
    # Prepare: a tiny synthetic run asking for more workers than the embedded Ray's 2 CPUs
    tiny = ["data.source=synthetic", "data.synthetic_docs_per_label=8", "data.num_clients=4", "clients_per_round=4",
            "data.min_examples=1", "model.pretrain.steps=0", "model.pretrain.tokenizer_vocab=400",
            "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
            "model.intermediate_size=32", "model.num_experts=4", "workers.ray_num_cpus=2", "workers.num_workers=3"]
    # Execute
    proc = _fedsim("run", f"out_dir={tmp_path}/runs", f"cache_dir={tmp_path}/cache", *tiny, cwd=tmp_path)
    # Assert
    assert proc.returncode == 2, proc.stderr
    assert "fedsim: error: workers.num_workers: 3 workers" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()
