"""The deepspeed engine on a real local Ray: worker groups of two actors (gloo), experts sharded over them.

Tolerances as in tests/fedsim/engine/test_deepspeed_engine.py; a group of two
also splits each batch's rows between its ranks, so sums are taken in another
order: deltas to 1e-4 absolute, losses to 1e-4 relative.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray

from actors import WorkerPool
from aggregation.errors import ConfigError
from aggregation.messages import ClientInstructions
from fedsim.driver import run
from fedsim.engine.deepspeed_engine import DeepSpeedEngineSpec
from fedsim.engine.torch_engine import TorchEngineSpec
from fedsim.prepare import prepare

pytestmark = [pytest.mark.ray, pytest.mark.slow]

DS = ["engine.backend=deepspeed", "workers.num_workers=1"]


def test_group_of_two_trains_a_client_as_the_torch_engine_does(ray_session, tiny_config) -> None:  # type: ignore[no-untyped-def]
    # Prepare
    cfg = tiny_config()
    prepared = prepare(cfg)
    recipe = dict(base_path=prepared.base_path, train_path=prepared.train_path, test_path=prepared.test_path,
                  label_token_ids=prepared.label_token_ids, lora=cfg.lora, train=cfg.train)
    reference = TorchEngineSpec(**recipe)()  # type: ignore[arg-type]
    pool = WorkerPool(DeepSpeedEngineSpec(**recipe, profile_alltoall=True), num_workers=1,  # type: ignore[arg-type]
                      cpus_per_worker=1, gpus_per_worker=0, group_size=2)
    try:
        layout, initial = pool.describe()
        payload = ray.put(initial)
        rows = prepared.partitions[0]
        instr = ClientInstructions(client_id=0, round_idx=1, seed=11)
        # Execute
        [ref] = pool.submit(payload, [instr], [rows], [1.0])
        got = ray.get(ref)
        chunks = [(0, 5), (5, 9)]
        evaluated = pool.evaluate(payload, chunks)
    finally:
        pool.shutdown()
    want = reference.train(rows, reference.initial_payload, instr)
    # Assert
    assert layout == reference.layout
    np.testing.assert_array_equal(initial, reference.initial_payload)
    np.testing.assert_allclose(got.delta, want.delta, atol=1e-4, rtol=0)
    assert np.abs(want.delta).max() > 1e-3
    assert got.metrics["train_loss"][1] == want.metrics["train_loss"][1] == len(rows)
    assert got.metrics["train_loss"][0] == pytest.approx(want.metrics["train_loss"][0], rel=1e-4)
    assert got.metrics["alltoall_seconds"][0] > 0  # experts were exchanged between the two actors
    for a, b in zip(got.routing, want.routing, strict=True):  # the group summed its two ranks' statistics
        assert a.n_tokens == b.n_tokens
        np.testing.assert_array_equal(a.counts, b.counts)
    for a, b in zip(evaluated, reference.evaluate(reference.initial_payload, chunks), strict=True):
        assert (a.correct, a.count) == (b.correct, b.count)


def test_two_round_run_with_group_of_two_matches_groups_of_one(ray_session, tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Execute
    torch_run = run(tiny_config("workers.num_workers=1"), out=tmp_path / "torch").rounds
    g1 = run(tiny_config("engine.backend=deepspeed", "workers.num_workers=2"), out=tmp_path / "g1").rounds  # 2 groups
    g2 = run(tiny_config(*DS, "engine.group_size=2"), out=tmp_path / "g2").rounds
    # Assert
    assert list(g2["round"]) == [1, 2] and (g2["clients_completed"] == 6).all()
    cols = ["train_loss", "test_loss"]
    pd.testing.assert_frame_equal(g1[cols], torch_run[cols], rtol=1e-4, atol=0)
    pd.testing.assert_frame_equal(g2[cols], g1[cols], rtol=1e-4, atol=0)
    assert (g2["bytes_up"] == g1["bytes_up"]).all()


def test_groups_that_do_not_fit_fail_before_any_actor_starts(ray_session, tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # 2 groups × 2 workers × 1 CPU on a 2-CPU Ray
    cfg = tiny_config("engine.backend=deepspeed", "engine.group_size=2", "workers.num_workers=2")
    with pytest.raises(ConfigError, match=r"workers.num_workers: 2 groups × 2 workers .* at most 1"):
        run(cfg, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
