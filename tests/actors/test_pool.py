"""Shard assignment and resource checks of the worker pool (pure parts; the pool itself runs in e2e)."""

from __future__ import annotations

import pytest

from actors.pool import resolve_num_workers, round_robin, shard_by_work
from aggregation.errors import ConfigError
from fedsim.config import TrainConfig


def test_shard_by_work_balances_longest_first() -> None:
    # Prepare: work 10, 1, 7, 3, 5 over 2 workers -> LPT: 10→w0, 7→w1, 5→w1, 3→w0, 1→w1 (loads 13, 13)
    work = [10, 1, 7, 3, 5]
    # Execute
    shards = shard_by_work(work, 2)
    # Assert
    assert shards == [[0, 3], [2, 4, 1]]
    assert sorted(p for s in shards for p in s) == list(range(5))


def test_shard_by_work_more_workers_than_clients_leaves_empty_shards() -> None:
    assert shard_by_work([4, 2], 3) == [[0], [1], []]


def test_clients_capped_at_local_steps_weigh_what_they_train_not_what_they_hold() -> None:
    # Prepare: one client holds 2000 examples, nine hold 200; 8 steps of 16 rows cap every one of them at 128 rows
    sizes = [2000] + [200] * 9
    capped = TrainConfig(local_steps=8, batch_size=16, routing_stats="off")
    # Execute
    by_size = shard_by_work(sizes, 2)
    by_work = shard_by_work([capped.client_work(n) for n in sizes], 2)
    # Assert: by size, the big client would train alone while the other worker trains nine; by work, 5 and 5
    assert sorted(len(s) for s in by_size) == [1, 9]
    assert sorted(len(s) for s in by_work) == [5, 5]


def test_client_work_counts_epochs_the_step_cap_and_the_statistics_pass() -> None:
    assert TrainConfig(local_epochs=2, routing_stats="off").client_work(30) == 60
    assert TrainConfig(local_epochs=2, local_steps=3, batch_size=8, routing_stats="off").client_work(30) == 24
    # fewer rows than the cap
    assert TrainConfig(local_steps=3, batch_size=8, routing_stats="off").client_work(10) == 10
    assert TrainConfig(routing_stats="after").client_work(30) == 45  # one forward pass over 30 ≈ 15 training rows


@pytest.mark.ray
def test_resolve_num_workers_rejects_what_does_not_fit(ray_session) -> None:  # type: ignore[no-untyped-def]
    assert resolve_num_workers(0, cpus_per_worker=1, gpus_per_worker=0) == 2
    assert resolve_num_workers(0, cpus_per_worker=0.5, gpus_per_worker=0) == 4
    with pytest.raises(ConfigError, match=r"workers.num_workers: 3 workers .* at most 2"):
        resolve_num_workers(3, cpus_per_worker=1, gpus_per_worker=0)
    with pytest.raises(ConfigError, match="no worker fits"):
        resolve_num_workers(0, cpus_per_worker=1, gpus_per_worker=1)


def test_resolve_num_workers_counts_groups_per_node(ray_session) -> None:  # type: ignore[no-untyped-def]
    # one node with 2 CPUs: one group of two 1-CPU workers fits, two do not
    assert resolve_num_workers(0, cpus_per_worker=1, gpus_per_worker=0, group_size=2) == 1
    with pytest.raises(ConfigError, match="2 groups × 2 workers"):
        resolve_num_workers(2, cpus_per_worker=1, gpus_per_worker=0, group_size=2)
    with pytest.raises(ConfigError, match="no group fits"):
        resolve_num_workers(0, cpus_per_worker=1, gpus_per_worker=1, group_size=4)


def test_round_robin_sends_each_workers_first_client_before_any_second_and_keeps_shard_order() -> None:
    # Prepare
    shards = [[0, 3], [2, 4, 1], []]
    # Execute
    order = round_robin(shards)
    # Assert
    assert order == [(0, 0), (1, 2), (0, 3), (1, 4), (1, 1)]
    assert [p for w, p in order if w == 1] == shards[1]
    assert round_robin([[], []]) == []
