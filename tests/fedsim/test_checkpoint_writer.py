"""Checkpoints as a callback: written when a round is due, from the round's snapshot, never without one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedsim.callbacks.base import RoundRecord
from fedsim.callbacks.checkpoint import CheckpointWriter
from fedsim.checkpoint import Checkpoint, load_checkpoint


def _record(r: int, snapshots: list[int] | None) -> RoundRecord:
    def snapshot() -> Checkpoint:
        assert snapshots is not None
        snapshots.append(r)
        return Checkpoint(r, np.full(3, float(r), dtype=np.float32), {"m": r}, {"state": r}, sim_time_s=2.0 * r)

    return RoundRecord(r, {"round": r}, snapshot=None if snapshots is None else snapshot)


def test_every_nth_round_the_last_and_a_stopping_one_are_saved(tmp_path: Path) -> None:
    # Prepare
    writer = CheckpointWriter(every=3, rounds=7)
    writer.on_run_begin(run_dir=tmp_path, total_rounds=7)
    taken: list[int] = []
    # Execute: rounds 1-7, a callback asking to stop at round 5
    for r in range(1, 8):
        writer.on_round_closed(_record(r, taken), stopping=r == 5)
    # Assert: the snapshot is read only when due; the file holds the last one
    assert taken == [3, 5, 6, 7]
    saved = load_checkpoint(tmp_path)
    assert saved.round_idx == 7 and saved.strategy_state == {"m": 7} and saved.sim_time_s == 14.0
    np.testing.assert_array_equal(saved.payload, np.full(3, 7.0, dtype=np.float32))


def test_a_round_without_a_snapshot_writes_nothing(tmp_path: Path) -> None:
    writer = CheckpointWriter(every=1, rounds=2)
    writer.on_run_begin(run_dir=tmp_path, total_rounds=2)
    writer.on_round_closed(_record(1, None), stopping=False)
    assert not list(tmp_path.iterdir())
