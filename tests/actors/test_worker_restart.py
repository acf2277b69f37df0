"""A worker that Ray restarts finds its engine recipe again: the recipe never rides in the object store."""

from __future__ import annotations

import functools
import os
import signal
import time
import types

import numpy as np
import pytest

from actors.pool import WorkerPool
from actors.worker import drop_factory, load_factory, store_factory

pytestmark = pytest.mark.ray

# A picklable stand-in for an engine recipe: what ClientWorker.describe reads, no model
RECIPE = functools.partial(types.SimpleNamespace, layout="tiny layout", initial_payload=np.arange(3, dtype=np.float32))


def test_a_stored_factory_loads_until_dropped(ray_session: None) -> None:
    # Prepare
    key = store_factory(RECIPE)
    # Execute
    engine = load_factory(key)()
    drop_factory(key)
    # Assert
    assert len(key) < 64 and engine.layout == "tiny layout"
    with pytest.raises(RuntimeError, match="not in the GCS key-value store"):
        load_factory(key)


def test_a_killed_worker_restarts_and_rebuilds_its_engine(ray_session: None, capfd: pytest.CaptureFixture[str]) -> None:
    # Prepare
    pool = WorkerPool(RECIPE, num_workers=1, cpus_per_worker=1, gpus_per_worker=0, max_restarts=1, max_task_retries=1)
    try:
        first = pool.placement()[0]["pid"]
        # Execute
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while (again := pool.placement()[0]["pid"]) == first and time.monotonic() < deadline:
            time.sleep(0.5)  # a call racing the kill may still be answered by the dying process
        layout, payload = pool.describe()
    finally:
        pool.shutdown()
    # Assert
    assert again != first
    assert layout == "tiny layout" and payload.tolist() == [0.0, 1.0, 2.0]
    assert "constructor arguments in the object store" not in capfd.readouterr().err
