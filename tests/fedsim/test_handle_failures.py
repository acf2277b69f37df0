"""When a round's failed, rejected and late clients stop the run (driver._handle_failures), without Ray."""

from __future__ import annotations

from typing import Any

import pytest

from actors.aggregator import RoundSummary
from aggregation.errors import RunFailed
from fedsim.config import RunConfig, load_config
from fedsim.round_loop import _handle_failures


def _cfg(*overrides: str) -> RunConfig:
    return load_config(None, list(overrides))


def _row(client: int, *, rejected: str = "", straggler: bool = False) -> dict[str, Any]:
    return {"client": client, "rejected": rejected, "straggler": straggler}


def _summary(rows: list[dict[str, Any]], failures: tuple[str, ...] = ()) -> RoundSummary:
    rejected = [f"client {r['client']}: {r['rejected']}" for r in rows if r["rejected"] and not r["straggler"]]
    return RoundSummary(round_idx=2, report={}, clients=rows, failures=list(failures), rejected=rejected,
                        stragglers=[r["client"] for r in rows if r["straggler"]])


def test_every_update_rejected_stops_the_run_naming_the_first_reason() -> None:
    # Prepare
    rows = [_row(c, rejected="n_examples is nan, must be a finite number > 0") for c in (3, 4)]

    # Execute / Assert
    with pytest.raises(RunFailed) as caught:
        _handle_failures(_cfg(), 2, _summary(rows))
    assert str(caught.value) == "round 2: every update was rejected (2 of 2); first: client 3: n_examples is nan, " \
                                "must be a finite number > 0"


def test_one_merged_update_lets_the_round_go_on() -> None:
    rows = [_row(0, rejected="delta has NaN or Inf values"), _row(1), _row(2, straggler=True)]
    _handle_failures(_cfg(), 2, _summary(rows, failures=("client 5 round 2: boom",)))  # raises nothing


def test_failed_and_rejected_clients_with_nothing_merged_stop_the_run_under_the_drop_policy() -> None:
    # Prepare
    rows = [_row(1, rejected="delta has NaN or Inf values")]

    summary = _summary(rows, failures=("client 0 round 2: boom",))

    # Execute / Assert
    with pytest.raises(RunFailed) as caught:
        _handle_failures(_cfg("workers.on_client_failure=drop"), 2, summary)
    assert str(caught.value) == ("round 2: no update was merged (1 failed, 1 rejected; 2 clients); first rejected: "
                                 "client 1: delta has NaN or Inf values; first failed: client 0 round 2: boom")


def test_every_update_late_stops_the_run_naming_the_deadline() -> None:
    cfg = _cfg("system.policy=deadline", "system.deadline_s=5")
    with pytest.raises(RunFailed, match=r"every update came after the deadline \(system.deadline_s=5.0\).*\(2 of 2\)"):
        _handle_failures(cfg, 2, _summary([_row(0, straggler=True), _row(1, straggler=True)]))


def test_a_late_update_that_is_also_bad_counts_as_late() -> None:
    """A straggler is never merged, so the guard's verdict on it is recorded but not counted as a rejection."""
    rows = [_row(0, straggler=True, rejected="delta has NaN or Inf values"), _row(1, straggler=True)]
    with pytest.raises(RunFailed, match=r"every update came after the deadline .*\(2 of 2\)"):
        _handle_failures(_cfg("system.policy=deadline", "system.deadline_s=5"), 2, _summary(rows))


def test_every_client_failing_still_reads_as_before() -> None:
    with pytest.raises(RunFailed, match=r"^round 2: every client failed; first: client 0 round 2: boom$"):
        _handle_failures(_cfg(), 2, _summary([], failures=("client 0 round 2: boom",)))


def test_the_stop_policy_stops_on_one_failure_even_when_others_merged() -> None:
    summary = _summary([_row(1)], failures=("client 0 round 2: boom",))
    with pytest.raises(RunFailed, match=r"^round 2: 1 client\(s\) failed; first: client 0 round 2: boom$"):
        _handle_failures(_cfg("workers.on_client_failure=stop"), 2, summary)


def test_an_empty_cohort_is_not_a_failure() -> None:
    """Nobody online (availability < 1) samples nobody: nothing was sent, so nothing was refused."""
    _handle_failures(_cfg(), 2, _summary([]))  # raises nothing
