"""Shared builders for the aggregation tests: small layouts and in-memory update readers."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

# tests/conftest.py puts tests/ on sys.path (pytest's prepend mode), where the folder
# tests/aggregation/ would be imported as a namespace package named `aggregation` in
# place of the real one unless the repository root is on sys.path too (as it is under
# `python -m pytest`, not under `.venv/bin/pytest`).
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from aggregation import ArrayReader, ClientUpdate, EntrySpec, PayloadLayout  # noqa: E402


def _make_reader(client_id: int, round_idx: int, n_examples: int, delta: Sequence[float] | np.ndarray) -> ArrayReader:
    update = ClientUpdate(
        client_id=client_id,
        round_idx=round_idx,
        n_examples=n_examples,
        delta=np.array(delta, dtype=np.float32),
        routing=(),
    )
    return ArrayReader(update)


@pytest.fixture(scope="session")
def make_reader() -> Callable[..., ArrayReader]:
    """Factory ``make_reader(client_id, round_idx, n_examples, delta)``: an in-memory
    reader over a ClientUpdate with a float32 copy of ``delta`` and no routing stats."""
    return _make_reader


@pytest.fixture(scope="session")
def layout4() -> PayloadLayout:
    """A 4-value layout: one shared tensor of shape (4,)."""
    return PayloadLayout.build([EntrySpec("w", "shared", None, None, (4,))])
