"""The aggregator's Ray-free helpers: what it reads off an update before the guard has seen it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from actors.aggregator import _duration
from aggregation.messages import ClientUpdate
from aggregation.virtual_clock import RoundClock


def _update(n_examples: float, compute_seconds: float) -> ClientUpdate:
    return ClientUpdate(client_id=0, round_idx=1, n_examples=n_examples, delta=np.zeros(2, np.float32), routing=(),  # type: ignore[arg-type]
                        compute_seconds=compute_seconds, bytes_down={"shared": 8}, bytes_up={"shared": 8})


@pytest.mark.parametrize(("n_examples", "compute_seconds"), [(math.nan, 1.0), (-4, 1.0), (10, math.nan), (10, -1.0)])
def test_duration_of_an_update_the_guard_will_reject_is_finite(n_examples: float, compute_seconds: float) -> None:
    # Prepare: a clock that models compute from the examples, and one that uses the measured seconds
    modelled = RoundClock(profiles={}, seconds_per_example=0.5)
    measured = RoundClock(profiles={})
    # Execute / Assert: the bad field counts as 0, the round's length stays a number
    assert math.isfinite(_duration(_update(n_examples, compute_seconds), modelled))
    assert math.isfinite(_duration(_update(n_examples, compute_seconds), measured))


def test_duration_of_a_good_update_follows_the_clock() -> None:
    assert _duration(_update(10, 3.0), RoundClock(profiles={}, seconds_per_example=0.5)) == 5.0
    assert _duration(_update(10, 3.0), RoundClock(profiles={})) == 3.0
