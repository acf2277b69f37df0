"""FedAlign-MoE Module 2 math (spec eqs. 7–12) against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aggregation.semantic_alignment import (
    client_weights,
    direction_consensus,
    excluded_pairs,
    gate_weights,
    gated_consensus,
    merge_expert,
    personalized_view,
    sigma_gate,
    signature_similarity,
    slice_gram,
    threshold,
    thresholds,
)


def _outlier_case(num_clients: int, outlier: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """σ and counted for clients agreeing on μ = [1, 0] except the last one, whose μ is ``outlier``."""
    mu = np.array([[1.0, 0.0]] * (num_clients - 1) + [outlier])
    return signature_similarity(mu, np.ones(num_clients))


class TestSimilarity:
    def test_sigma_is_the_cosine_and_a_client_without_tokens_is_not_counted(self):
        # Prepare: client 3 routed no token to this expert
        mu = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [5.0, 5.0]])

        # Execute
        sigma, counted = signature_similarity(mu, np.array([3, 1, 2, 0]))

        # Assert
        r = 1 / math.sqrt(2)
        np.testing.assert_allclose(sigma[:3, :3], [[1, 0, r], [0, 1, r], [r, r, 1]])
        expected = np.array([[0, 1, 1, 0], [1, 0, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=bool)
        np.testing.assert_array_equal(counted, expected)

    def test_consensus_is_the_normalised_gram_and_zero_for_a_zero_update(self):
        # Prepare
        deltas = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])

        # Execute
        gram = slice_gram(deltas)
        d = direction_consensus(gram)

        # Assert
        np.testing.assert_array_equal(gram, [[1, 1, 0], [1, 2, 0], [0, 0, 0]])
        np.testing.assert_allclose(d, [[1, 1 / math.sqrt(2), 0], [1 / math.sqrt(2), 1, 0], [0, 0, 0]])


class TestFloat32Gram:
    def test_gram_of_float32_integers_is_exact(self):
        # Prepare: products and sums of small integers are exact in float32
        deltas = np.array([[1, -2, 3, 0], [4, 5, -6, 7], [0, 0, 0, 0]], dtype=np.float32)

        # Execute
        gram = slice_gram(deltas)

        # Assert
        assert gram.dtype == np.float64
        np.testing.assert_array_equal(gram, [[14, -24, 0], [-24, 126, 0], [0, 0, 0]])

    def test_float32_gram_equals_the_float64_one_within_float32_rounding(self):
        # Prepare: 6 × 4096 values no float32 product holds exactly; sign-changing rows
        i = np.arange(6 * 4096, dtype=np.float64).reshape(6, 4096)
        deltas = (np.sin(0.37 * i + np.arange(6)[:, None]) * 1e-3).astype(np.float32)
        x = deltas.astype(np.float64)
        reference = x @ x.T
        norms = np.sqrt(np.diag(reference))

        # Execute
        gram = slice_gram(deltas)

        # Assert: |G − G64| ≤ 1e-5·|Δ_i||Δ_j| (measured ≤ 5.5e-7 up to 100 × 57,344 values), so D moves ≤ ~1e-5
        np.testing.assert_array_less(np.abs(gram - reference), 1e-5 * np.outer(norms, norms))
        np.testing.assert_allclose(direction_consensus(gram), direction_consensus(reference), rtol=0, atol=1e-5)


class TestBatches:
    def _experts(self):
        """σ, counted and D of three experts of five clients; the third expert used by two clients only."""
        rng = np.random.default_rng(3)
        mu = rng.normal(size=(3, 5, 4))
        counts = np.ones((3, 5))
        counts[2, 2:] = 0
        sigma, counted = signature_similarity(mu, counts)
        deltas = rng.normal(size=(3, 5, 6))
        consensus = np.stack([direction_consensus(slice_gram(d)) for d in deltas])
        return mu, counts, sigma, counted, consensus

    def test_batched_terms_equal_the_terms_of_each_expert(self):
        # Prepare
        mu, counts, sigma, counted, consensus = self._experts()
        n = np.array([1.0, 2.0, 3.0, 4.0, 5.0])

        # Execute
        tau = thresholds(sigma, counted)
        gamma = gated_consensus(sigma_gate(sigma, counted, tau, gate="soft"), consensus)
        pi = client_weights(gamma, n)

        # Assert: each expert as its own [N, N] call
        for e in range(3):
            s, c = signature_similarity(mu[e], counts[e])
            np.testing.assert_array_equal(sigma[e], s)
            np.testing.assert_array_equal(counted[e], c)
            assert tau[e] == pytest.approx(threshold(s, c), abs=1e-12)
            one = gate_weights(s, c, consensus[e], threshold(s, c), gate="soft")
            np.testing.assert_allclose(gamma[e], one, atol=1e-12)
            np.testing.assert_allclose(pi[e], client_weights(one, n), atol=1e-12)
        assert excluded_pairs(sigma, counted, tau) == tuple(
            map(sum, zip(*(excluded_pairs(sigma[e], counted[e], tau[e]) for e in range(3)), strict=True))
        )

    def test_threshold_is_nan_only_for_the_expert_without_a_counted_pair(self):
        # Prepare: expert 1 is used by one client only
        mu = np.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]] * 2)
        counts = np.array([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
        sigma, counted = signature_similarity(mu, counts)

        # Execute
        tau = thresholds(sigma, counted)
        gate = sigma_gate(sigma, counted, tau)

        # Assert: σ = [0, r, r] over the three pairs; expert 1 aligns no pair and excludes none
        r = 1 / math.sqrt(2)
        assert tau[0] == pytest.approx(np.mean([0, r, r]) - np.std([0, r, r]))
        assert math.isnan(tau[1])
        assert gate[1].sum() == 0.0
        assert excluded_pairs(sigma[1], counted[1], tau[1]) == (0, 0)


class TestThresholdAndGate:
    def test_opposite_signature_is_gated_out_when_five_clients_take_part(self):
        # Prepare: 6 pairs at σ = 1, 4 pairs at σ = −1
        sigma, counted = _outlier_case(5, [-1.0, 0.0])

        # Execute
        tau = threshold(sigma, counted)
        gamma = gate_weights(sigma, counted, np.ones((5, 5)), tau)

        # Assert: M = .2, Σ = sqrt(.96)
        assert tau == pytest.approx(0.2 - math.sqrt(0.96))
        expected = np.ones((5, 5))
        expected[4, :4] = expected[:4, 4] = 0.0
        np.testing.assert_array_equal(gamma, expected)
        assert excluded_pairs(sigma, counted, tau) == (4, 10)

    def test_permuted_signature_is_gated_out_when_five_clients_take_part(self):
        # Prepare: the outlier's μ is [0, 1], orthogonal: 6 pairs at 1, 4 at 0
        sigma, counted = _outlier_case(5, [0.0, 1.0])

        # Execute
        tau = threshold(sigma, counted)
        gamma = gate_weights(sigma, counted, np.ones((5, 5)), tau)

        # Assert: M = .6, Σ = sqrt(.24)
        assert tau == pytest.approx(0.6 - math.sqrt(0.24))
        assert gamma[4, :4].sum() == 0.0 and gamma[:4, :4].min() == 1.0

    def test_opposite_signature_is_not_gated_out_when_four_clients_take_part(self):
        # Prepare: 3 pairs at 1, 3 at −1, so M = 0, Σ = 1, τ = −1 (the spec's N ≥ 5 note)
        sigma, counted = _outlier_case(4, [-1.0, 0.0])

        # Execute
        tau = threshold(sigma, counted)
        gamma = gate_weights(sigma, counted, np.ones((4, 4)), tau)

        # Assert
        assert tau == pytest.approx(-1.0)
        np.testing.assert_array_equal(gamma, np.ones((4, 4)))

    def test_threshold_uses_beta_and_is_nan_when_no_pair_is_counted(self):
        # Prepare
        sigma, counted = _outlier_case(5, [-1.0, 0.0])

        # Execute / Assert
        assert threshold(sigma, counted, beta=0.0) == pytest.approx(0.2)
        assert math.isnan(threshold(sigma, np.zeros((5, 5), dtype=bool)))

    def test_hard_gate_admits_rounding_noise_below_tau_only_within_the_tolerance(self):
        # Prepare
        sigma = np.array([[1.0, 0.9999999999999999], [0.9999999999999999, 1.0]])
        counted = ~np.eye(2, dtype=bool)

        # Execute
        with_tol = gate_weights(sigma, counted, np.ones((2, 2)), 1.0)
        bare = gate_weights(sigma, counted, np.ones((2, 2)), 1.0, tol=0.0)

        # Assert
        assert with_tol[0, 1] == 1.0
        assert bare[0, 1] == 0.0

    def test_gate_clips_negative_consensus_to_zero_and_keeps_the_diagonal_at_one(self):
        # Prepare
        counted = ~np.eye(2, dtype=bool)

        # Execute
        gamma = gate_weights(np.ones((2, 2)), counted, np.array([[1.0, -0.5], [-0.5, 1.0]]), 0.0)

        # Assert
        np.testing.assert_array_equal(gamma, np.eye(2))

    def test_soft_gate_is_half_the_consensus_when_sigma_equals_tau(self):
        # Prepare
        counted = ~np.eye(2, dtype=bool)
        sigma = np.array([[1.0, 0.3], [0.3, 1.0]])

        # Execute
        gamma = gate_weights(sigma, counted, np.full((2, 2), 0.8), 0.3, gate="soft", temperature=0.1)

        # Assert
        assert gamma[0, 1] == pytest.approx(0.4)
        assert gamma[0, 0] == 1.0

    def test_gate_raises_when_gate_is_unknown(self):
        # Prepare
        ones, counted = np.ones((2, 2)), ~np.eye(2, dtype=bool)

        # Execute / Assert
        with pytest.raises(ValueError, match="gate must be"):
            gate_weights(ones, counted, ones, 0.0, gate="x")  # type: ignore[arg-type]


class TestClientWeightsAndMerge:
    def test_pi_is_n_times_degree_normalised_and_zero_for_the_gated_out_client(self):
        # Prepare: clients 0..3 aligned with each other, client 4 with none; unequal n
        gamma = np.ones((5, 5))
        gamma[4, :4] = gamma[:4, 4] = 0.0
        n = np.array([1.0, 2.0, 3.0, 4.0, 10.0])

        # Execute
        pi = client_weights(gamma, n)

        # Assert: raw = [3, 6, 9, 12, 0] / 30
        np.testing.assert_allclose(pi, [0.1, 0.2, 0.3, 0.4, 0.0])

    def test_pi_uses_partial_gammas_when_consensus_is_fractional(self):
        # Prepare: γ_01 = .5, γ_02 = 0, γ_12 = .25
        gamma = np.array([[1.0, 0.5, 0.0], [0.5, 1.0, 0.25], [0.0, 0.25, 1.0]])

        # Execute
        pi = client_weights(gamma, np.array([2.0, 1.0, 4.0]))

        # Assert: raw = [2·.5, 1·.75, 4·.25] = [1, .75, 1]
        np.testing.assert_allclose(pi, np.array([1.0, 0.75, 1.0]) / 2.75)

    def test_expert_keeps_its_value_when_no_pair_is_aligned(self):
        # Prepare
        pi = client_weights(np.eye(3), np.array([1.0, 1.0, 1.0]))
        base = np.array([1.0, 2.0])

        # Execute
        merged = merge_expert(base, np.array([[5.0, 5.0], [6.0, 6.0], [7.0, 7.0]]), pi)

        # Assert
        np.testing.assert_array_equal(pi, [0.0, 0.0, 0.0])
        np.testing.assert_array_equal(merged, base)

    def test_merge_adds_the_pi_weighted_update(self):
        # Execute
        merged = merge_expert(np.array([1.0, 2.0]), np.array([[4.0, 0.0], [0.0, 8.0]]), np.array([0.25, 0.75]))

        # Assert
        np.testing.assert_allclose(merged, [2.0, 8.0])

    def test_personalized_view_is_the_gamma_weighted_mean_of_client_parameters(self):
        # Execute
        view = personalized_view(np.array([[1.0, 0.5], [0.5, 1.0]]), np.array([[2.0], [4.0]]))

        # Assert: (2 + 2)/1.5 and (1 + 4)/1.5
        np.testing.assert_allclose(view, [[8 / 3], [10 / 3]])

    def test_personalized_view_of_float32_parameters_stays_float32_within_its_rounding(self):
        # Execute
        view = personalized_view(np.array([[1.0, 0.5], [0.5, 1.0]]), np.array([[2.0], [4.0]], dtype=np.float32))

        # Assert
        assert view.dtype == np.float32
        np.testing.assert_allclose(view, [[8 / 3], [10 / 3]], rtol=2e-7)

    def test_merge_of_a_float32_slice_is_within_float32_rounding_of_the_float64_sum(self):
        # Prepare
        rng = np.random.default_rng(5)
        deltas = rng.normal(scale=1e-3, size=(7, 1000)).astype(np.float32)
        pi = rng.dirichlet(np.ones(7))
        base = rng.normal(size=1000)

        # Execute
        merged = merge_expert(base, deltas, pi)

        # Assert: Σ π_i Δ_i in float32 is off by ≤ a few float32 ulps of max|Δ|
        reference = base + pi @ deltas.astype(np.float64)
        np.testing.assert_allclose(merged, reference, rtol=0, atol=1e-9)
