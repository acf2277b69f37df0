"""The aggregator: what it reads off an update before the guard has seen it, and its Ray loop around the fold."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, cast

import numpy as np
import pytest

from actors.aggregator import Aggregator, aggregator_options, instruction_refs, reserved_cpus
from aggregation import ClientInstructions, EntrySpec, FedAvg, PayloadLayout
from aggregation.errors import ClientFailure
from aggregation.messages import ClientUpdate
from aggregation.round_fold import RoundFold, simulated_duration
from fedsim.sim.clock import DeviceProfile, RoundClock


def _update(n_examples: float, compute_seconds: float) -> ClientUpdate:
    return ClientUpdate(client_id=0, round_idx=1, n_examples=n_examples, delta=np.zeros(2, np.float32), routing=(),
                        compute_seconds=compute_seconds, bytes_down={"shared": 8}, bytes_up={"shared": 8})


@pytest.mark.parametrize(("n_examples", "compute_seconds"), [(math.nan, 1.0), (-4, 1.0), (10, math.nan), (10, -1.0)])
def test_duration_of_an_update_the_guard_will_reject_is_finite(n_examples: float, compute_seconds: float) -> None:
    # Prepare: a clock that models compute from the examples, and one that uses the measured seconds
    modelled = RoundClock(profiles={}, seconds_per_example=0.5)
    measured = RoundClock(profiles={})
    # Execute / Assert: the bad field counts as 0, the round's length stays a number
    assert math.isfinite(simulated_duration(_update(n_examples, compute_seconds), modelled))
    assert math.isfinite(simulated_duration(_update(n_examples, compute_seconds), measured))


def test_duration_of_a_good_update_follows_the_clock() -> None:
    assert simulated_duration(_update(10, 3.0), RoundClock(profiles={}, seconds_per_example=0.5)) == 5.0
    assert simulated_duration(_update(10, 3.0), RoundClock(profiles={})) == 3.0


def test_one_aggregator_cpu_reserves_none_and_keeps_the_actors_own_options() -> None:
    # Execute / Assert: num_cpus=0 from the class, one thread (Ray's OMP_NUM_THREADS=1)
    assert reserved_cpus(1) == 0
    assert aggregator_options(1, {"OMP_NUM_THREADS": "1"}) == {}


def test_more_aggregator_cpus_are_reserved_and_the_process_starts_with_their_threads() -> None:
    # Prepare
    env = {"RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": "3"}

    # Execute
    options = aggregator_options(3, env)

    # Assert
    assert reserved_cpus(3) == 3
    assert options == {"num_cpus": 3, "runtime_env": {"env_vars": env}}
    assert options["runtime_env"]["env_vars"] is not env  # a copy: Ray may keep it


LAYOUT = PayloadLayout.build([EntrySpec("w", "shared", None, None, (4,))])


def _client(cid: int, value: float, residual: np.ndarray | None = None) -> ClientUpdate:
    return ClientUpdate(client_id=cid, round_idx=2, n_examples=10, delta=np.full(4, value, np.float32), routing=(),
                        metrics={"train_loss": (5.0, 4.0)}, residual=residual)


def test_instruction_refs_are_one_ref_per_client_for_any_cohort_size(ray_session) -> None:  # type: ignore[no-untyped-def]
    import ray

    # Prepare: client 5 has an error-feedback residual kept for it
    aggregator = cast(Any, Aggregator).remote(FedAvg, LAYOUT)
    residual = np.arange(4, dtype=np.float32)
    ray.get(aggregator.load_state_dict.remote({"strategy": {}, "residuals": {5: residual}}))
    try:
        # Execute
        got = {n: instruction_refs(aggregator, 2, list(range(3, 3 + n)), [7] * n) for n in (0, 1, 3)}
        # Assert: refs, not values; each resolves to its own client's instructions (a single client included)
        assert got[0] == []
        for n in (1, 3):
            assert len(got[n]) == n and all(isinstance(r, ray.ObjectRef) for r in got[n])
            instructions = ray.get(got[n])
            assert all(isinstance(i, ClientInstructions) for i in instructions)
            assert [(i.client_id, i.round_idx, i.seed) for i in instructions] == [(3 + k, 2, 7) for k in range(n)]
        with_residual = ray.get(got[3][2])
        np.testing.assert_array_equal(with_residual.residual, residual)
        assert ray.get(got[3][0]).residual is None
    finally:
        ray.kill(aggregator)


def test_aggregate_folds_refs_as_the_fold_does_and_records_a_failed_client(ray_session) -> None:  # type: ignore[no-untyped-def]
    import ray

    @ray.remote
    def fails() -> ClientUpdate:
        raise ClientFailure(8, 2, "RuntimeError: out of memory")

    # Prepare: three clients in cohort order, the middle one failed
    updates = [_client(3, 1.0, residual=np.ones(4, np.float32)), _client(9, 3.0)]
    aggregator = cast(Any, Aggregator).remote(FedAvg, LAYOUT)
    residuals: dict[int, np.ndarray] = {}
    fold = RoundFold(FedAvg(LAYOUT), LAYOUT, np.zeros(4, np.float32), round_idx=2, cohort_size=3,
                     residuals=residuals)
    fold.arrive(0, updates[0])
    fold.arrive(1, "client 8 round 2: RuntimeError: out of memory")
    fold.arrive(2, updates[1])
    want, want_summary = fold.finish()
    try:
        # Execute
        refs = [ray.put(updates[0]), fails.remote(), ray.put(updates[1])]
        payload_ref, summary_ref = aggregator.aggregate.remote(2, np.zeros(4, np.float32), refs)
        payload, summary = ray.get([payload_ref, summary_ref])
        state = ray.get(aggregator.state_dict.remote())
    finally:
        ray.kill(aggregator)
    # Assert
    np.testing.assert_array_equal(payload, want)
    assert summary.failures == want_summary.failures == ["client 8 round 2: RuntimeError: out of memory"]
    assert repr(summary.clients) == repr(want_summary.clients)  # repr: the rows hold NaNs
    assert summary.metrics == {"train_loss": (10.0, 8.0)}
    assert summary.aggregator_peak_rss_mib > 0  # the actor measures itself
    # the round's seconds by phase: the fold's two, and the actor's wait and fetch around them
    assert set(want_summary.aggregator_seconds) == {"fold", "merge"}
    assert set(summary.aggregator_seconds) == {"wait", "get", "fold", "merge"}
    assert all(s >= 0 for s in summary.aggregator_seconds.values()) and summary.aggregator_seconds["wait"] > 0
    assert list(state["residuals"]) == list(residuals) == [3]


def test_the_clock_given_at_the_start_times_every_round(ray_session) -> None:  # type: ignore[no-untyped-def]
    import ray

    # Prepare: client 9's device is 10× slower; a 5 s deadline, handed to the actor once
    clock = RoundClock({9: DeviceProfile(speed_factor=10.0)}, "deadline", deadline_s=5.0, seconds_per_example=0.1)
    aggregator = cast(Any, Aggregator).remote(FedAvg, LAYOUT, clock=clock)
    try:
        for r in (2, 3):
            # Execute: two rounds, neither naming a clock
            refs = [ray.put(replace(_client(3, 1.0), round_idx=r)), ray.put(replace(_client(9, 3.0), round_idx=r))]
            durations = ray.get(aggregator.durations.remote(list(refs)))
            payload, summary = ray.get(list(aggregator.aggregate.remote(r, np.zeros(4, np.float32), refs)))
            # Assert: 10 examples × 0.1 s, and 10× that for client 9, who is late for the deadline
            assert durations == [1.0, 10.0]
            assert summary.stragglers == [9] and summary.sim_round_s == 5.0
            np.testing.assert_array_equal(payload, np.ones(4, np.float32))
    finally:
        ray.kill(aggregator)


def test_stale_updates_count_with_the_factor_they_are_given(ray_session) -> None:  # type: ignore[no-untyped-def]
    import ray

    # Prepare: two updates of 10 examples, the second three versions stale and discounted by 0.5
    aggregator = cast(Any, Aggregator).remote(FedAvg, LAYOUT)
    refs = [ray.put(_client(3, 1.0)), ray.put(replace(_client(9, 4.0), round_idx=1))]
    try:
        # Execute
        payload, summary = ray.get(list(aggregator.aggregate.remote(4, np.zeros(4, np.float32), refs,
                                                                    [(0, 1.0), (3, 0.5)])))
    finally:
        ray.kill(aggregator)
    # Assert: weights 10 and 5, so (10·1 + 5·4) / 15 = 2; the clients table keeps τ
    np.testing.assert_allclose(payload, np.full(4, 2.0, np.float32))
    assert [(c["client"], c["staleness"]) for c in summary.clients] == [(3, 0), (9, 3)]
