"""Checkpoints as a callback: the run's state saved after every ``every``-th round, its last, and a stopping one."""

from __future__ import annotations

from pathlib import Path

from fedsim.callbacks.base import Callback, RoundRecord
from fedsim.checkpoint import save_checkpoint


class CheckpointWriter(Callback):
    """Writes ``checkpoint.pkl`` (``fedsim.checkpoint``) when a round is due, after the tables are on disk."""

    def __init__(self, *, every: int, rounds: int) -> None:
        self.every, self.rounds = every, rounds
        self.run_dir: Path | None = None

    def on_run_begin(self, *, run_dir: Path, total_rounds: int) -> None:
        """Remember ``run_dir``, where the checkpoint is written."""
        self.run_dir = run_dir

    def on_round_closed(self, record: RoundRecord, *, stopping: bool) -> None:
        """Save the round's snapshot if the round is due: every ``every``-th, the last, or one a callback stops at."""
        r = record.round_idx
        due = r % self.every == 0 or r == self.rounds or stopping
        if due and record.snapshot is not None and self.run_dir is not None:
            save_checkpoint(self.run_dir, record.snapshot())
