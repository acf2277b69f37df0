"""Driver pieces that need no Ray: seeds and sampling."""

from __future__ import annotations

import pytest

from fedsim.round_loop import ClientSampler
from fedsim.seeds import client_seed


def test_client_seed_depends_only_on_run_round_client() -> None:
    assert client_seed(0, 1, 2) == client_seed(0, 1, 2)
    assert len({client_seed(0, 1, 2), client_seed(0, 2, 1), client_seed(1, 1, 2), client_seed(0, 1, 3)}) == 4


def test_client_sampler_is_seeded_and_without_replacement() -> None:
    a = [ClientSampler(100, 10, seed=7).sample() for _ in range(1)]
    s1, s2 = ClientSampler(100, 10, seed=7), ClientSampler(100, 10, seed=7)
    rounds1 = [s1.sample() for _ in range(5)]
    rounds2 = [s2.sample() for _ in range(5)]
    assert rounds1 == rounds2 and rounds1[0] == a[0]
    assert all(len(set(r)) == 10 and r == sorted(r) and max(r) < 100 for r in rounds1)
    assert rounds1[0] != rounds1[1]
    assert ClientSampler(100, 10, seed=8).sample() != rounds1[0]


def test_aggregator_cpus_over_one_are_reserved_from_the_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: an embedded Ray of 4 CPUs not started yet (even where this test process already runs one)
    import ray

    from fedsim.config import load_config
    from fedsim.driver import _num_workers

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    plain = load_config(None, ["workers.ray_num_cpus=4"])
    one = load_config(None, ["workers.ray_num_cpus=4", "workers.aggregator_cpus=1"])
    reserved = load_config(None, ["workers.ray_num_cpus=4", "workers.aggregator_cpus=3"])

    # Execute / Assert: one worker per CPU left
    assert (_num_workers(plain), _num_workers(one), _num_workers(reserved)) == (4, 4, 1)
