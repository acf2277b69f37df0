"""Shared builders for the aggregation tests: small layouts and in-memory update readers."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pytest

from aggregation import ArrayReader, ClientUpdate, EntrySpec, PayloadLayout


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
    """Factory ``make_reader(client_id, round_idx, n_examples, delta)`` of in-memory update readers.

    Each reader is over a ClientUpdate with a float32 copy of ``delta`` and no routing stats.
    """
    return _make_reader


@pytest.fixture(scope="session")
def layout4() -> PayloadLayout:
    """A 4-value layout: one shared tensor of shape (4,)."""
    return PayloadLayout.build([EntrySpec("w", "shared", None, None, (4,))])
