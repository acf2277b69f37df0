"""The round fold without Ray: arrival order, the guard, stragglers, staleness, residuals and summed metrics."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from aggregation import ClientUpdate, FedAvg, PayloadLayout, RoundResult, RoutingStats, Strategy, UpdateReader
from aggregation.round_fold import RoundFold, RoundSummary
from fedsim.sim.clock import DeviceProfile, RoundClock

ROUND = 3


class Recorder(Strategy):
    """A strategy that keeps what ``add`` was given (the update as the fold hands it over) and changes nothing."""

    name = "recorder"

    def begin(self, global_payload: np.ndarray, *, round_idx: int) -> None:
        super().begin(global_payload, round_idx=round_idx)
        self.added: list[ClientUpdate] = []

    def add(self, reader: UpdateReader) -> None:
        self.added.append(self._checked(reader))

    def finish(self) -> RoundResult:
        assert self._global is not None
        return RoundResult(self._global.copy(), {}, {u.client_id: 1.0 for u in self.added})


def _update(
    client: int, delta: Sequence[float], *, n: float = 10, loss: tuple[float, float] | None = None,
    compute_s: float = 1.0, residual: np.ndarray | None = None, routing: tuple[RoutingStats, ...] = (),
    round_idx: int = ROUND, metrics: dict[str, tuple[float, float]] | None = None,
) -> ClientUpdate:
    return ClientUpdate(
        client_id=client, round_idx=round_idx, n_examples=n, delta=np.array(delta, dtype=np.float32),
        routing=routing, metrics={"train_loss": loss if loss is not None else (2.0 * n, float(n)), **(metrics or {})},
        compute_seconds=compute_s, bytes_down={"shared": 16}, bytes_up={"shared": 16}, residual=residual,
    )


def _fold(
    strategy: Strategy, layout: PayloadLayout, arrivals: Sequence[tuple[int, ClientUpdate | str]], *,
    residuals: dict[int, np.ndarray] | None = None, **options: Any,
) -> tuple[np.ndarray, RoundSummary]:
    fold = RoundFold(strategy, layout, np.zeros(layout.total, np.float32), round_idx=ROUND,
                     cohort_size=len(arrivals), residuals={} if residuals is None else residuals, **options)
    for position, result in arrivals:
        fold.arrive(position, result)
    return fold.finish()


# Float32 values whose float64 running sum depends on the order: 1e17 + 1 rounds back to 1e17.
ORDER_SENSITIVE = [[1e17, 1.0, 1.0, 1e17], [1.0, 1e17, -1e17, 1.0], [-1e17, 1.0, 1e17, -1e17], [1.0, -1e17, 1.0, 1.0]]


def test_merged_payload_is_bit_identical_for_every_arrival_order(layout4: PayloadLayout) -> None:
    # Prepare: four updates whose merge depends on the order they are added in
    cohort = [_update(c, d, n=1) for c, d in enumerate(ORDER_SENSITIVE)]
    reference, ref_summary = _fold(FedAvg(layout4), layout4, list(enumerate(cohort)))
    shuffled = [cohort[i] for i in (3, 1, 0, 2)]
    other_order, _ = _fold(FedAvg(layout4), layout4, list(enumerate(shuffled)))
    assert other_order.tobytes() != reference.tobytes()  # the data can tell the orders apart
    # Execute / Assert: every arrival order of the same cohort folds to the same bits
    for order in itertools.permutations(range(4)):
        payload, summary = _fold(FedAvg(layout4), layout4, [(i, cohort[i]) for i in order])
        assert payload.tobytes() == reference.tobytes(), order
        assert [c["client"] for c in summary.clients] == [0, 1, 2, 3]
        assert summary.metrics == ref_summary.metrics


def test_update_the_guard_rejects_is_recorded_not_merged_and_loses_its_residual(layout4: PayloadLayout) -> None:
    # Prepare: client 1 sends a NaN, client 2 a delta over the norm bound; 0 and 1 had residuals
    old = {0: np.full(4, 9.0, np.float32), 1: np.full(4, 9.0, np.float32)}
    sent = np.full(4, 0.5, np.float32)
    cohort = [_update(0, [1, 1, 1, 1], residual=sent), _update(1, [math.nan, 0, 0, 0], residual=sent),
              _update(2, [30, 0, 0, 0])]
    residuals = dict(old)
    # Execute
    payload, summary = _fold(FedAvg(layout4), layout4, list(enumerate(cohort)), residuals=residuals,
                             max_update_norm=10.0)
    # Assert
    np.testing.assert_array_equal(payload, np.ones(4, np.float32))  # client 0 alone
    assert summary.rejected == ["client 1: delta has NaN or Inf values",
                                "client 2: update norm 30 exceeds the bound 10"]
    assert [(c["client"], bool(c["rejected"]), c["weight"]) for c in summary.clients] == [
        (0, False, 1.0), (1, True, 0.0), (2, True, 0.0)]
    assert set(residuals) == {0}  # the rejected client's residual is dropped, client 2 never had one
    np.testing.assert_array_equal(residuals[0], sent)  # the merged client's new residual replaces its old one
    assert summary.metrics["train_loss"] == (20.0, 10.0)  # only the accepted client's pair


def test_failures_are_recorded_and_the_rest_merged(layout4: PayloadLayout) -> None:
    # Prepare / Execute: position 1 failed, and its reason arrives first
    payload, summary = _fold(FedAvg(layout4), layout4, [
        (1, "client 5 round 3: RuntimeError: out of memory"), (2, _update(7, [4, 4, 4, 4])),
        (0, _update(3, [2, 2, 2, 2])),
    ])
    # Assert
    assert summary.failures == ["client 5 round 3: RuntimeError: out of memory"]
    assert [c["client"] for c in summary.clients] == [3, 7]
    np.testing.assert_array_equal(payload, np.full(4, 3.0, np.float32))


def test_deadline_stragglers_are_recorded_not_merged(layout4: PayloadLayout) -> None:
    # Prepare: client 1's device is 10× slower, so its 1 s of compute takes 10 s against a 5 s deadline
    clock = RoundClock({1: DeviceProfile(speed_factor=10.0)}, "deadline", deadline_s=5.0)
    residuals: dict[int, np.ndarray] = {}
    late = _update(1, [8, 8, 8, 8], residual=np.ones(4, np.float32))
    # Execute: the straggler arrives first
    payload, summary = _fold(FedAvg(layout4), layout4, [(1, late), (0, _update(0, [2, 2, 2, 2]))],
                             residuals=residuals, clock=clock)
    # Assert
    np.testing.assert_array_equal(payload, np.full(4, 2.0, np.float32))
    assert summary.stragglers == [1] and summary.sim_round_s == 5.0
    assert [(c["client"], c["straggler"], c["sim_duration_s"], c["weight"]) for c in summary.clients] == [
        (0, False, 1.0, 1.0), (1, True, 10.0, 0.0)]
    assert summary.rejected == [] and residuals == {}  # late is not rejected, but its residual is not kept
    assert summary.metrics["train_loss"] == (40.0, 20.0)  # a straggler's sound metrics count, as the driver's did


def test_over_select_keeps_the_fastest_and_folds_only_once_all_arrived(layout4: PayloadLayout) -> None:
    # Prepare: three clients, keep 2; client 2 (position 0) is the slowest on the simulated clock
    clock = RoundClock({}, "over_select", keep=2)
    cohort = [_update(2, [9, 9, 9, 9], compute_s=7.0), _update(4, [1, 1, 1, 1], compute_s=2.0),
              _update(6, [3, 3, 3, 3], compute_s=3.0)]
    strategy = Recorder(layout4)
    fold = RoundFold(strategy, layout4, np.zeros(4, np.float32), round_idx=ROUND, cohort_size=3, residuals={},
                     clock=clock)
    # Execute / Assert: positions 0 and 1 arrive in order, yet nothing is folded before the last one is in
    fold.arrive(0, cohort[0])
    fold.arrive(1, cohort[1])
    assert strategy.added == []
    fold.arrive(2, cohort[2])
    assert [u.client_id for u in strategy.added] == [4, 6]
    _, summary = fold.finish()
    assert summary.stragglers == [2] and summary.sim_round_s == 3.0
    assert [(c["client"], c["straggler"]) for c in summary.clients] == [(2, True), (4, False), (6, False)]


def test_staleness_discount_scales_weight_and_routing_stats(layout4: PayloadLayout) -> None:
    # Prepare: the same update fresh (τ = 0) and three versions stale (τ = 3, discounted by (1 + 3)^-0.5 = 0.5)
    stats = RoutingStats(8, np.array([2.0, 6.0]), np.array([4.0, 12.0]), np.array([1.0, 3.0]), np.ones((2, 3)))
    cohort = [_update(c, [1, 1, 1, 1], n=10, routing=(stats,), round_idx=ROUND - c) for c in (0, 3)]
    strategy = Recorder(layout4)
    # Execute
    _, summary = _fold(strategy, layout4, [(1, cohort[1]), (0, cohort[0])], staleness=[(0, 1.0), (3, 0.5)])
    # Assert: the stale update is merged into this round, its sums halved, its means unchanged
    fresh, stale = strategy.added
    assert (fresh.n_examples, stale.n_examples) == (10, 5.0)
    assert stale.round_idx == ROUND
    assert stale.routing[0].n_tokens == 4.0
    np.testing.assert_array_equal(stale.routing[0].counts, [2.0, 6.0])
    np.testing.assert_array_equal(stale.routing[0].x_sum, np.full((2, 3), 0.5))
    np.testing.assert_array_equal(summary.routing_p_bar[3][0], stats.p_bar)
    # the clients table keeps the undiscounted n_examples and says how stale each update was
    assert [(c["n_examples"], c["staleness"]) for c in summary.clients] == [(10, 0), (10, 3)]



def test_scaled_routing_stats_keep_their_means() -> None:
    s = RoutingStats(10, np.array([4.0, 6.0]), np.array([8.0, 12.0]), np.array([2.0, 3.0]), np.ones((2, 3)) * 4)
    half = s.scaled(0.5)
    assert half.n_tokens == 5 and half.counts.tolist() == [4.0, 6.0]
    np.testing.assert_allclose(half.p_bar, s.p_bar)
    np.testing.assert_allclose(half.margin, s.margin)
    np.testing.assert_allclose(half.mu, s.mu)

def test_summed_train_loss_weighs_the_rows_trained_not_the_rows_held(layout4: PayloadLayout) -> None:
    # Prepare: local_steps capped client 0 at 16 of its 100 rows (mean loss 2); client 1 trained all 10 (mean 1);
    # client 2 is rejected, so its pair stays out
    cohort = [
        _update(0, [1, 1, 1, 1], n=100, loss=(32.0, 16.0), metrics={"compression_error": (0.1 * 100, 100.0)}),
        _update(1, [1, 1, 1, 1], n=10, loss=(10.0, 10.0), metrics={"compression_error": (0.4 * 10, 10.0)}),
        _update(2, [math.inf, 0, 0, 0], n=50, loss=(500.0, 50.0)),
    ]
    # Execute
    _, summary = _fold(FedAvg(layout4), layout4, [(2, cohort[2]), (1, cohort[1]), (0, cohort[0])])
    # Assert: Σ loss / Σ rows trained = 42 / 26, where the old Σ mean·n_examples / Σ n_examples gave 210 / 110
    assert summary.metrics["train_loss"] == (42.0, 26.0)
    assert summary.metric("train_loss") == pytest.approx(42 / 26)
    old = sum(c["train_loss"] * c["n_examples"] for c in summary.clients[:2]) / 110
    assert old == pytest.approx(210 / 110) and abs(old - summary.metric("train_loss")) > 0.2
    assert summary.metric("compression_error") == pytest.approx(14 / 110)
    assert [c["train_loss"] for c in summary.clients] == [2.0, 1.0, 10.0]  # the clients table keeps each mean
    assert math.isnan(summary.metric("alltoall_seconds"))  # absent: nan


def test_arrivals_outside_the_cohort_or_twice_and_early_finish_raise(layout4: PayloadLayout) -> None:
    fold = RoundFold(FedAvg(layout4), layout4, np.zeros(4, np.float32), round_idx=ROUND, cohort_size=3,
                     residuals={})
    fold.arrive(0, _update(0, [1, 1, 1, 1]))
    fold.arrive(2, "client 2: failed")
    with pytest.raises(ValueError, match="position 0 arrived twice"):
        fold.arrive(0, _update(0, [1, 1, 1, 1]))
    with pytest.raises(ValueError, match="position 2 arrived twice"):
        fold.arrive(2, "again")
    with pytest.raises(ValueError, match="position 3 .* outside the cohort of 3"):
        fold.arrive(3, "client 9: failed")
    with pytest.raises(RuntimeError, match=r"round 3: finish\(\) before positions \[1\]"):
        fold.finish()


def test_empty_round_returns_the_global_payload(layout4: PayloadLayout) -> None:
    payload, summary = _fold(FedAvg(layout4), layout4, [])
    np.testing.assert_array_equal(payload, np.zeros(4, np.float32))
    assert summary.clients == [] and summary.metrics == {} and summary.sim_round_s == 0.0
