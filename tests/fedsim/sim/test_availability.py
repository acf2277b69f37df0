"""Who is online when a round samples, and how many over-selection samples."""

from __future__ import annotations

import logging

import pytest

from aggregation.errors import RunFailed
from fedsim.config import load_config
from fedsim.sim.availability import AvailabilityTrace, available, online_at_round, over_selected


def test_over_selected_samples_ceil_k_times_one_plus_r_within_the_online():
    assert over_selected(10, 0.3, 100) == 13 and over_selected(10, 0.3, 11) == 11 and over_selected(4, 0.0, 9) == 4


def test_availability_is_seeded_per_round_and_respects_the_probability():
    a, b = (available(1000, round_idx=3, seed=0, probability=0.25),
            available(1000, round_idx=3, seed=0, probability=0.25))
    assert a == b and 200 < len(a) < 300
    assert a != available(1000, round_idx=4, seed=0, probability=0.25)
    assert available(5, round_idx=1, seed=0, probability=1.0) == [0, 1, 2, 3, 4]


def test_online_at_round_without_a_trace_is_the_seeded_process_and_keeps_the_clock() -> None:
    cfg = load_config(None, ["data.num_clients=50", "system.availability=0.5", "seed=4"])
    online, at = online_at_round(cfg, None, 3, 12.5)
    assert online == available(50, round_idx=3, seed=4, probability=0.5) and at == 12.5


def test_online_at_round_waits_for_the_trace_and_fails_when_nobody_comes_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: client 0 online [10, 20) of a 100 s cycle, client 1 never
    cfg = load_config(None, ["data.num_clients=2", "clients_per_round=1"])
    trace = AvailabilityTrace({0: ((10.0, 20.0),), 1: ()}, {0: 100.0, 1: 50.0})
    # Execute / Assert: online now; nobody online at 30 s, so the round starts at 110 s
    assert online_at_round(cfg, trace, 1, 15.0) == ([0], 15.0)
    with caplog.at_level(logging.INFO, logger="fedsim"):
        assert online_at_round(cfg, trace, 2, 30.0) == ([0], 110.0)
    assert "round 2: no client online at 30.0 s on the simulated clock; waiting until 110.0 s" in caplog.text
    with pytest.raises(RunFailed, match="round 3: no client of system.availability_trace is ever online again"):
        online_at_round(cfg, AvailabilityTrace({1: ()}, {1: 50.0}), 3, 0.0)
