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
def test_gpu_precision_benchmark_compares_fp32_bf16_and_quantized_bases(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "benchmarks/gpu_precision.py", "--shape", "tiny", "--steps", "3",
                          "--csv", str(tmp_path / "t.csv")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cosine_to_fp32" in out.stdout
    table = pd.read_csv(tmp_path / "t.csv")
    ran = table[(table["status"] == "ok") & (table["quantization"] == "none")].set_index("precision")
    assert {"fp32", "bf16"} <= set(ran.index) and (ran["s_per_step"] > 0).all()
    assert ran.loc["fp32", "cosine_to_fp32"] == pytest.approx(1.0) and 0.9 < ran.loc["bf16", "cosine_to_fp32"] < 1.0
    quantized = table[table["quantization"] != "none"].set_index("quantization")
    assert (quantized["status"] == "ok").all() and set(quantized.index) == {"8bit", "4bit"}  # bitsandbytes' CPU kernels
    assert (0.5 < quantized["cosine_to_fp32"]).all() and (quantized["cosine_to_fp32"] < 1.0).all()
