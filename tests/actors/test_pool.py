"""Shard assignment and resource checks of the worker pool (pure parts; the pool itself runs in e2e)."""

from __future__ import annotations

import pytest

from actors.pool import resolve_num_workers, shard_by_size
from aggregation.errors import ConfigError


def test_shard_by_size_balances_longest_first() -> None:
    # Prepare: sizes 10, 1, 7, 3, 5 over 2 workers -> LPT: 10→w0, 7→w1, 5→w1, 3→w0, 1→w1 (loads 13, 13)
    sizes = [10, 1, 7, 3, 5]
    # Execute
    shards = shard_by_size(sizes, 2)
    # Assert
    assert shards == [[0, 3], [2, 4, 1]]
    assert sorted(p for s in shards for p in s) == list(range(5))


def test_shard_by_size_more_workers_than_clients_leaves_empty_shards() -> None:
    assert shard_by_size([4, 2], 3) == [[0], [1], []]


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
