"""The worked user strategy of examples/custom_strategy, run the way its README says: a fresh process, on Ray."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.e2e.conftest import TINY

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, name: str, *overrides: str) -> pd.DataFrame:
    env = {**os.environ, "PYTHONPATH": "examples/custom_strategy"}
    command = [sys.executable, "-m", "fedsim", "run", "--out", str(tmp_path / name), *TINY,
               f"cache_dir={tmp_path / 'cache'}", *overrides]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=420)
    assert done.returncode == 0, done.stderr[-3000:]
    return pd.read_parquet(tmp_path / name / "rounds.parquet")


def test_fedavgm_without_momentum_is_fedavg_and_with_it_is_not(tmp_path: Path) -> None:
    # Execute: the user's class is imported by the driver (config check), the aggregator and the workers
    fedavg = _run(tmp_path, "fedavg", "strategy.name=fedavg")
    plain = _run(tmp_path, "plain", "strategy.name=fedavgm:FedAvgM", "strategy.options.momentum=0.0")
    moving = _run(tmp_path, "moving", "strategy.name=fedavgm:FedAvgM", "strategy.options.momentum=0.9",
                  "strategy.options.server_lr=2.0")

    # Assert: β = 0, η = 1 is FedAvg's step (to float32 rounding of θ + Δ̄ taken in float64); the options reached
    # the aggregator; the strategy's own column reached rounds.parquet: round 1's buffer is Δ̄ whatever β,
    # round 2's carries β·v
    for column in ("test_loss", "train_loss"):
        np.testing.assert_allclose(plain[column], fedavg[column], rtol=1e-5)
    assert not np.allclose(moving["test_loss"], fedavg["test_loss"], rtol=1e-5)
    assert (plain["velocity_norm"] > 0).all()
    assert moving["velocity_norm"].iloc[0] == pytest.approx(plain["velocity_norm"].iloc[0], rel=1e-5)
    assert moving["velocity_norm"].iloc[1] != pytest.approx(plain["velocity_norm"].iloc[1], rel=1e-3)


def test_a_bad_option_of_a_user_strategy_fails_before_anything_runs(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": "examples/custom_strategy"}
    command = [sys.executable, "-m", "fedsim", "run", *TINY, f"out_dir={tmp_path}",
               "strategy.name=fedavgm:FedAvgM", "strategy.options.momentum=1.5"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].endswith(
        "strategy.options.momentum: Input should be less than 1 (got 1.5)"
    )
    assert not list(tmp_path.iterdir())  # nothing was written
