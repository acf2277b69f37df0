"""Which client updates the aggregator refuses to merge, and why."""

from __future__ import annotations

import numpy as np
import pytest

from aggregation import ClientUpdate, EntrySpec, PayloadLayout, RoutingStats
from aggregation.update_guard import rejection

LAYOUT = PayloadLayout.build([EntrySpec("w", "shared", None, None, (4,))])


def _update(delta, routing=()) -> ClientUpdate:
    return ClientUpdate(1, 1, 5, np.asarray(delta), tuple(routing))


def _stats(x_sum: float = 0.0) -> RoutingStats:
    return RoutingStats(n_tokens=2, p_sum=np.ones(2), counts=np.ones(2), margin_sum=np.zeros(2),
                        x_sum=np.full((2, 1), x_sum))


def test_a_finite_update_within_the_bound_passes():
    assert rejection(_update(np.array([3, 4, 0, 0], np.float32), [_stats()]), LAYOUT, max_norm=5.0) is None


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_rejected(bad):
    reason = rejection(_update(np.array([0, bad, 0, 0], np.float32)), LAYOUT)
    assert reason == "delta has NaN or Inf values"


def test_non_finite_routing_statistics_are_rejected():
    reason = rejection(_update(np.zeros(4, np.float32), [_stats(), _stats(np.nan)]), LAYOUT)
    assert reason == "routing statistics of layer 1 have NaN or Inf values"


def test_norm_above_the_bound_is_rejected_and_named():
    reason = rejection(_update(np.array([3, 4, 0, 0], np.float32)), LAYOUT, max_norm=4.9)
    assert reason == "update norm 5 exceeds the bound 4.9"


def test_finite_values_whose_squares_overflow_float32_are_an_absurd_norm_not_nan():
    reason = rejection(_update(np.array([3e38, 0, 0, 0], np.float32)), LAYOUT, max_norm=1e6)
    assert reason is not None and reason.startswith("update norm 3e+38")


@pytest.mark.parametrize("delta", [np.zeros(3, np.float32), np.zeros(4, np.float64)])
def test_a_wrong_layout_is_rejected(delta):
    assert "layout needs (4,) float32" in rejection(_update(delta), LAYOUT)
