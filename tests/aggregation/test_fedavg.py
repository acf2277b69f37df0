"""FedAvg: the n-weighted mean of the arriving updates, added to the global payload."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation import FedAvg, LayoutMismatch


def _f32(values) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def _run(layout, make_reader, global_payload, clients, round_idx=1):
    """Aggregate ``clients`` = [(client_id, n_examples, delta), ...] in the given order."""
    strategy = FedAvg(layout)
    strategy.begin(_f32(global_payload), round_idx=round_idx)
    for cid, n, delta in clients:
        strategy.add(make_reader(cid, round_idx, n, delta))
    return strategy.finish()


# Up to 5 clients on the 4-value layout, ids 0..4 in arrival order given by a permutation.
def _cohort(value, n_max):
    return st.integers(1, 5).flatmap(
        lambda k: st.tuples(
            st.lists(value, min_size=4, max_size=4),
            st.lists(st.tuples(st.integers(1, n_max), st.lists(value, min_size=4, max_size=4)), min_size=k, max_size=k),
            st.permutations(range(k)),
        )
    )


class TestFedAvgSuccess:
    def test_finish_returns_global_plus_n_weighted_mean_when_n_examples_are_unequal(self, layout4, make_reader):
        # Prepare: n = 1 and 3, so weights 1/4 and 3/4
        clients = [(1, 1, [4.0, 0.0, -8.0, 2.0]), (2, 3, [0.0, 4.0, 8.0, -2.0])]

        # Execute
        result = _run(layout4, make_reader, [1.0, -2.0, 0.5, 0.0], clients)

        # Assert: mean Δ = [1, 3, 4, -1]
        np.testing.assert_array_equal(result.payload, _f32([2.0, 1.0, 4.5, -1.0]))
        assert result.payload.dtype == np.float32
        assert result.client_weights == {1: 0.25, 2: 0.75}
        assert result.report == {"n_aggregated": 2.0}

    def test_finish_weights_each_client_by_its_share_of_examples_when_three_clients_arrive(self, layout4, make_reader):
        # Prepare: n = 2, 3, 5 of 10
        clients = [(10, 2, [10.0, 0.0, 0.0, 0.0]), (11, 3, [0.0, 10.0, 0.0, 0.0]), (12, 5, [0.0, 0.0, 10.0, 0.0])]

        # Execute
        result = _run(layout4, make_reader, [0.0, 0.0, 0.0, 0.0], clients)

        # Assert
        np.testing.assert_array_equal(result.payload, _f32([2.0, 3.0, 5.0, 0.0]))
        assert result.client_weights == pytest.approx({10: 0.2, 11: 0.3, 12: 0.5})

    def test_finish_rounds_the_mean_once_to_float32_when_it_is_not_representable(self, layout4, make_reader):
        # Prepare: n = 1 and 2, mean Δ[0] = 1/3
        clients = [(1, 1, [1.0, 0.0, 0.0, 0.0]), (2, 2, [0.0, 0.0, 0.0, 0.0])]

        # Execute
        result = _run(layout4, make_reader, [0.0, 0.0, 0.0, 0.0], clients)

        # Assert
        np.testing.assert_array_equal(result.payload, _f32([0.33333334, 0.0, 0.0, 0.0]))

    def test_finish_returns_global_plus_delta_when_a_single_client_arrives(self, layout4, make_reader):
        # Prepare
        g = _f32([0.1, 0.2, 0.3, 0.4])
        d = _f32([0.7, -0.2, 1e-3, 5.0])

        # Execute
        result = _run(layout4, make_reader, g, [(9, 7, d)])

        # Assert
        np.testing.assert_array_equal(result.payload, g + d)
        assert result.client_weights == {9: 1.0}

    def test_finish_returns_the_global_unchanged_when_no_client_arrives(self, layout4, make_reader):
        # Prepare
        g = _f32([1.0, 2.0, 3.0, 4.0])
        strategy = FedAvg(layout4)
        strategy.begin(g, round_idx=1)

        # Execute
        result = strategy.finish()

        # Assert
        np.testing.assert_array_equal(result.payload, [1.0, 2.0, 3.0, 4.0])
        assert not np.shares_memory(result.payload, g)
        assert result.client_weights == {}
        assert result.report == {"n_aggregated": 0.0}

    def test_finish_leaves_the_global_payload_unmodified(self, layout4, make_reader):
        # Prepare
        g = _f32([1.0, 2.0, 3.0, 4.0])
        strategy = FedAvg(layout4)
        strategy.begin(g, round_idx=1)
        strategy.add(make_reader(1, 1, 2, [1.0, 1.0, 1.0, 1.0]))

        # Execute
        result = strategy.finish()

        # Assert
        np.testing.assert_array_equal(g, [1.0, 2.0, 3.0, 4.0])
        assert not np.shares_memory(result.payload, g)

    def test_begin_starts_a_fresh_mean_when_a_new_round_begins(self, layout4, make_reader):
        # Prepare: round 1 aggregates client 1; round 2 sees client 1 again with another delta
        strategy = FedAvg(layout4)
        strategy.begin(_f32([0, 0, 0, 0]), round_idx=1)
        strategy.add(make_reader(1, 1, 5, [100.0, 100.0, 100.0, 100.0]))
        first = strategy.finish()

        # Execute
        strategy.begin(first.payload, round_idx=2)
        strategy.add(make_reader(1, 2, 1, [1.0, -1.0, 0.0, 2.0]))
        second = strategy.finish()

        # Assert
        np.testing.assert_array_equal(second.payload, _f32([101.0, 99.0, 100.0, 102.0]))
        assert second.client_weights == {1: 1.0}

    def test_finish_ignores_a_rejected_update_when_later_updates_are_valid(self, layout4, make_reader):
        # Prepare
        strategy = FedAvg(layout4)
        strategy.begin(_f32([0, 0, 0, 0]), round_idx=1)
        strategy.add(make_reader(1, 1, 1, [4.0, 4.0, 4.0, 4.0]))
        with pytest.raises(LayoutMismatch):
            strategy.add(make_reader(2, 1, 1, [9.0, 9.0, 9.0]))

        # Execute
        strategy.add(make_reader(3, 1, 3, [0.0, 0.0, 0.0, 8.0]))
        result = strategy.finish()

        # Assert
        np.testing.assert_array_equal(result.payload, _f32([1.0, 1.0, 1.0, 7.0]))
        assert result.client_weights == {1: 0.25, 3: 0.75}

    @settings(max_examples=60, deadline=None)
    @given(_cohort(st.integers(-50, 50).map(float), n_max=20))
    def test_finish_is_bitwise_independent_of_arrival_order_when_values_are_small_integers(
        self, layout4, make_reader, cohort
    ):
        # Prepare
        g, members, perm = cohort
        clients = [(cid, n, d) for cid, (n, d) in enumerate(members)]

        # Execute
        in_order = _run(layout4, make_reader, g, clients)
        shuffled = _run(layout4, make_reader, g, [clients[i] for i in perm])

        # Assert
        np.testing.assert_array_equal(in_order.payload, shuffled.payload)
        assert in_order.client_weights == shuffled.client_weights

    @settings(max_examples=60, deadline=None)
    @given(_cohort(st.floats(-1e3, 1e3, width=32), n_max=1000))
    def test_finish_is_independent_of_arrival_order_within_float32_tolerance_when_values_are_floats(
        self, layout4, make_reader, cohort
    ):
        # Prepare
        g, members, perm = cohort
        clients = [(cid, n, d) for cid, (n, d) in enumerate(members)]
        n = np.array([m[0] for m in members], dtype=np.float64)
        deltas = np.array([m[1] for m in members], dtype=np.float64)
        reference = np.array(g, dtype=np.float64) + (n[:, None] * deltas).sum(axis=0) / n.sum()

        # Execute
        in_order = _run(layout4, make_reader, g, clients)
        shuffled = _run(layout4, make_reader, g, [clients[i] for i in perm])

        # Assert: |values| <= 2e3, where a float32 ulp is 2**-12
        np.testing.assert_allclose(in_order.payload, shuffled.payload, rtol=0, atol=2**-12)
        np.testing.assert_allclose(in_order.payload, reference, rtol=0, atol=2**-12)

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.integers(1, 10**6), min_size=1, max_size=8))
    def test_client_weights_sum_to_one_and_follow_n_examples_when_cohort_is_random(self, layout4, make_reader, ns):
        # Prepare
        clients = [(cid, n, [0.0, 0.0, 0.0, 0.0]) for cid, n in enumerate(ns)]

        # Execute
        weights = _run(layout4, make_reader, [0, 0, 0, 0], clients).client_weights

        # Assert
        assert sum(weights.values()) == pytest.approx(1.0, abs=1e-12)
        assert weights == pytest.approx({cid: n / sum(ns) for cid, n in enumerate(ns)})


class TestFedAvgFailure:
    def test_add_raises_when_the_same_client_is_added_twice(self, layout4, make_reader):
        # Prepare
        strategy = FedAvg(layout4)
        strategy.begin(_f32([0, 0, 0, 0]), round_idx=1)
        strategy.add(make_reader(1, 1, 1, [1.0, 1.0, 1.0, 1.0]))

        # Execute / Assert
        with pytest.raises(ValueError, match="client 1: update added twice in one round"):
            strategy.add(make_reader(1, 1, 1, [1.0, 1.0, 1.0, 1.0]))

    def test_add_raises_layout_mismatch_naming_client_and_round_when_update_has_wrong_length(
        self, layout4, make_reader
    ):
        # Prepare
        strategy = FedAvg(layout4)
        strategy.begin(_f32([0, 0, 0, 0]), round_idx=3)

        # Execute / Assert
        with pytest.raises(LayoutMismatch, match=r"client 5 round 3 delta: has 5 values, layout expects 4"):
            strategy.add(make_reader(5, 3, 1, [1.0, 1.0, 1.0, 1.0, 1.0]))

    def test_add_raises_layout_mismatch_when_update_is_for_another_round(self, layout4, make_reader):
        # Prepare
        strategy = FedAvg(layout4)
        strategy.begin(_f32([0, 0, 0, 0]), round_idx=3)

        # Execute / Assert
        with pytest.raises(LayoutMismatch, match=r"client 5: update is for round 4, aggregating round 3"):
            strategy.add(make_reader(5, 4, 1, [1.0, 1.0, 1.0, 1.0]))

    def test_add_raises_runtime_error_when_called_before_begin(self, layout4, make_reader):
        # Prepare
        strategy = FedAvg(layout4)

        # Execute / Assert
        with pytest.raises(RuntimeError, match=r"before begin\(\)"):
            strategy.add(make_reader(1, 1, 1, [1.0, 1.0, 1.0, 1.0]))
