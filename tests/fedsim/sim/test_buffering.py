"""FedBuff's schedule math: the staleness discount and which arrivals form a server step."""

from __future__ import annotations

import pytest

from fedsim.sim.buffering import Flight, discounts, next_buffer, staleness_discount


def test_staleness_discount_is_polynomial_and_one_when_fresh() -> None:
    assert staleness_discount(0, 0.5) == 1.0
    assert staleness_discount(3, 0.5) == pytest.approx(0.5)  # (1 + 3)^-0.5
    assert staleness_discount(1, 1.0) == pytest.approx(0.5)
    assert staleness_discount(7, 0.0) == 1.0
    with pytest.raises(ValueError, match="staleness -1"):
        staleness_discount(-1, 0.5)


def test_discounts_pair_each_staleness_with_its_factor_in_order() -> None:
    assert discounts([0, 3, 1], 0.5) == [(0, 1.0), (3, staleness_discount(3, 0.5)), (1, staleness_discount(1, 0.5))]
    assert discounts([], 0.5) == []


def test_next_buffer_takes_the_first_arrivals_on_the_simulated_clock() -> None:
    # Prepare: arrivals at 5, 3, 3 and 1.5 (client 9 started late but is fast)
    flights = [Flight(1, 0.0, 0, "a"), Flight(4, 0.0, 0, "b"), Flight(2, 1.0, 1, "c"), Flight(9, 1.0, 1, "d")]
    durations = [5.0, 3.0, 2.0, 0.5]
    # Execute
    got = next_buffer(flights, durations, 3)
    # Assert: by arrival time, the tie at 3.0 broken by client id
    assert [(f.client, t) for f, t in got] == [(9, 1.5), (2, 3.0), (4, 3.0)]
    with pytest.raises(ValueError, match="4 flights but 3 durations"):
        next_buffer(flights, durations[:3], 2)
