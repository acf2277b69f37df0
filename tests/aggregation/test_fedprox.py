"""FedProx: FedAvg's server step, plus a ProximalTerm(μ) sent to every client for its proximal term."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from aggregation import ClientInstructions, FedAvg, FedProx, FedProxOptions, LayoutMismatch, ProximalTerm

CLIENTS = [(1, 1, [4.0, 0.0, -8.0, 2.0]), (2, 3, [0.0, 4.0, 8.0, -2.0]), (3, 2, [0.5, -0.25, 1.0, 3.0])]


def _aggregate(strategy, make_reader, clients, round_idx=1):
    strategy.begin(np.array([1.0, -2.0, 0.5, 0.0], dtype=np.float32), round_idx=round_idx)
    for cid, n, delta in clients:
        strategy.add(make_reader(cid, round_idx, n, delta))
    return strategy.finish()


class TestFedProxSuccess:
    def test_configure_carries_a_proximal_term_when_mu_is_set(self, layout4):
        # Prepare
        strategy = FedProx(layout4, FedProxOptions(mu=0.01))

        # Execute
        ins = strategy.configure(3, 2, seed=11)

        # Assert
        assert ins == ClientInstructions(client_id=3, round_idx=2, seed=11, terms=(ProximalTerm(0.01),))
        assert strategy.options.mu == 0.01

    def test_constructor_accepts_zero_mu_and_then_sends_no_term(self, layout4):
        # Execute
        strategy = FedProx(layout4, FedProxOptions(mu=0.0))

        # Assert
        assert strategy.configure(1, 1, seed=0).terms == ()

    def test_default_options_are_mu_0_01(self, layout4):
        # Execute
        strategy = FedProx(layout4)

        # Assert
        assert strategy.options == FedProxOptions(mu=0.01)
        assert strategy.configure(1, 1, seed=0).terms == (ProximalTerm(0.01),)

    def test_finish_equals_fedavg_when_given_the_same_updates(self, layout4, make_reader):
        # Execute
        prox = _aggregate(FedProx(layout4, FedProxOptions(mu=0.1)), make_reader, CLIENTS)
        avg = _aggregate(FedAvg(layout4), make_reader, CLIENTS)

        # Assert: hand value of the mean Δ = ([4,0,-8,2] + 3·[0,4,8,-2] + 2·[0.5,-0.25,1,3]) / 6
        np.testing.assert_array_equal(prox.payload, avg.payload)
        expected = np.array([1 + 5 / 6, -2 + 11.5 / 6, 0.5 + 18 / 6, 2 / 6], dtype=np.float32)
        np.testing.assert_array_equal(prox.payload, expected)
        assert prox.client_weights == avg.client_weights
        assert prox.report == avg.report

    def test_name_differs_from_fedavg(self, layout4):
        # Execute / Assert
        assert (FedProx.name, FedAvg.name) == ("fedprox", "fedavg")


class TestFedProxFailure:
    @pytest.mark.parametrize("mu", [-0.01, -1.0, float("nan"), float("inf")])
    def test_options_raise_validation_error_naming_mu_when_it_is_negative_or_not_finite(self, mu):
        # Execute / Assert
        with pytest.raises(ValidationError) as err:
            FedProxOptions(mu=mu)
        assert [e["loc"] for e in err.value.errors()] == [("mu",)]

    def test_add_raises_when_the_same_client_is_added_twice(self, layout4, make_reader):
        # Execute / Assert
        with pytest.raises(ValueError, match="client 1: update added twice"):
            _aggregate(FedProx(layout4, FedProxOptions(mu=0.1)), make_reader, [CLIENTS[0], CLIENTS[0]])

    def test_add_raises_layout_mismatch_naming_client_and_round_when_update_has_wrong_length(
        self, layout4, make_reader
    ):
        # Execute / Assert
        with pytest.raises(LayoutMismatch, match="client 4 round 2 delta: has 2 values, layout expects 4"):
            _aggregate(FedProx(layout4, FedProxOptions(mu=0.1)), make_reader, [(4, 1, [1.0, 2.0])], round_idx=2)

    def test_constructor_raises_type_error_when_given_a_bare_mu_instead_of_its_options(self, layout4):
        # Execute / Assert
        with pytest.raises(TypeError, match="FedProx takes FedProxOptions, got float"):
            FedProx(layout4, 0.1)  # type: ignore[arg-type]
