"""What a user sees in the console: one line per round, and the debug switch that lets library output through.

Light on purpose (no torch, no transformers): the CLI imports it before it knows which command runs.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from typing import Any

DEBUG_ENV = "FEDSIM_DEBUG"  # set by `fedsim run --debug`; read here, in the driver, and in every worker it starts
NO_VALUE = "–"


def debug_enabled() -> bool:
    """True when ``FEDSIM_DEBUG`` is set to anything but ``0``.

    DEBUG lines, library warnings and Ray's worker output then reach the console.
    """
    return os.environ.get(DEBUG_ENV, "0").strip() not in ("", "0")


def round_line(round_idx: int, total: int, row: Mapping[str, Any], *, step: bool = False) -> str:
    """The console's (and run.log's) line for a finished round.

    For example ``round 3/15  train_loss 0.451  test_acc 0.589  13.4 s``; a round without evaluation shows
    ``test_acc –``; an asynchronous run counts server steps (``step``).

    ``row`` is the round's row of the rounds table: ``wall_s`` in seconds, accuracy as a fraction.
    """
    what = "step" if step else "round"
    return "  ".join([
        f"{what} {round_idx}/{total}",
        f"train_loss {_number(row.get('train_loss'))}",
        f"test_acc {_number(row.get('test_accuracy'))}",
        f"{row['wall_s']:.1f} s",
    ])


def _number(value: float | None) -> str:
    return NO_VALUE if value is None or not math.isfinite(value) else f"{value:.3f}"


class RunLogOnly(logging.Filter):
    """Sends a library logger's records to run.log instead of the console.

    Added to the library's logger (e.g. DeepSpeed's, which prints through a
    handler of its own and does not propagate), it passes each record on as
    ``fedsim.lib`` marked ``file_only`` (the console handler skips those; the
    run's file handler on ``fedsim`` keeps them) and stops it there.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Hand ``record`` to ``fedsim.lib`` marked ``file_only``; False, so the library's own handlers skip it."""
        record.file_only = True
        logging.getLogger("fedsim.lib").handle(record)
        return False


def route_to_run_log(logger: logging.Logger) -> None:
    """Attach one ``RunLogOnly`` to ``logger`` (idempotent)."""
    if not any(isinstance(f, RunLogOnly) for f in logger.filters):
        logger.addFilter(RunLogOnly())
