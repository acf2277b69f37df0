"""The GPU engine benchmark runs end to end on the tiny shape (on CPU here): the device check is not its first run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_engine_benchmark_prints_its_table_on_the_tiny_shape() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "benchmarks/gpu_engine.py", "--shape", "tiny", "--steps", "2",
                          "--warmup", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    values = dict(line.split(None, 1) for line in out.stdout.splitlines() if line.strip() and " " in line.strip())
    assert float(values["tokens_per_s"]) > 0
    assert 0 < float(values["expert_share_of_step"]) < 1
    assert float(values["expert_tflops_executed"]) >= float(values["expert_tflops_useful"]) > 0
