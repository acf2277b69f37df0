"""Client-side terms and the payload start: hand-computed values, validation, read-only arrays, pickling."""

from __future__ import annotations

import dataclasses
import math
import pickle

import numpy as np
import pytest
import torch

from aggregation import ClientInstructions, ClientTerm, PayloadStart, ProximalTerm, RoutingRegulariserTerm, TermInputs
from aggregation.routing_regulariser import routing_regulariser

CPU = torch.device("cpu")


def _inputs(params, start=(), weights=None, probs=(), masks=(), top_k=1) -> TermInputs:
    return TermInputs(
        params=list(params), start=list(start),
        param_weights=list(weights) if weights is not None else [1.0] * len(params),
        probs=list(probs), masks=list(masks), top_k=top_k,
    )


class TestProximalTerm:
    def test_value_is_half_mu_times_the_weighted_squared_distance_to_the_start(self):
        # Prepare: ‖p0 − a0‖² = 1 + 4 = 5 with weight 1; ‖p1 − a1‖² = 9 with weight 2
        p = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
        a = [torch.tensor([0.0, 0.0]), torch.tensor([[0.0]])]

        # Execute
        value = ProximalTerm(0.5).bind(CPU)(_inputs(p, a, weights=[1.0, 2.0]))

        # Assert: (0.5 / 2)·(1·5 + 2·9) = 5.75
        assert math.isclose(value.item(), 5.75, rel_tol=1e-6)

    def test_gradient_is_mu_times_weight_times_the_distance(self):
        # Prepare
        p = [torch.tensor([1.0, -2.0], requires_grad=True), torch.tensor([0.5], requires_grad=True)]
        a = [torch.tensor([0.5, 1.0]), torch.tensor([-1.5])]
        mu, weights = 0.3, [1.0, 4.0]

        # Execute
        ProximalTerm(mu).bind(CPU)(_inputs(p, a, weights=weights)).backward()

        # Assert: ∂/∂p of (μ/2)·w·‖p − a‖² = μ·w·(p − a)
        for param, anchor, w in zip(p, a, weights, strict=True):
            torch.testing.assert_close(param.grad, mu * w * (param.detach() - anchor))

    def test_value_is_zero_at_the_start(self):
        # Prepare
        p = [torch.tensor([1.0, 2.0])]

        # Execute / Assert
        assert ProximalTerm(10.0).bind(CPU)(_inputs(p, [t.clone() for t in p])).item() == 0.0

    def test_asks_for_the_start_values_and_not_for_the_routing(self):
        # Execute / Assert
        assert (ProximalTerm.reads_start, ProximalTerm.reads_routing) == (True, False)
        assert isinstance(ProximalTerm(0.1), ClientTerm)


