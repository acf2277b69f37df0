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
    row = alignment_signals(updates, _layout())

    # Assert: σ = 1 for the same expert, 0 across experts; nothing below τ; D = 1; ω and n uniform
    assert row["sigma_same_mean"] == pytest.approx(1.0)
    assert row["sigma_across_mean"] == pytest.approx(0.0)
    assert row["excluded_pair_frac"] == 0.0
    assert row["D_mean"] == pytest.approx(1.0) and row["D_negative_frac"] == 0.0
    assert row["omega_entropy"] == pytest.approx(math.log(5))
    assert row["n_weight_entropy"] == pytest.approx(math.log(5))


def test_one_client_updating_against_the_rest_and_unequal_n():
    # Prepare: client 4 moves every expert the opposite way; client 0 holds half the examples
    updates = [_update(c, 40 if c == 0 else 10, np.array([1.0, 2.0, 3.0]) * (-1 if c == 4 else 1)) for c in range(5)]

    # Execute
    row = alignment_signals(updates, _layout())

    # Assert: 4 of the 10 pairs involve client 4 → D = (6 − 4)/10; n shares (0.5, 0.125 × 4)
    assert row["D_negative_frac"] == pytest.approx(0.4)
    assert row["D_mean"] == pytest.approx(0.2)
    share = np.array([0.5] + [0.125] * 4)
    assert row["n_weight_entropy"] == pytest.approx(float(-(share * np.log(share)).sum()))
    assert row["omega_entropy"] == pytest.approx(math.log(5))  # ω ignores n: equal scores, equal weights


def test_real_round_of_a_tiny_model(tmp_path):
    # Prepare: the e2e tests' tiny run (synthetic data, random base), 6 clients trained in this process
    from benchmarks.alignment_signals import round_updates
    from tests.e2e.conftest import TINY

    # Execute
    updates, layout = round_updates("configs/demo.yaml", 1.0, [*TINY, f"cache_dir={tmp_path}"], None)
    row = alignment_signals(updates, layout)

    # Assert: every client reported; cosines and shares in range
    assert row["clients"] == 6
    for key in ("sigma_same_mean", "sigma_across_mean", "D_mean"):
        assert -1.0 <= row[key] <= 1.0
    assert 0.0 <= row["excluded_pair_frac"] < 1.0
    assert 0.0 < row["omega_entropy"] <= row["log_N"] + 1e-9
