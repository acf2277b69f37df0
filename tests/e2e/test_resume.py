"""A driver killed mid-run and resumed from its checkpoint gives the tables of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from aggregation.errors import FedsimError
from fedsim.checkpoint import load_checkpoint
from fedsim.driver import resume, run

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROUND_METRICS = ["round", "test_loss", "test_accuracy", "train_loss", "clients_sampled", "clients_completed",
                 "examples", "bytes_down", "bytes_up", "routing_tv"]
CLIENT_METRICS = ["round", "client", "n_examples", "train_loss", "bytes_down", "bytes_up", "weight"]
ROOT = Path(__file__).resolve().parents[2]


def _kill_after_first_checkpoint(config: Path, run_dir: Path) -> int:
    """Run ``fedsim run`` in a child process, SIGKILL it once a checkpoint exists; the checkpoint's round."""
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    child = subprocess.Popen([sys.executable, "-m", "fedsim", "run", "--config", str(config), "--out", str(run_dir)],
                             cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoint.pkl").exists():
            assert child.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    return load_checkpoint(run_dir).round_idx


@pytest.mark.parametrize(
    "state",
    [("strategy.name=fedalign_moe",), ("strategy.name=pfl_moe",), ("compression.uplink=topk",)],
    ids=["fedalign_moe", "pfl_moe", "error_feedback"],
)
def test_killed_run_resumes_to_the_uninterrupted_tables(ray_session, tiny_config, tmp_path: Path, state: tuple[str, ...]) -> None:  # type: ignore[no-untyped-def]
    # Prepare: rounds long enough (10 local epochs) for the kill to land mid-run; state carried across rounds
    cfg = tiny_config("rounds=4", "train.local_epochs=10", *state, "data.alpha=0.3", "clients_per_round=4")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    full = run(cfg, out=tmp_path / "full")

    # Execute
    killed_after = _kill_after_first_checkpoint(config, tmp_path / "killed")
    assert json.loads((tmp_path / "killed" / "status.json").read_text())["status"] == "running"
    assert killed_after < 4, "the kill landed after the last round: nothing left to resume"
    resumed = resume(tmp_path / "killed")

    # Assert: same metrics, round by round and client by client
    pd.testing.assert_frame_equal(resumed.rounds[ROUND_METRICS], full.rounds[ROUND_METRICS])
    pd.testing.assert_frame_equal(resumed.clients[CLIENT_METRICS], full.clients[CLIENT_METRICS])
    on_disk = pd.read_parquet(tmp_path / "killed" / "rounds.parquet")
    assert on_disk["round"].tolist() == [1, 2, 3, 4]
    clients_csv = pd.read_csv(tmp_path / "killed" / "clients.csv")  # cut back at the resume, then appended
    assert clients_csv["round"].tolist() == full.clients["round"].tolist()
    assert json.loads((tmp_path / "killed" / "status.json").read_text())["status"] == "completed"
    manifest = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert manifest["resumed"][0]["after_round"] == killed_after


def test_a_completed_run_is_not_resumed(ray_session, tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run(tiny_config("rounds=1"), out=tmp_path / "done")
    with pytest.raises(FedsimError, match="already completed"):
        resume(tmp_path / "done")
