"""FedAlign-MoE Module 1 math (spec eqs. 1–6) against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation.routing_alignment import (
    adaptive_alpha,
    consistency_scores,
    consistency_weights,
    global_routing,
    merge_router_rows,
    overlap,
    uniform_routing,
    weight_entropy,
)

# 3 clients × 4 experts; expert 3 has no score anywhere, so it falls back to n (eq. 3).
SCORES = np.array([[0.2, 0.0, 0.1, 0.0], [0.6, 0.3, 0.1, 0.0], [0.2, 0.1, 0.0, 0.0]])
N = np.array([1.0, 2.0, 5.0])
OMEGA = np.array([[0.2, 0.0, 0.5, 1 / 8], [0.6, 0.75, 0.5, 2 / 8], [0.2, 0.25, 0.0, 5 / 8]])


class TestOverlap:
    def test_overlap_is_the_renormalised_product_with_p_g_when_mass_overlaps(self):
        # Prepare
        p_bar = np.array([[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
        p_g = np.array([0.4, 0.1, 0.25, 0.25])

        # Execute
        o = overlap(p_bar, p_g)

        # Assert: joint rows [.2 .05 0 0] and [.1 .025 .0625 .0625], both summing to .25
        np.testing.assert_allclose(o, [[0.8, 0.2, 0.0, 0.0], [0.4, 0.1, 0.25, 0.25]])

    def test_overlap_is_zero_when_client_routed_no_token(self):
        # Execute
        o = overlap(np.zeros((1, 3)), np.full(3, 1 / 3))

        # Assert
        np.testing.assert_array_equal(o, np.zeros((1, 3)))

    def test_uniform_routing_is_one_over_e_in_every_layer(self):
        # Execute / Assert
        np.testing.assert_array_equal(uniform_routing(2, 4), np.full((2, 4), 0.25))


class TestScores:
    @pytest.mark.parametrize(
        ("mode", "expected"),
        [("om", [[0.1, 0.0]]), ("o", [[0.5, 0.5]]), ("m", [[0.2, 0.0]]), ("uniform", [[1.0, 1.0]])],
    )
    def test_score_follows_the_mode_when_mode_is_given(self, mode, expected):
        # Execute
        s = consistency_scores(np.array([[0.5, 0.5]]), np.array([[0.2, 0.0]]), mode)

        # Assert
        np.testing.assert_allclose(s, expected)

    def test_score_clips_negative_margin_noise_to_zero(self):
        # Execute / Assert
        np.testing.assert_array_equal(consistency_scores(np.array([[1.0]]), np.array([[-1e-9]])), [[0.0]])

    def test_score_raises_naming_the_modes_when_mode_is_unknown(self):
        # Execute / Assert
        with pytest.raises(ValueError, match="score mode must be one of"):
            consistency_scores(np.ones((1, 2)), np.ones((1, 2)), "om2")  # type: ignore[arg-type]


class TestConsistencyWeights:
    def test_omega_is_score_share_per_expert_and_n_share_when_an_expert_has_no_score(self):
        # Execute
        omega = consistency_weights(SCORES, N)

        # Assert: columns sum to [1, .4, .2, 0]; expert 3 falls back to n / 8
        np.testing.assert_allclose(omega, OMEGA)

    def test_omega_raises_when_an_example_count_is_not_positive(self):
        # Execute / Assert
        with pytest.raises(ValueError, match="positive example counts"):
            consistency_weights(SCORES, np.array([1.0, 0.0, 2.0]))

    @settings(max_examples=25, deadline=None)
    @given(
        st.integers(1, 5).flatmap(
            lambda k: st.tuples(
                st.lists(
                    st.lists(st.sampled_from([0.0, 0.1, 0.5, 2.0]), min_size=3, max_size=3),
                    min_size=k,
                    max_size=k,
                ),
                st.lists(st.integers(1, 50), min_size=k, max_size=k),
            )
        )
    )
    def test_omega_columns_are_non_negative_and_sum_to_one_when_scores_are_random(self, case):
        # Prepare
        s, n = np.array(case[0]), np.array(case[1], dtype=float)

        # Execute
        omega = consistency_weights(s, n)

        # Assert
        assert np.all(omega >= 0)
        np.testing.assert_allclose(omega.sum(axis=0), 1.0)


class TestGlobalRouting:
    def test_p_g_is_the_omega_weighted_routing_renormalised_over_experts(self):
        # Prepare
        p_bar = np.array([[0.4, 0.1, 0.4, 0.1], [0.1, 0.5, 0.2, 0.2], [0.25, 0.25, 0.25, 0.25]])

        # Execute
        p_g = global_routing(OMEGA, p_bar, previous=np.full(4, 0.25))

        # Assert: Σ_i ω_i(e) p̄_i(e) = [.19, .4375, .3, .21875], total 1.14625
        np.testing.assert_allclose(p_g, np.array([0.19, 0.4375, 0.3, 0.21875]) / 1.14625)
        assert p_g.sum() == pytest.approx(1.0, abs=1e-12)

    def test_p_g_keeps_the_previous_distribution_when_no_client_routed_a_token(self):
        # Prepare
        previous = np.array([0.7, 0.3])

        # Execute
        p_g = global_routing(np.full((2, 2), 0.5), np.zeros((2, 2)), previous=previous)

        # Assert
        np.testing.assert_array_equal(p_g, previous)
        assert not np.shares_memory(p_g, previous)


class TestRouterRowsAndAlpha:
    def test_router_rows_move_by_each_experts_own_client_weights(self):
        # Prepare: E = 2 rows of R = 2 values, 2 clients
        base = np.array([[1.0, 1.0], [0.0, 0.0]])
        deltas = np.array([[[2.0, 0.0], [4.0, 4.0]], [[0.0, 2.0], [0.0, 0.0]]])
        weights = np.array([[0.25, 0.5], [0.75, 0.5]])

        # Execute
        rows = merge_router_rows(base, deltas, weights)

        # Assert: row 0 = 1 + .25·[2, 0] + .75·[0, 2]; row 1 = .5·[4, 4]
        np.testing.assert_allclose(rows, [[1.5, 2.5], [2.0, 2.0]])

    def test_alpha_is_score_over_the_clients_best_score_and_one_when_all_scores_are_zero(self):
        # Execute
        alpha = adaptive_alpha(np.array([[0.2, 0.4, 0.1], [0.0, 0.0, 0.0]]))

        # Assert
        np.testing.assert_allclose(alpha, [[0.5, 1.0, 0.25], [1.0, 1.0, 1.0]])

    def test_weight_entropy_is_log_n_when_uniform_and_zero_when_one_client_takes_all(self):
        # Execute / Assert
        assert weight_entropy(np.full((2, 3), 0.5)) == pytest.approx(np.log(2))
        assert weight_entropy(np.array([[1.0, 0.0], [0.0, 1.0]])) == 0.0