class TestRoutingRegulariserTerm:
    @pytest.mark.parametrize("form", ["token", "batch"])
    def test_value_is_weight_times_the_routing_regulariser_on_the_same_inputs(self, form):
        # Prepare: two layers of three tokens over three experts, the second layer with a padding token
        probs = [torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]),
                 torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.3, 0.4], [0.05, 0.9, 0.05]])]
        masks = [None, torch.tensor([True, True, False])]
        p_g = np.array([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]])
        alpha = np.array([[2.0, 1.0, 0.5], [1.0, 0.0, 1.0]])
        term = RoutingRegulariserTerm(0.7, p_g, alpha, form)

        # Execute
        value = term.bind(CPU)(_inputs([], probs=probs, masks=masks, top_k=2))

        # Assert
        expected = routing_regulariser(
            probs, masks, torch.tensor(p_g, dtype=torch.float32), torch.tensor(alpha, dtype=torch.float32),
            top_k=2, form=form,
        )
        assert value.item() > 0
        assert math.isclose(value.item(), 0.7 * expected.item(), rel_tol=1e-6)

    def test_asks_for_the_routing_and_not_for_the_start(self):
        # Execute / Assert
        assert (RoutingRegulariserTerm.reads_routing, RoutingRegulariserTerm.reads_start) == (True, False)
        assert RoutingRegulariserTerm(0.1, np.ones((1, 2)), np.ones((1, 2))).form == "token"

    @pytest.mark.parametrize(
        ("p_g_shape", "alpha_shape"), [((2, 3), (2, 4)), ((2, 3), (3, 3)), ((3,), (3,)), ((1, 2, 3), (1, 2, 3))]
    )
    def test_rejects_p_g_and_alpha_unless_both_are_the_same_l_by_e(self, p_g_shape, alpha_shape):
        # Execute / Assert
        with pytest.raises(ValueError, match=r"p_g .* and alpha .* must both be \[L, E\]"):
            RoutingRegulariserTerm(0.1, np.ones(p_g_shape), np.ones(alpha_shape))

    def test_arrays_are_read_only_after_construction(self):
        # Prepare
        p_g, alpha = np.full((2, 2), 0.5), np.ones((2, 2))

        # Execute
        term = RoutingRegulariserTerm(0.1, p_g, alpha)

        # Assert
        with pytest.raises(ValueError, match="read-only"):
            term.p_g[0, 0] = 1.0
        with pytest.raises(ValueError, match="read-only"):
            term.alpha[1, 1] = 0.0
        with pytest.raises(dataclasses.FrozenInstanceError):
            term.weight = 1.0  # type: ignore[misc]

    def test_bound_term_holds_its_own_copies_of_the_arrays(self):
        # Prepare: a read-only view of a writable base; a later write to the base must not reach the term
        base = np.full((1, 2), 0.5)
        view = base.view()
        term = RoutingRegulariserTerm(1.0, view, np.ones((1, 2)))
        bound = term.bind(CPU)
        probs = [torch.tensor([[0.9, 0.1]])]
        before = bound(_inputs([], probs=probs, masks=[None])).item()

        # Execute
        base[0, 0] = 0.01

        # Assert
        assert bound(_inputs([], probs=probs, masks=[None])).item() == before


class TestPayloadStart:
    def test_stop_and_covers_follow_offset_and_length(self):
        # Execute
        start = PayloadStart(4, np.zeros(6, dtype=np.float32))

        # Assert
        assert start.stop == 10
        assert start.covers((4, 10)) and start.covers((5, 7))
        assert not start.covers((3, 5)) and not start.covers((9, 11)) and not start.covers((0, 4))

    @pytest.mark.parametrize(
        ("offset", "values"), [(-1, np.zeros(3, dtype=np.float32)), (0, np.zeros((2, 3), dtype=np.float32))]
    )
    def test_rejects_a_negative_offset_or_values_not_one_dimensional(self, offset, values):
        # Execute / Assert
        with pytest.raises(ValueError, match="a payload start needs offset >= 0 and 1-D values"):
            PayloadStart(offset, values)

    def test_values_are_read_only_after_construction(self):
        # Execute
        start = PayloadStart(0, np.zeros(3, dtype=np.float32))

        # Assert
        with pytest.raises(ValueError, match="read-only"):
            start.values[0] = 1.0


class TestPickling:
    def test_terms_start_and_instructions_survive_pickling_with_equal_arrays(self):
        # Prepare
        p_g = np.array([[0.6, 0.4], [0.3, 0.7]])
        alpha = np.array([[1.0, 0.5], [0.0, 1.0]])
        reg = RoutingRegulariserTerm(0.2, p_g, alpha, "batch")
        start = PayloadStart(3, np.arange(4, dtype=np.float32))
        ins = ClientInstructions(
            client_id=5, round_idx=2, seed=9, terms=(reg, ProximalTerm(0.01)), start=start,
            residual=np.ones(7, dtype=np.float32),
        )

        # Execute
        back = pickle.loads(pickle.dumps(ins))

        # Assert
        assert (back.client_id, back.round_idx, back.seed) == (5, 2, 9)
        reg_back, prox_back = back.terms
        assert prox_back == ProximalTerm(0.01)
        assert isinstance(reg_back, RoutingRegulariserTerm)
        assert (reg_back.weight, reg_back.form) == (0.2, "batch")
        np.testing.assert_array_equal(reg_back.p_g, p_g)
        np.testing.assert_array_equal(reg_back.alpha, alpha)
        assert back.start.offset == 3
        np.testing.assert_array_equal(back.start.values, start.values)
        assert back.start.values.dtype == np.float32
        np.testing.assert_array_equal(back.residual, ins.residual)
