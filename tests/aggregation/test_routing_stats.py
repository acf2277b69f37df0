"""RoutingStats: derived p̄, margin, μ, and `+` as an exact, order-free sum with zeros() as identity."""

from __future__ import annotations

from functools import reduce
from operator import add

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from aggregation import RoutingStats
from aggregation.routing_stats import total_variation

E, D = 3, 2


def _stats(n_tokens, p_sum, counts, margin_sum, x_sum) -> RoutingStats:
    return RoutingStats(
        n_tokens,
        np.array(p_sum, dtype=np.float64),
        np.array(counts, dtype=np.float64),
        np.array(margin_sum, dtype=np.float64),
        np.array(x_sum, dtype=np.float64),
    )


def _assert_identical(a: RoutingStats, b: RoutingStats) -> None:
    assert a.n_tokens == b.n_tokens
    for name in ("p_sum", "counts", "margin_sum", "x_sum"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)


# Any finite float64: `a + b == b + a` bit for bit.
_finite = st.floats(-1e300, 1e300, allow_nan=False, allow_infinity=False)
# Multiples of 1/1024 below 2**20: every partial sum of a few of them is exact in float64,
# so any order of summation must give the same bits.
_dyadic = st.integers(-(2**30), 2**30).map(lambda k: k / 1024.0)
_count = st.integers(0, 10_000).map(float)


def _stats_strategy(value: st.SearchStrategy[float]) -> st.SearchStrategy[RoutingStats]:
    return st.builds(
        RoutingStats,
        st.integers(0, 10**6),
        hnp.arrays(np.float64, E, elements=value),
        hnp.arrays(np.float64, E, elements=_count),
        hnp.arrays(np.float64, E, elements=value),
        hnp.arrays(np.float64, (E, D), elements=value),
    )


class TestDerivedStatistics:
    def test_p_bar_divides_summed_probabilities_by_tokens_when_tokens_were_seen(self):
        # Prepare
        s = _stats(4, [1.0, 2.0, 1.0], [2, 4, 2], [0, 0, 0], np.zeros((E, D)))

        # Execute
        p_bar = s.p_bar

        # Assert
        np.testing.assert_array_equal(p_bar, [0.25, 0.5, 0.25])

    def test_p_bar_is_zero_when_no_token_was_seen(self):
        # Execute
        p_bar = RoutingStats.zeros(E, D).p_bar

        # Assert
        np.testing.assert_array_equal(p_bar, [0.0, 0.0, 0.0])

    def test_margin_is_mean_over_routed_tokens_and_zero_when_count_is_zero(self):
        # Prepare
        s = _stats(5, [1, 1, 1], [3, 0, 2], [0.75, 0.0, 0.5], np.zeros((E, D)))

        # Execute
        margin = s.margin

        # Assert
        np.testing.assert_array_equal(margin, [0.25, 0.0, 0.25])

    def test_mu_is_mean_routed_hidden_state_and_zero_when_count_is_zero(self):
        # Prepare
        s = _stats(5, [1, 1, 1], [2, 0, 4], [0, 0, 0], [[2.0, 4.0], [0.0, 0.0], [2.0, -6.0]])

        # Execute
        mu = s.mu

        # Assert
        np.testing.assert_array_equal(mu, [[1.0, 2.0], [0.0, 0.0], [0.5, -1.5]])

    def test_zeros_has_the_requested_shapes_and_no_tokens(self):
        # Execute
        z = RoutingStats.zeros(4, 5)

        # Assert
        assert (z.n_tokens, z.num_experts) == (0, 4)
        assert (z.p_sum.shape, z.counts.shape, z.margin_sum.shape, z.x_sum.shape) == ((4,), (4,), (4,), (4, 5))
        assert not (z.p_sum.any() or z.counts.any() or z.margin_sum.any() or z.x_sum.any())

    def test_nbytes_counts_token_count_and_every_array_when_float64(self):
        # Execute
        nbytes = RoutingStats.zeros(E, D).nbytes

        # Assert: 8 (n_tokens) + 3 arrays of 3 float64 + 3x2 float64
        assert nbytes == 8 + 3 * 3 * 8 + 6 * 8

    def test_total_variation_is_half_the_l1_distance(self):
        # Execute
        tv = total_variation(np.array([0.5, 0.5, 0.0]), np.array([0.25, 0.25, 0.5]))

        # Assert
        assert tv == 0.5


