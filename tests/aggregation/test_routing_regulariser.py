"""The routing regulariser against hand-computed values and a direct autograd formula."""

from __future__ import annotations

import math

import torch

from aggregation.routing_regulariser import routing_regulariser


def test_token_form_hand_computed_single_token() -> None:
    # Prepare: one layer, one token, p = (0.5, 0.3, 0.2), top-1 → K = {0}; p_g uniform over 3, α(0) = 2
    p = torch.tensor([[0.5, 0.3, 0.2]])
    p_g = torch.full((1, 3), 1 / 3)
    alpha = torch.tensor([[2.0, 1.0, 1.0]])
    # Execute
    value = routing_regulariser([p], [None], p_g, alpha, top_k=1)
    # Assert: 2 · 0.5 · log(0.5 / (1/3))
    assert math.isclose(value.item(), 2 * 0.5 * math.log(1.5), rel_tol=1e-6)


def test_token_form_ignores_padding_and_averages_layers() -> None:
    p0 = torch.tensor([[0.6, 0.4], [0.1, 0.9]])  # second token is padding
    p1 = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    mask = torch.tensor([True, False])
    p_g = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    alpha = torch.ones(2, 2)
    value = routing_regulariser([p0, p1], [mask, mask], p_g, alpha, top_k=1)
    expected = 0.5 * (0.6 * math.log(0.6 / 0.5) + 0.75 * math.log(0.75 / 0.5))
    assert math.isclose(value.item(), expected, rel_tol=1e-6)


def test_batch_form_is_kl_of_mean_routing() -> None:
    p = torch.tensor([[0.6, 0.4], [0.2, 0.8]])
    p_g = torch.tensor([[0.5, 0.5]])
    value = routing_regulariser([p], [None], p_g, torch.ones(1, 2), top_k=1, form="batch")
    expected = 0.4 * math.log(0.4 / 0.5) + 0.6 * math.log(0.6 / 0.5)
    assert math.isclose(value.item(), expected, rel_tol=1e-5)  # float32 inputs


def test_gradient_matches_direct_formula() -> None:
    # Prepare: logits → softmax, top-2 of 4, random α and p_g
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    p_g = torch.softmax(torch.randn(1, 4, generator=gen, dtype=torch.float64), dim=-1)
    alpha = torch.rand(1, 4, generator=gen, dtype=torch.float64)
    # Execute
    p = torch.softmax(logits, dim=-1)
    grad = torch.autograd.grad(routing_regulariser([p], [None], p_g, alpha, top_k=2), logits)[0]
    # Direct formula with an explicit top-2 mask built by hand
    top = torch.zeros(5, 4, dtype=torch.float64)
    for t, row in enumerate(torch.softmax(logits, -1).detach()):
        for e in row.argsort(descending=True)[:2]:
            top[t, e] = 1.0
    p2 = torch.softmax(logits, dim=-1)
    direct = (top * alpha[0] * p2 * torch.log(p2 / p_g[0])).sum(-1).mean()
    grad_direct = torch.autograd.grad(direct, logits)[0]
    # Assert
    torch.testing.assert_close(grad, grad_direct)
