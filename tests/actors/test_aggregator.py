"""The aggregator: what it reads off an update before the guard has seen it, and its Ray loop around the fold."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, cast

import numpy as np
import pytest

from actors.aggregator import Aggregator, aggregator_options, deliver_updates, instruction_refs, reserved_cpus
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


def test_delivered_updates_fold_as_refs_passed_whole_and_a_stale_delivery_is_dropped(ray_session) -> None:  # type: ignore[no-untyped-def]
    import ray

    @ray.remote
    def fails() -> ClientUpdate:
        raise ClientFailure(8, 2, "RuntimeError: out of memory")

    # Prepare: the three clients of the test above; a delivery left over from a round 1 that failed part-way
    updates = [_client(3, 1.0, residual=np.ones(4, np.float32)), _client(9, 3.0)]
    whole, delivered = (cast(Any, Aggregator).remote(FedAvg, LAYOUT) for _ in range(2))
    try:
        refs = [ray.put(updates[0]), fails.remote(), ray.put(updates[1])]
        want = ray.get(whole.aggregate.remote(2, np.zeros(4, np.float32), list(refs)))
        delivered.deliver.remote(1, 0, [ray.put(_client(3, 100.0))])
        # Execute: the aggregate call first, the refs after it, handed over by the driver's helper
        payload_ref, summary_ref = delivered.aggregate.remote(2, np.zeros(4, np.float32), len(refs))
        seen: list[tuple[int, int]] = []
        deliver_updates(delivered, 2, refs, lambda done, total: seen.append((done, total)))
        payload, summary = ray.get([payload_ref, summary_ref])
    finally:
        ray.kill(whole)
        ray.kill(delivered)
    # Assert: the same merge and summary; the helper took the refs over and reported progress to the end
    np.testing.assert_array_equal(payload, want[0])
    assert summary.failures == want[1].failures and repr(summary.clients) == repr(want[1].clients)
    assert refs == [] and seen[-1] == (3, 3)


def _store_objects() -> int:
    """Objects in this session's store, from Ray's own memory summary (another Ray may run on the machine)."""
    import re

    import ray
    from ray._private.internal_api import memory_summary

    summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    match = re.search(r"Plasma memory usage \d+ MiB, (\d+) objects", summary)
    assert match, "Ray's memory summary no longer reports the store's objects"
    return int(match.group(1))


def test_a_delivered_update_leaves_the_object_store_once_folded_before_the_round_ends(ray_session) -> None:  # type: ignore[no-untyped-def]
    import time

    import ray

    # Prepare: four 8 MiB updates in the store (not inlined), the driver's refs dropped once delivered
    layout = PayloadLayout.build([EntrySpec("w", "shared", None, None, (2 * 2**20,))])
    aggregator = cast(Any, Aggregator).remote(FedAvg, layout)
    try:
        start = ray.put(np.zeros(2 * 2**20, np.float32))  # in the store before the count, as the driver's payload is
        before = _store_objects()
        refs = [ray.put(ClientUpdate(client_id=c, round_idx=1, n_examples=1, delta=np.full(2 * 2**20, c, np.float32),
                                     routing=())) for c in range(4)]
        assert _store_objects() == before + 4
        payload_ref, summary_ref = aggregator.aggregate.remote(1, start, 4)
        # Execute: three of the four delivered; the round cannot end without the fourth
        for i in range(3):
            aggregator.deliver.remote(1, i, [refs[i]])
        del refs[:3]
        deadline = time.monotonic() + 60
        while _store_objects() > before + 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        # Assert: the three folded updates have left the store while the round is still open
        left = _store_objects() - before
        assert left == 1, f"{left} of the round's updates still in the store"
        assert ray.wait([summary_ref], timeout=0)[0] == []
        aggregator.deliver.remote(1, 3, [refs.pop()])
        payload = ray.get(payload_ref)
        assert payload[0] == np.float32(1.5)  # the mean of 0, 1, 2, 3
    finally:
        ray.kill(aggregator)


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
