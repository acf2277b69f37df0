"""The callback hooks the driver calls; callbacks never edit the algorithm."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsim.checkpoint import Checkpoint


@dataclass(frozen=True)
class RoundRecord:
    """One finished round: its table row, and its per-client, communication and routing rows.

    ``snapshot`` reads the state a resumed run would continue from after this round (payload, strategy
    state, sampler); None where a run cannot be resumed (asynchronous runs). Reading it costs a payload's
    transfer from the object store and the strategy's state from the aggregator: only when saving.
    """

    round_idx: int
    row: dict[str, Any]
    clients: list[dict[str, Any]] = field(default_factory=list)
    comm: list[dict[str, Any]] = field(default_factory=list)  # bytes per client, direction and payload class
    routing: list[dict[str, Any]] = field(default_factory=list)  # expert utilisation per layer and expert
    snapshot: Callable[[], Checkpoint] | None = None


class Callback:
    """Base class with no-op hooks (pfl's shape: begin, after each round, end)."""

    def on_run_begin(self, *, run_dir: Path, total_rounds: int) -> None:
        """Called once before round 1."""

    def after_round(self, record: RoundRecord) -> tuple[bool, dict[str, Any]]:
        """Called after each round; returns (stop, extra metrics for the row)."""
        return False, {}

    def on_round_closed(self, record: RoundRecord, *, stopping: bool) -> None:
        """Called after every callback's ``after_round``, with the row final (their metrics in it).

        ``stopping``: a callback asked to stop, so this is the run's last round. For what must see the whole
        round: the tables on disk, the checkpoint.
        """

    def on_client_progress(self, *, round_idx: int, done: int, total: int) -> None:
        """Called while a round's clients finish."""

    def on_run_end(self, *, status: str) -> None:
        """Called once at the end, with "completed" or "failed"."""
