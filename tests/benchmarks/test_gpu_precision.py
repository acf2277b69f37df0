"""The precision benchmark runs end to end on the tiny shape (on CPU here), so the device check is not its first run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_precision_benchmark_compares_fp32_and_bf16_and_explains_what_cannot_run(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "benchmarks/gpu_precision.py", "--shape", "tiny", "--steps", "3",
                          "--csv", str(tmp_path / "t.csv")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cosine_to_fp32" in out.stdout
    table = pd.read_csv(tmp_path / "t.csv")
    ran = table[table["status"] == "ok"].set_index("precision")
    assert {"fp32", "bf16"} <= set(ran.index) and (ran["s_per_step"] > 0).all()
    assert ran.loc["fp32", "cosine_to_fp32"] == pytest.approx(1.0) and 0.9 < ran.loc["bf16", "cosine_to_fp32"] < 1.0
    skipped = table[table["quantization"] != "none"]
    assert len(skipped) == 2 and skipped["status"].str.startswith("model.quantization:").all()  # no GPU or bitsandbytes here
