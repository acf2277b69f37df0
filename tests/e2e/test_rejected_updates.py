"""End to end on a real local Ray: a round that merges nothing stops the run; one that merges some goes on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aggregation.errors import RunFailed
from fedsim.driver import run

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EVERYONE = "[0,1,2,3,4,5]"  # tiny_config: 6 clients, all sampled every round


def _status(run_dir: Path) -> dict[str, str]:
    return json.loads((run_dir / "status.json").read_text())


def test_a_round_whose_every_update_is_rejected_fails_the_run(ray_session, tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Before, FedAvg merged nothing, kept the old model and the run ended `completed`."""
    # Prepare: every client returns a NaN delta in round 2 only
    cfg = tiny_config(f"faults.nan_clients={EVERYONE}", "faults.fail_rounds=[2]")
    out = tmp_path / "all-nan"

    # Execute
    with pytest.raises(RunFailed) as caught:
        run(cfg, out=out)

    # Assert
    message = "round 2: every update was rejected (6 of 6); first: client 0: delta has NaN or Inf values"
    assert str(caught.value) == message
    status = _status(out)
    assert status["status"] == "failed" and status["error"] == message
    assert pd.read_parquet(out / "rounds.parquet")["round"].tolist() == [1]  # nothing written for round 2
    log = (out / "run.log").read_text()
    assert "rejected the update of client 5: delta has NaN" in log and message in log


def test_a_round_of_failed_and_rejected_clients_fails_the_run(ray_session, tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Prepare: under the default policy (drop failed clients) two fail, the four others send NaN
    cfg = tiny_config("rounds=1", "faults.fail_clients=[0,3]", "faults.nan_clients=[1,2,4,5]")
    out = tmp_path / "failed-and-nan"

    # Execute
    with pytest.raises(RunFailed) as caught:
        run(cfg, out=out)

    # Assert
    message = str(caught.value)
    assert message.startswith("round 1: no update was merged (2 failed, 4 rejected; 6 clients); first rejected: "
                              "client 1: delta has NaN or Inf values; first failed: ")
    assert "injected fault (faults.fail_clients)" in message
    assert _status(out)["status"] == "failed"


def test_a_round_where_every_update_missed_the_deadline_fails_the_run(ray_session, tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Stragglers are not rejections, but a round of nothing but stragglers changes nothing either."""
    # Prepare: 10 s an example on the simulated clock, a deadline of 1 s: nobody makes it
    cfg = tiny_config("rounds=1", "system.policy=deadline", "system.seconds_per_example=10", "system.deadline_s=1")
    out = tmp_path / "all-late"

    # Execute
    with pytest.raises(RunFailed) as caught:
        run(cfg, out=out)

    # Assert
    assert str(caught.value) == ("round 1: every update came after the deadline (system.deadline_s=1.0) on the "
                                 "simulated clock (6 of 6): clients [0, 1, 2, 3, 4, 5]")
    assert _status(out)["status"] == "failed"


def test_a_round_with_some_rejected_updates_completes_and_counts_them(ray_session, tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Prepare: two of six clients send NaN in round 1
    cfg = tiny_config("faults.nan_clients=[1,4]", "faults.fail_rounds=[1]")
    out = tmp_path / "mixed"

    # Execute
    result = run(cfg, out=out)

    # Assert
    rounds, clients = result.rounds, result.clients
    assert _status(out)["status"] == "completed"
    assert rounds["clients_rejected"].tolist() == [2, 0] and rounds["clients_completed"].tolist() == [6, 6]
    assert all(math.isfinite(v) for v in rounds["train_loss"]) and np.isfinite(rounds["test_loss"]).all()
    first = clients[clients["round"] == 1].set_index("client")
    assert (first.loc[[1, 4], "rejected"] == "delta has NaN or Inf values").all()
    assert (first.loc[[1, 4], "weight"] == 0.0).all() and np.isclose(first["weight"].sum(), 1.0)
    # the round's examples count the updates the guard accepted
    assert rounds["examples"].iloc[0] == first.drop(index=[1, 4])["n_examples"].sum()
