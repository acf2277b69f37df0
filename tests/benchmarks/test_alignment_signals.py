"""The alignment-signal summary on hand-made updates whose σ, D and weights are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aggregation import ClientUpdate, EntrySpec, PayloadLayout, RoutingStats
from benchmarks.alignment_signals import alignment_signals

E = 2  # experts; μ of expert e is the unit vector e_e, so expert 0 and expert 1 signatures are orthogonal


def _layout() -> PayloadLayout:
    specs = [EntrySpec("gate.weight", "router", 0, None, (E, 2))]
    specs += [EntrySpec("lora", "expert", 0, e, (3,), axis=0, start=e, stop=e + 1) for e in range(E)]
    return PayloadLayout.build(specs)


def _update(cid: int, n: int, expert_delta: np.ndarray) -> ClientUpdate:
    counts = np.array([5.0, 5.0])
    stats = RoutingStats(n_tokens=10, p_sum=np.array([5.0, 5.0]), counts=counts,
                         margin_sum=np.array([0.2, 0.2]) * counts, x_sum=np.eye(E) * counts[:, None])
    delta = np.concatenate([np.zeros(2 * E), expert_delta, expert_delta]).astype(np.float32)
    return ClientUpdate(cid, 1, n, delta, (stats,))


def test_identical_clients_align_fully_and_weigh_alike():
    # Prepare: five identical clients
    updates = [_update(c, 10, np.array([1.0, 2.0, 3.0])) for c in range(5)]

    # Execute
    row = alignment_signals(updates, _layout(), _layout().zeros())

    # Assert: σ = 1 for the same expert, 0 across experts; nothing below τ; D = 1 both ways (no LoRA pairs:
    # the function space is the parameters' own), also across experts, whose updates are equal here; ω, n uniform
    assert row["sigma_same_mean"] == pytest.approx(1.0)
    assert row["sigma_across_mean"] == pytest.approx(0.0)
    assert row["excluded_pair_frac"] == 0.0
    for space in ("factors", "function"):
        assert row[f"D_{space}_mean"] == pytest.approx(1.0) and row[f"D_{space}_negative_frac"] == 0.0
        assert row[f"D_{space}_across_mean"] == pytest.approx(1.0) and row[f"D_{space}_separation"] == pytest.approx(0)
    assert row["omega_entropy"] == pytest.approx(math.log(5))
    assert row["n_weight_entropy"] == pytest.approx(math.log(5))


def test_one_client_updating_against_the_rest_and_unequal_n():
    # Prepare: client 4 moves every expert the opposite way; client 0 holds half the examples
    updates = [_update(c, 40 if c == 0 else 10, np.array([1.0, 2.0, 3.0]) * (-1 if c == 4 else 1)) for c in range(5)]

    # Execute
    row = alignment_signals(updates, _layout(), _layout().zeros())

    # Assert: 4 of the 10 pairs involve client 4 → D = (6 − 4)/10; n shares (0.5, 0.125 × 4)
    assert row["D_factors_negative_frac"] == row["D_function_negative_frac"] == pytest.approx(0.4)
    assert row["D_factors_mean"] == row["D_function_mean"] == pytest.approx(0.2)
    share = np.array([0.5] + [0.125] * 4)
    assert row["n_weight_entropy"] == pytest.approx(float(-(share * np.log(share)).sum()))
    assert row["omega_entropy"] == pytest.approx(math.log(5))  # ω ignores n: equal scores, equal weights


def test_lora_experts_whose_factor_deltas_disagree_agree_in_function_space():
    # Prepare: each expert a LoRA pair A [1, 2], B [2, 1] starting at A = [3, 0], B = 0; five clients move B by
    # [0.1, 0]ᵀ, and A by +[0, 1] (clients 0-2) or −[0, 1] (3-4)
    specs = [EntrySpec("gate.weight", "router", 0, None, (E, 2))]
    for e in range(E):
        specs += [EntrySpec(f"e{e}.lora_A.w", "expert", 0, e, (1, 2)),
                  EntrySpec(f"e{e}.lora_B.w", "expert", 0, e, (2, 1))]
    layout = PayloadLayout.build(specs)
    payload = layout.zeros()
    for e in range(E):
        a, _ = layout.expert_span(0, e)
        payload[a : a + 2] = [3.0, 0.0]
    updates = []
    for c in range(5):
        expert = np.array([0.0, 1.0 if c < 3 else -1.0, 0.1, 0.0])
        delta = np.concatenate([np.zeros(2 * E), expert, expert]).astype(np.float32)
        updates.append(ClientUpdate(c, 1, 10, delta, _update(c, 10, np.zeros(3)).routing))

    # Execute
    row = alignment_signals(updates, layout, payload)

    # Assert: of the 10 pairs, 4 agree (factor cosine 1.01/1.01) and 6 disagree (−0.99/1.01); in function space
    # the disagreeing pairs have cosine (9 − 1)/(9 + 1) = 0.8: ΔW_i = ΔB_i·(A + ΔA_i)
    assert row["D_factors_mean"] == pytest.approx((4 * 1.0 + 6 * -0.99 / 1.01) / 10, rel=1e-5)
    assert row["D_factors_negative_frac"] == pytest.approx(0.6)
    assert row["D_function_mean"] == pytest.approx((4 * 1.0 + 6 * 0.8) / 10, rel=1e-5)
    assert row["D_function_negative_frac"] == 0.0


def test_real_round_of_a_tiny_model(tmp_path):
    # Prepare: the e2e tests' tiny run (synthetic data, random base), 6 clients trained in this process
    from benchmarks.alignment_signals import round_updates
    from tests.e2e.conftest import TINY

    # Execute
    updates, layout, payload = round_updates("configs/demo.yaml", 1.0, [*TINY, f"cache_dir={tmp_path}"], None)
    row = alignment_signals(updates, layout, payload)

    # Assert: every client reported; cosines and shares in range
    assert row["clients"] == 6
    for key in ("sigma_same_mean", "sigma_across_mean", "D_factors_mean", "D_function_mean", "D_function_across_mean"):
        assert -1.0 <= row[key] <= 1.0
    assert 0.0 <= row["excluded_pair_frac"] < 1.0
    assert 0.0 < row["omega_entropy"] <= row["log_N"] + 1e-9
