"""ClientInstructions / ClientUpdate: frozen records whose arrays become read-only; summable metrics."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from aggregation import (
    ClientInstructions,
    ClientUpdate,
    PayloadStart,
    ProximalTerm,
    RoutingRegulariserTerm,
    RoutingStats,
)


def _update(**kw) -> ClientUpdate:
    base = dict(client_id=4, round_idx=2, n_examples=10, delta=np.zeros(3, dtype=np.float32), routing=())
    return ClientUpdate(**(base | kw))


class TestClientInstructions:
    def test_arrays_become_read_only_when_placed_inside(self):
        # Prepare
        p_g = np.full((2, 3), 1 / 3)
        alpha = np.ones((2, 3))
        own = np.zeros(4, dtype=np.float32)
        residual = np.zeros(6, dtype=np.float32)

        # Execute
        ins = ClientInstructions(
            client_id=1, round_idx=1, seed=7, terms=(RoutingRegulariserTerm(0.1, p_g, alpha),),
            start=PayloadStart(2, own), residual=residual,
        )

        # Assert
        term = ins.terms[0]
        assert isinstance(term, RoutingRegulariserTerm)
        assert ins.start is not None and ins.residual is not None
        assert not term.p_g.flags.writeable
        assert not term.alpha.flags.writeable
        assert not ins.start.values.flags.writeable
        assert not ins.residual.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            term.p_g[0, 0] = 1.0
        with pytest.raises(ValueError, match="read-only"):
            term.alpha[1, 2] = 0.0
        with pytest.raises(ValueError, match="read-only"):
            ins.start.values[0] = 1.0
        with pytest.raises(ValueError, match="read-only"):
            ins.residual[0] = 1.0

    def test_defaults_disable_every_client_side_term_when_not_given(self):
        # Execute
        ins = ClientInstructions(client_id=1, round_idx=3, seed=9)

        # Assert
        assert (ins.terms, ins.start, ins.residual) == ((), None, None)

    def test_fields_cannot_be_reassigned_when_frozen(self):
        # Prepare
        ins = ClientInstructions(client_id=1, round_idx=1, seed=7)

        # Execute / Assert
        with pytest.raises(dataclasses.FrozenInstanceError):
            ins.terms = (ProximalTerm(0.5),)  # type: ignore[misc]


class TestClientUpdate:
    def test_delta_becomes_read_only_when_placed_inside(self):
        # Prepare
        delta = np.array([1.0, 2.0, 3.0], dtype=np.float32)

        # Execute
        u = _update(delta=delta)

        # Assert
        assert not u.delta.flags.writeable
        with pytest.raises(ValueError, match="read-only"):
            u.delta[0] = 0.0
        np.testing.assert_array_equal(u.delta, [1.0, 2.0, 3.0])

    def test_delta_is_accepted_when_already_read_only(self):
        # Prepare
        delta = np.zeros(3, dtype=np.float32)
        delta.flags.writeable = False

        # Execute
        u = _update(delta=delta)

        # Assert
        assert not u.delta.flags.writeable

    def test_fields_cannot_be_reassigned_when_frozen(self):
        # Prepare
        u = _update()

        # Execute / Assert
        with pytest.raises(dataclasses.FrozenInstanceError):
            u.n_examples = 11  # type: ignore[misc]

    def test_metric_returns_sum_over_weight_when_present(self):
        # Prepare
        u = _update(metrics={"train_loss": (6.0, 4.0), "accuracy": (3.0, 12.0)})

        # Execute / Assert
        assert u.metric("train_loss") == 1.5
        assert u.metric("accuracy") == 0.25

    def test_metric_returns_nan_when_absent(self):
        # Prepare
        u = _update(metrics={"train_loss": (6.0, 4.0)})

        # Execute / Assert
        assert math.isnan(u.metric("eval_loss"))

    def test_metric_returns_nan_when_weight_is_zero(self):
        # Prepare
        u = _update(metrics={"train_loss": (0.0, 0.0)})

        # Execute / Assert
        assert math.isnan(u.metric("train_loss"))

    def test_defaults_are_empty_and_not_shared_between_updates(self):
        # Execute
        a, b = _update(), _update()

        # Assert
        assert (a.metrics, a.bytes_down, a.bytes_up, a.compute_seconds) == ({}, {}, {}, 0.0)
        assert a.metrics is not b.metrics
        assert a.bytes_up is not b.bytes_up

    def test_routing_is_kept_per_layer_when_given(self):
        # Prepare
        layers = (RoutingStats.zeros(3, 2), RoutingStats.zeros(3, 2))

        # Execute
        u = _update(routing=layers)

        # Assert
        assert len(u.routing) == 2
        assert u.routing[1] is layers[1]
