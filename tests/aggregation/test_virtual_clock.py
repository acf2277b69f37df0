"""The simulated clock: durations from profiles, round policies, availability, over-selection."""

from __future__ import annotations

import math

import pytest

from aggregation.virtual_clock import DeviceProfile, RoundClock, available, over_selected, random_profiles, select


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


def test_over_selected_samples_ceil_k_times_one_plus_r_within_the_online():
    assert over_selected(10, 0.3, 100) == 13 and over_selected(10, 0.3, 11) == 11 and over_selected(4, 0.0, 9) == 4


def test_random_profiles_slow_down_a_seeded_share_of_clients():
    profiles = random_profiles(10, seed=1, slow_fraction=0.3, slow_factor=5.0, uplink_bps=1e6)
    slow = [c for c, p in profiles.items() if p.speed_factor == 5.0]
    assert len(slow) == 3 and slow == [
        c for c, p in random_profiles(10, seed=1, slow_fraction=0.3, slow_factor=5.0).items() if p.speed_factor == 5.0
    ]
    assert all(p.uplink_bps == 1e6 and math.isinf(p.downlink_bps) for p in profiles.values())


def test_availability_is_seeded_per_round_and_respects_the_probability():
    a, b = (available(1000, round_idx=3, seed=0, probability=0.25),
            available(1000, round_idx=3, seed=0, probability=0.25))
    assert a == b and 200 < len(a) < 300
    assert a != available(1000, round_idx=4, seed=0, probability=0.25)
    assert available(5, round_idx=1, seed=0, probability=1.0) == [0, 1, 2, 3, 4]
