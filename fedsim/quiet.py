"""Silence the libraries' own progress bars: fedsim shows one progress display of its own."""

from __future__ import annotations

import datasets
import transformers


def quiet_libraries() -> None:
    """Turn off datasets' and transformers' tqdm bars and transformers' info chatter (idempotent)."""
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
