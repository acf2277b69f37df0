"""TensorBoard scalars of a run (``logging.tensorboard: true``; the ``tensorboard`` package is an extra).

Each numeric column of the rounds table becomes a scalar under ``round/``
(step = round), and accuracy and loss are also written against the
simulated clock and the cumulative bytes communicated, the two other axes
fedsim's reports plot them on.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

from aggregation.errors import ConfigError
from fedsim.callbacks.base import Callback, RoundRecord

_CURVES = ("test_accuracy", "test_loss", "train_loss")


def require_tensorboard() -> None:
    """ConfigError naming the option when the tensorboard package is missing."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logging.tensorboard: true needs the tensorboard package: pip install 'fedsim[tensorboard]'")


class TensorBoardScalars(Callback):
    """Writes the rounds table to ``RUN_DIR/tensorboard`` as it grows."""

    def __init__(self) -> None:
        require_tensorboard()
        self._writer: Any = None
        self._bytes = 0.0

    def on_run_begin(self, *, run_dir: Path, total_rounds: int) -> None:
        """Open the event writer on ``RUN_DIR/tensorboard``."""
        from torch.utils.tensorboard import SummaryWriter  # imported only when asked for

        self._writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def after_round(self, record: RoundRecord) -> tuple[bool, dict[str, Any]]:
        """Write the round's finite numeric columns and curves, then flush; never stops the run or adds metrics."""
        row, step = record.row, record.round_idx
        self._bytes += float(row.get("bytes_down", 0.0)) + float(row.get("bytes_up", 0.0))
        for name, value in row.items():
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if numeric and math.isfinite(value) and name != "round":
                self._writer.add_scalar(f"round/{name}", value, step)
        for name in _CURVES:
            value = row.get(name)
            if isinstance(value, float) and math.isfinite(value):
                if "sim_time_s" in row:
                    self._writer.add_scalar(f"vs_sim_time_ms/{name}", value, int(round(1000 * row["sim_time_s"])))
                self._writer.add_scalar(f"vs_bytes_kib/{name}", value, int(self._bytes // 1024))
        self._writer.flush()
        return False, {}

    def on_run_end(self, *, status: str) -> None:
        """Close the event writer, if the run began."""
        if self._writer is not None:
            self._writer.close()
