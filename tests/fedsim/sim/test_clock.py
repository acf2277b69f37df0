"""The simulated clock: durations from profiles, round policies, and the fold's clock of no simulation."""

from __future__ import annotations

import pytest

from aggregation.sim_clock import OnTimeClock, RoundTiming
from fedsim.sim.clock import DeviceProfile, Policy, RoundClock, select


def test_duration_adds_scaled_compute_transfer_and_latency():
    # 10 s compute on a 3× slower device, 2 MB down at 1 MB/s, 1 MB up at 0.5 MB/s, 0.25 s latency
    profile = DeviceProfile(speed_factor=3.0, downlink_bps=1e6, uplink_bps=5e5, latency_s=0.25)
    assert profile.duration(10.0, 2_000_000, 1_000_000) == pytest.approx(30 + 2 + 2 + 0.25)
    assert DeviceProfile().duration(4.0, 10**9, 10**9) == 4.0  # free links


def test_per_example_compute_model_is_reproducible():
    clock = RoundClock({7: DeviceProfile(speed_factor=2.0)}, seconds_per_example=0.01, epochs=3)
    # measured compute seconds are ignored: 0.01 × 50 examples × 3 epochs × 2
    assert clock.duration(7, 50, 123.0, 0, 0) == pytest.approx(3.0)
    assert RoundClock({}).duration(1, 50, 1.5, 0, 0) == 1.5  # measured, on a default device


DURATIONS = {0: 5.0, 1: 1.0, 2: 9.0, 3: 1.0, 4: 3.0}


def test_wait_all_keeps_everyone_and_lasts_as_long_as_the_slowest():
    timing = select(DURATIONS, "wait_all")
    assert timing.kept == set(DURATIONS) and not timing.stragglers and timing.round_seconds == 9.0


def test_deadline_drops_exactly_the_late_ones_and_the_round_lasts_the_deadline():
    timing = select(DURATIONS, "deadline", deadline_s=5.0)
    assert timing.kept == {0, 1, 3, 4} and timing.stragglers == {2} and timing.round_seconds == 5.0
    assert select(DURATIONS, "deadline", deadline_s=10.0).round_seconds == 9.0  # nobody late: the slowest


def test_over_selection_keeps_the_first_k_to_finish_ties_by_client_id():
    timing = select(DURATIONS, "over_select", keep=3)
    assert timing.kept == {1, 3, 4} and timing.stragglers == {0, 2} and timing.round_seconds == 3.0
    assert select(DURATIONS, "over_select", keep=1).kept == {1}


@pytest.mark.parametrize("policy", ["wait_all", "deadline", "over_select"])
def test_round_clock_timing_is_select_under_its_policy(policy: Policy) -> None:
    clock = RoundClock({}, policy, deadline_s=5.0, keep=3)
    assert clock.timing(DURATIONS) == select(DURATIONS, policy, deadline_s=5.0, keep=3)


def test_on_time_clock_gives_the_numbers_of_a_round_clock_without_profiles() -> None:
    # Prepare: what the fold and the aggregator use when no clock is given, against RoundClock(profiles={})
    plain, on_time = RoundClock(profiles={}), OnTimeClock()
    # Execute / Assert: the same durations (measured compute only) and the same wait_all timing
    for args in [(3, 10, 1.5, 10**6, 10**5), (0, 0, 0, 0, 0), (9, 7.0, 0.25, 5, 0)]:
        assert on_time.duration(*args) == plain.duration(*args)
        assert type(on_time.duration(*args)) is type(plain.duration(*args))
    assert (on_time.policy, on_time.deadline_s) == (plain.policy, plain.deadline_s)
    assert on_time.timing(DURATIONS) == plain.timing(DURATIONS) == RoundTiming(frozenset(DURATIONS), frozenset(), 9.0)
    assert on_time.timing({}) == plain.timing({})
