"""benchmarks/scale_runs.py: a scale configuration, shrunk to tiny widths, runs end to end through the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_shrunk_olmoe_scale_config_runs_fedalign_moe_and_reports_every_process(tmp_path: Path) -> None:
    # Execute: the OLMoE configuration file with its vocabulary and depth, at tiny widths
    record = tmp_path / "scale_runs.csv"
    done = subprocess.run(
        [sys.executable, "benchmarks/scale_runs.py", "--quick", "--configs", "olmoe-1b-7b",
         "--strategies", "fedalign_moe", "--record", str(record)],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip

    # Assert: the round ran; every figure is a measurement, not a default
    assert done.returncode == 0, done.stderr[-2000:]
    row = pd.read_csv(record).iloc[0]
    assert row["strategy"] == "fedalign_moe" and row["clients"] == 4 and row["rounds"] == 1
    for column in ("update_mib", "round_s", "train_s", "worker_gib", "aggregator_gib", "driver_gib"):
        assert row[column] > 0, column
    assert bool(row["driver_built_base"])