class TestAddition:
    def test_add_sums_every_field_when_two_batches_are_combined(self):
        # Prepare
        a = _stats(2, [0.5, 1.5, 0.0], [1, 2, 0], [0.25, 0.5, 0.0], [[1, 1], [2, 2], [0, 0]])
        b = _stats(3, [1.0, 1.0, 1.0], [2, 0, 1], [0.5, 0.0, 0.125], [[0, 2], [0, 0], [4, -4]])

        # Execute
        s = a + b

        # Assert
        _assert_identical(s, _stats(5, [1.5, 2.5, 1.0], [3, 2, 1], [0.75, 0.5, 0.125], [[1, 3], [2, 2], [4, -4]]))
        np.testing.assert_array_equal(s.p_bar, [0.3, 0.5, 0.2])
        np.testing.assert_array_equal(s.margin, [0.25, 0.25, 0.125])
        np.testing.assert_array_equal(s.mu, [[1 / 3, 1.0], [1.0, 1.0], [4.0, -4.0]])

    def test_add_leaves_operands_unchanged_and_unshared(self):
        # Prepare
        a = _stats(1, [1, 0, 0], [1, 0, 0], [0.5, 0, 0], [[1, 0], [0, 0], [0, 0]])
        b = _stats(1, [0, 1, 0], [0, 1, 0], [0, 0.5, 0], [[0, 0], [0, 1], [0, 0]])

        # Execute
        s = a + b

        # Assert
        np.testing.assert_array_equal(a.p_sum, [1, 0, 0])
        np.testing.assert_array_equal(b.p_sum, [0, 1, 0])
        assert not np.shares_memory(s.x_sum, a.x_sum)
        assert not np.shares_memory(s.x_sum, b.x_sum)

    @settings(max_examples=50, deadline=None)
    @given(_stats_strategy(_finite))
    def test_add_returns_the_other_operand_when_one_side_is_zeros(self, s):
        # Prepare
        z = RoutingStats.zeros(E, D)

        # Execute / Assert
        _assert_identical(z + s, s)
        _assert_identical(s + z, s)

    @settings(max_examples=50, deadline=None)
    @given(_stats_strategy(_finite), _stats_strategy(_finite))
    def test_add_is_bitwise_commutative_when_values_are_arbitrary_floats(self, a, b):
        # Execute
        ab, ba = a + b, b + a

        # Assert
        _assert_identical(ab, ba)

    @settings(max_examples=50, deadline=None)
    @given(
        st.lists(_stats_strategy(_dyadic), min_size=2, max_size=6).flatmap(
            lambda xs: st.tuples(st.just(xs), st.permutations(xs))
        )
    )
    def test_add_gives_identical_results_when_summed_in_two_orders(self, pair):
        # Prepare
        items, shuffled = pair

        # Execute
        forward = reduce(add, items, RoutingStats.zeros(E, D))
        other = reduce(add, shuffled, RoutingStats.zeros(E, D))

        # Assert
        _assert_identical(forward, other)
        np.testing.assert_array_equal(forward.p_bar, other.p_bar)
        np.testing.assert_array_equal(forward.margin, other.margin)
        np.testing.assert_array_equal(forward.mu, other.mu)

    @settings(max_examples=50, deadline=None)
    @given(
        hnp.arrays(np.float64, (8, E), elements=_dyadic),
        hnp.arrays(np.bool_, (8, E)),
        hnp.arrays(np.float64, (8, D), elements=_dyadic),
        st.integers(0, 8),
    )
    def test_add_equals_stats_of_the_union_when_tokens_are_split_into_batches(self, p, routed, x, cut):
        # Prepare: per-token router probabilities p, top-k mask, margins (here p itself) and hidden states x
        def of(rows: slice) -> RoutingStats:
            r = routed[rows]
            return RoutingStats(
                n_tokens=len(p[rows]),
                p_sum=p[rows].sum(axis=0),
                counts=r.sum(axis=0).astype(np.float64),
                margin_sum=np.where(r, p[rows], 0.0).sum(axis=0),
                x_sum=r.T.astype(np.float64) @ x[rows],
            )

        # Execute
        split = of(slice(0, cut)) + of(slice(cut, 8))

        # Assert
        _assert_identical(split, of(slice(0, 8)))

    def test_add_of_a_client_over_ranks_uses_the_token_weighted_p_bar(self):
        # Prepare: rank 0 saw 1 token, rank 1 saw 3; the mean of means would be wrong
        r0 = _stats(1, [1.0, 0.0, 0.0], [1, 0, 0], [0, 0, 0], np.zeros((E, D)))
        r1 = _stats(3, [0.0, 3.0, 0.0], [0, 3, 0], [0, 0, 0], np.zeros((E, D)))

        # Execute
        p_bar = (r0 + r1).p_bar

        # Assert
        np.testing.assert_array_equal(p_bar, [0.25, 0.75, 0.0])
        assert not np.array_equal(p_bar, (r0.p_bar + r1.p_bar) / 2)



class TestStack:
    @settings(max_examples=50, deadline=None)
    @given(st.lists(_stats_strategy(_dyadic), min_size=1, max_size=5))
    def test_stacked_means_equal_each_clients_own_when_clients_are_stacked(self, stats):
        # Execute
        cohort = RoutingStats.stack(stats)

        # Assert: row i of every derived quantity is client i's, bit for bit
        assert cohort.num_experts == E
        for i, s in enumerate(stats):
            np.testing.assert_array_equal(cohort.p_bar[i], s.p_bar)
            np.testing.assert_array_equal(cohort.margin[i], s.margin)
            np.testing.assert_array_equal(cohort.mu[i], s.mu)
            np.testing.assert_array_equal(cohort.counts[i], s.counts)

    def test_stack_puts_clients_on_a_leading_axis(self):
        # Prepare
        a = _stats(4, [1.0, 2.0, 1.0], [2, 4, 2], [0, 0, 0], np.ones((E, D)))
        b = _stats(0, [0.0, 0.0, 0.0], [0, 0, 0], [0, 0, 0], np.zeros((E, D)))

        # Execute
        cohort = RoutingStats.stack([a, b])

        # Assert
        assert cohort.n_tokens.shape == (2,) and cohort.x_sum.shape == (2, E, D)
        np.testing.assert_array_equal(cohort.p_bar, [[0.25, 0.5, 0.25], [0.0, 0.0, 0.0]])

    def test_stack_refuses_clients_whose_shapes_differ_by_name(self):
        # Prepare: same number of values, different shapes ([3, 4] against [4, 3]): a plain reshape would pass
        a = _stats(1, [1.0, 0.0, 0.0], [1, 0, 0], [0, 0, 0], np.zeros((E, D)))
        b = RoutingStats(n_tokens=1, p_sum=a.p_sum, counts=a.counts, margin_sum=a.margin_sum, x_sum=np.zeros((D, E)))

        # Execute / Assert
        with pytest.raises(ValueError, match="x_sum shapes differ"):
            RoutingStats.stack([a, b])

    def test_stack_of_no_clients_is_refused(self):
        with pytest.raises(ValueError, match="at least one"):
            RoutingStats.stack([])
