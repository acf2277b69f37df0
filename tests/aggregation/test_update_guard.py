"""Which client updates the aggregator refuses to merge, and why."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from aggregation import ArrayReader, ClientUpdate, EntrySpec, FedAvg, PayloadLayout, RoutingStats
from aggregation.update_guard import expected_routing, rejection

LAYOUT = PayloadLayout.build([EntrySpec("w", "shared", None, None, (4,))])
# Two MoE layers of 3 experts, hidden width 2: routers [3, 2] and one LoRA factor per expert.
MOE = PayloadLayout.build(
    [EntrySpec("attn", "shared", None, None, (2,))]
    + [EntrySpec(f"router{layer}", "router", layer, None, (3, 2)) for layer in range(2)]
    + [EntrySpec(f"lora{layer}.{e}", "expert", layer, e, (1, 2)) for layer in range(2) for e in range(3)]
)


def _update(delta: Any, routing: Any = (), **fields: Any) -> ClientUpdate:
    return ClientUpdate(1, 1, fields.pop("n_examples", 5), np.asarray(delta), tuple(routing), **fields)


def _stats(x_sum: float = 0.0) -> RoutingStats:
    return RoutingStats(n_tokens=2, p_sum=np.ones(2), counts=np.ones(2), margin_sum=np.zeros(2),
                        x_sum=np.full((2, 1), x_sum))


def _moe_stats(experts: int = 3, hidden: int = 2) -> RoutingStats:
    return RoutingStats(n_tokens=4, p_sum=np.full(experts, 4 / experts), counts=np.full(experts, 2.0),
                        margin_sum=np.full(experts, 0.5), x_sum=np.ones((experts, hidden)))


def _moe_update(routing: Any, **fields: Any) -> ClientUpdate:
    return _update(np.zeros(MOE.total, np.float32), routing, **fields)


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


class TestNExamples:
    """n_examples weighs the client in the merge: NaN poisons FedAvg, ≤ 0 raises inside the strategy."""

    @pytest.mark.parametrize("n", [float("nan"), np.float64("nan"), float("inf"), -float("inf"), 0, -3, 0.0])
    def test_n_examples_that_is_not_a_finite_positive_number_is_rejected(self, n):
        # Prepare
        update = _update(np.zeros(4, np.float32), n_examples=n)

        # Execute
        reason = rejection(update, LAYOUT)

        # Assert
        assert reason == f"n_examples is {n}, must be a finite number > 0"

    def test_nan_n_examples_is_reported_as_nan(self):
        reason = rejection(_update(np.zeros(4, np.float32), n_examples=float("nan")), LAYOUT)
        assert reason.startswith("n_examples is nan,")

    @pytest.mark.parametrize("n", [None, "5", True])
    def test_n_examples_that_is_not_a_number_is_rejected(self, n):
        assert rejection(_update(np.zeros(4, np.float32), n_examples=n), LAYOUT).startswith(f"n_examples is {n},")

    @pytest.mark.parametrize("n", [1, np.int64(7), 0.5])
    def test_a_positive_finite_n_examples_passes(self, n):
        assert rejection(_update(np.zeros(4, np.float32), n_examples=n), LAYOUT) is None

    def test_a_nan_n_examples_would_otherwise_make_fedavg_all_nan(self):
        """Why the guard checks n_examples at all: the strategy's own boundary check lets NaN through."""
        # Prepare
        strategy = FedAvg(LAYOUT)
        strategy.begin(np.zeros(4, np.float32), round_idx=1)
        bad = _update(np.ones(4, np.float32), n_examples=float("nan"))

        # Execute
        strategy.add(ArrayReader(bad))
        payload = strategy.finish().payload

        # Assert
        assert rejection(bad, LAYOUT) is not None and np.isnan(payload).all()


