"""Live progress display: rounds, clients done in the current round, loss and accuracy (rich)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

from fedsim.callbacks.base import Callback, RoundRecord


class Progress(Callback):
    """Two bars: the run's rounds (with the last loss/accuracy) and the current round's clients."""

    def __init__(self, *, enabled: bool = True, console: Console | None = None) -> None:
        self._bar = RichProgress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self._rounds: Any = None
        self._clients: Any = None

    def on_run_begin(self, *, run_dir: Path, total_rounds: int) -> None:
        """Start the display with a rounds bar of ``total_rounds`` and an empty clients bar."""
        self._bar.start()
        self._rounds = self._bar.add_task("rounds ", total=total_rounds, info="")
        self._clients = self._bar.add_task("clients", total=1, info="")

    def on_client_progress(self, *, round_idx: int, done: int, total: int) -> None:
        """Move the clients bar to ``done`` of ``total`` for round ``round_idx``."""
        self._bar.update(self._clients, completed=done, total=total, info=f"round {round_idx}")

    def after_round(self, record: RoundRecord) -> tuple[bool, dict[str, Any]]:
        """Advance the rounds bar and show the round's loss and accuracy; never stops the run or adds metrics."""
        row = record.row
        acc = row.get("test_accuracy", float("nan"))
        # – unevaluated
        info = f"loss {row.get('train_loss', float('nan')):.3f}  acc {'–' if acc != acc else f'{acc:.3f}'}"
        self._bar.update(self._rounds, completed=record.round_idx, info=info)
        return False, {}

    def on_run_end(self, *, status: str) -> None:
        """Stop the display, leaving the bars on the console."""
        self._bar.stop()
