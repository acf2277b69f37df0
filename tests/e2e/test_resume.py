"""A stopped run continued with ``fedsim resume`` gives an uninterrupted run's tables and final payload, bit for bit.

The run is stopped mid-way: its driver killed, or a worker lost.

Each stopped run is a ``fedsim run`` child process checkpointing every 2 rounds and stopped once round 3's row
is on disk: the tables then hold a round past the checkpoint, which the resume must cut back and redo.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import psutil
import pytest
import yaml

from aggregation.errors import FedsimError
from fedsim import environment
from fedsim.checkpoint import load_checkpoint
from fedsim.config import RunConfig
from fedsim.driver import resume, run
from tests.e2e.exact import EXACT, assert_same_run, read_table

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, **environment.ENV}
# 4 rounds of 4 of the 6 clients (the sampler's state matters), 8 local epochs (a round lasts long enough, ~1 s,
# for the stop to land before the next checkpoint), a checkpoint every 2 rounds: the stop after round 3 resumes
# from 2. One worker: results do not depend on the count, and each of the 3 Ray starts a case makes is faster.
STOPPED = ("rounds=4", "train.local_epochs=8", "data.alpha=0.3", "clients_per_round=4", "checkpoint.every=2",
           "workers.num_workers=1", *EXACT)
STOP_AFTER = 3


def _fedsim(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedsim", *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _rounds_on_disk(run_dir: Path) -> list[int]:
    """The rounds in rounds.parquet.

    The run replaces it atomically after each round, but pyarrow opens a path more than once (footer, then pages):
    read its bytes in one go, or a replace in between mixes two files.
    """
    path = run_dir / "rounds.parquet"
    return pd.read_parquet(io.BytesIO(path.read_bytes()))["round"].tolist() if path.exists() else []


def _run_and_stop(cfg: RunConfig, run_dir: Path, stop: Callable[[subprocess.Popen[bytes]], None]) -> int:
    """The exit status of ``fedsim run`` in a child process that ``stop(child)`` stops after round ``STOP_AFTER``.

    The child has its own session and its own embedded Ray; ``stop(child)`` is called once round ``STOP_AFTER``'s
    row is on disk.
    """
    config = run_dir.parent / f"{run_dir.name}.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    child = subprocess.Popen([sys.executable, "-m", "fedsim", "run", "--config", str(config), "--out", str(run_dir)],
                             cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while len(_rounds_on_disk(run_dir)) < STOP_AFTER:
            assert child.poll() is None, f"the run ended (exit {child.returncode}) before round {STOP_AFTER}"
            assert time.monotonic() < deadline, f"round {STOP_AFTER} not on disk within 300 s"
            time.sleep(0.02)
        stop(child)
        return child.wait(timeout=300)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)  # the child's session only: its driver and its Ray
            child.wait(timeout=60)


def _kill_the_driver(child: subprocess.Popen[bytes]) -> None:
    """SIGKILL the run's whole session at once (driver, Ray, workers), as when its machine goes down."""
    os.killpg(child.pid, signal.SIGKILL)


def _assert_resumed_exactly(stopped: Path, full: Path) -> None:
    """``fedsim resume`` of ``stopped`` (whose tables go past its checkpoint) ends as the uninterrupted ``full``."""
    # the stop left tables past the checkpoint: the resume has rows to cut back
    checkpoint = load_checkpoint(stopped).round_idx
    assert checkpoint == 2 and _rounds_on_disk(stopped)[-1] > checkpoint, (checkpoint, _rounds_on_disk(stopped))
    assert (stopped / "clients.parquet" / f"round-{STOP_AFTER:06d}.parquet").is_file()

    # Execute
    done = _fedsim("resume", str(stopped))

    # Assert
    assert done.returncode == 0, done.stderr
    assert_same_run(stopped, full)
    assert pd.read_csv(stopped / "clients.csv")["round"].tolist() == read_table(full, "clients")["round"].tolist()
    assert json.loads((stopped / "status.json").read_text())["status"] == "completed"
    manifest = json.loads((stopped / "manifest.json").read_text())
    assert [r["after_round"] for r in manifest["resumed"]] == [checkpoint]


@pytest.mark.parametrize(
    "state",
    [("strategy.name=fedalign_moe",), ("strategy.name=pfl_moe",), ("compression.uplink=topk",)],
    ids=["fedalign_moe", "pfl_moe", "fedavg_error_feedback"],  # plain FedAvg: the lost-worker test below
)
def test_a_killed_run_resumed_from_the_cli_gives_the_uninterrupted_run(
    ray_session: None, tiny_config: Callable[..., RunConfig], tmp_path: Path, state: tuple[str, ...]
) -> None:
    """State carried across rounds must come back from the checkpoint; rows written after it must be redone.

    That state: the sampler, FedAlign-MoE's p_g and α, PFL-MoE's personal experts, error-feedback residuals.
    """
    # Prepare
    cfg = tiny_config(*STOPPED, *state)
    run(cfg, out=tmp_path / "full")
    status = _run_and_stop(cfg, tmp_path / "killed", _kill_the_driver)
    assert status == -signal.SIGKILL
    assert json.loads((tmp_path / "killed" / "status.json").read_text())["status"] == "running"

    # Execute / Assert
    _assert_resumed_exactly(tmp_path / "killed", tmp_path / "full")


def test_a_run_failed_by_a_lost_worker_is_resumed_unchanged(
    ray_session: None, tiny_config: Callable[..., RunConfig], tmp_path: Path
) -> None:
    """The user's story: a worker's node dies, the run stops as failed, and the user resumes it as it is.

    The run stops as failed under workers.on_client_failure: stop, with no restarts; the user resumes it with its
    config untouched, once the cluster is whole again.
    """
    # Prepare
    cfg = tiny_config(*STOPPED, "workers.on_client_failure=stop", "workers.max_restarts=0",
                      "workers.max_task_retries=0")
    run(cfg, out=tmp_path / "full")
    run_dir = tmp_path / "failed"

    def kill_a_worker(child: subprocess.Popen[bytes]) -> None:
        """SIGKILL this run's first worker, found by its pid in placement.csv."""
        worker = psutil.Process(int(pd.read_csv(run_dir / "placement.csv")["pid"].iloc[0]))
        assert worker.cmdline()[0].startswith("ray::ClientWorker"), worker.cmdline()
        worker.kill()

    status = _run_and_stop(cfg, run_dir, kill_a_worker)
    assert status == 1  # "fedsim: run failed: ...": the input was fine, a round failed
    failed = json.loads((run_dir / "status.json").read_text())
    assert failed["status"] == "failed" and failed["error"].startswith(f"round {STOP_AFTER + 1}: "), failed

    # Execute / Assert
    _assert_resumed_exactly(run_dir, tmp_path / "full")


def test_a_completed_run_is_not_resumed(
    ray_session: None, tiny_config: Callable[..., RunConfig], tmp_path: Path
) -> None:
    run(tiny_config("rounds=1"), out=tmp_path / "done")
    with pytest.raises(FedsimError, match="already completed"):
        resume(tmp_path / "done")