class TestRoutingShape:
    """The routing statistics must match the MoE layers and experts the server's layout has."""

    def test_expected_routing_comes_from_the_routers_of_the_layout(self):
        assert expected_routing(MOE) == ((3, 2), (3, 2))

    def test_expected_routing_without_routers_counts_the_experts(self):
        # Prepare
        layout = PayloadLayout.build([EntrySpec(f"lora.{e}", "expert", 0, e, (1, 2)) for e in range(5)])

        # Execute
        shape = expected_routing(layout)

        # Assert
        assert shape == ((5, None),)

    def test_a_layout_without_moe_layers_expects_nothing(self):
        assert expected_routing(LAYOUT) is None

    def test_matching_statistics_pass(self):
        assert rejection(_moe_update([_moe_stats(), _moe_stats()]), MOE) is None

    def test_an_update_without_routing_statistics_passes(self):
        """train.routing_stats=off sends none; a strategy that needs them is refused at config load."""
        assert rejection(_moe_update(()), MOE) is None

    def test_one_layer_too_few_is_rejected(self):
        reason = rejection(_moe_update([_moe_stats()]), MOE)
        assert reason == "routing statistics have 1 layers, the layout has 2 MoE layers"

    def test_one_layer_too_many_is_rejected(self):
        reason = rejection(_moe_update([_moe_stats()] * 3), MOE)
        assert reason == "routing statistics have 3 layers, the layout has 2 MoE layers"

    def test_one_expert_too_few_is_rejected(self):
        reason = rejection(_moe_update([_moe_stats(), _moe_stats(experts=2)]), MOE)
        assert reason == "routing statistics of layer 1: p_sum has shape [2], expected [3]"

    def test_a_counts_array_of_another_length_is_rejected(self):
        st = replace(_moe_stats(), counts=np.ones(4))
        reason = rejection(_moe_update([st, _moe_stats()]), MOE)
        assert reason == "routing statistics of layer 0: counts has shape [4], expected [3]"

    def test_a_wrong_hidden_width_of_x_sum_is_rejected(self):
        reason = rejection(_moe_update([_moe_stats(hidden=3), _moe_stats()]), MOE)
        assert reason == "routing statistics of layer 0: x_sum has shape [3, 3], expected [3, 2]"

    @pytest.mark.parametrize("n_tokens", [-1, float("nan"), float("inf"), None])
    def test_a_negative_or_non_finite_token_count_is_rejected(self, n_tokens):
        st = replace(_moe_stats(), n_tokens=n_tokens)
        reason = rejection(_moe_update([_moe_stats(), st]), MOE)
        assert reason == f"routing statistics of layer 1: n_tokens is {n_tokens}, must be a finite number >= 0"

    def test_nan_in_margin_sum_is_rejected(self):
        st = replace(_moe_stats(), margin_sum=np.array([0.5, np.nan, 0.5]))
        reason = rejection(_moe_update([st, _moe_stats()]), MOE)
        assert reason == "routing statistics of layer 0 have NaN or Inf values"

    def test_a_non_numeric_array_is_rejected(self):
        st = replace(_moe_stats(), p_sum=np.array(["a", "b", "c"]))
        reason = rejection(_moe_update([st, _moe_stats()]), MOE)
        assert reason == "routing statistics of layer 0: p_sum is not a numeric array (<U1)"

    def test_without_a_layout_to_compare_the_layers_must_agree_with_themselves(self):
        st = replace(_stats(), counts=np.ones(3))
        reason = rejection(_update(np.zeros(4, np.float32), [st]), LAYOUT)
        assert reason == "routing statistics of layer 0: counts has shape [3], expected [2]"


class TestSideChannels:
    """Metrics, timing, byte counts and the residual feed the round's tables and the simulated clock."""

    @pytest.mark.parametrize("pair", [(float("nan"), 4.0), (1.0, float("inf")), (1.0, -1.0), (1.0,), "x"])
    def test_a_metric_that_is_not_a_finite_sum_weight_pair_is_rejected(self, pair):
        reason = rejection(_update(np.zeros(4, np.float32), metrics={"train_loss": pair}), LAYOUT)
        assert reason == (f"metric 'train_loss' is {pair!r}, must be a (sum, weight) pair of finite numbers "
                          "with weight >= 0")

    def test_finite_metrics_pass(self):
        metrics = {"train_loss": (3.0, 2.0), "gpu_peak_mib": (np.float64(5), 1)}
        update = _update(np.zeros(4, np.float32), metrics=metrics)
        assert rejection(update, LAYOUT) is None

    @pytest.mark.parametrize("seconds", [float("nan"), -0.5])
    def test_bad_compute_seconds_are_rejected(self, seconds):
        reason = rejection(_update(np.zeros(4, np.float32), compute_seconds=seconds), LAYOUT)
        assert reason == f"compute_seconds is {seconds}, must be a finite number >= 0"

    def test_a_negative_byte_count_is_rejected(self):
        reason = rejection(_update(np.zeros(4, np.float32), bytes_up={"shared": -8}), LAYOUT)
        assert reason == "bytes_up['shared'] is -8, must be an integer >= 0"

    def test_a_residual_off_the_layout_is_rejected(self):
        reason = rejection(_update(np.zeros(4, np.float32), residual=np.zeros(5, np.float32)), LAYOUT)
        assert reason == "residual has shape (5,) and dtype float32, layout needs (4,) float32"

    def test_n_examples_is_checked_before_the_delta(self):
        """The first reason a round reports should be the root cause, not its symptom."""
        reason = rejection(_update(np.full(4, np.nan, np.float32), n_examples=float("nan")), LAYOUT)
        assert reason.startswith("n_examples is nan")
