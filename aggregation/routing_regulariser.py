"""FedAlign-MoE's client-side routing regulariser (spec: "Module 1 — distribution regularisation").

L_reg pulls each client's routing toward the global routing distribution p_g
without overriding it: per token, only the experts the token is routed to
(its top-k set K(x)) contribute, each weighted by the client's adaptive
α_i(e). Plain torch, so gradients reach the router and, through x, earlier
trainable parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

RegForm = Literal["token", "batch"]


def routing_regulariser(
    probs: list[torch.Tensor],
    masks: Sequence[torch.Tensor | None],
    p_g: torch.Tensor,
    alpha: torch.Tensor,
    *,
    top_k: int,
    form: RegForm = "token",
) -> torch.Tensor:
    """Mean over MoE layers of the layer's regulariser.

    Parameters
    ----------
    probs : list of Tensor [tokens, E]
        Router probabilities p(x) of each MoE layer, with their autograd graph.
    masks : sequence of (Tensor [tokens] of bool, or None)
        Per MoE layer, its real (non-padding) tokens; None counts every token.
    p_g : Tensor [L, E]
        Global routing distribution of the previous round.
    alpha : Tensor [L, E]
        The client's adaptive expert weights α_i(e).
    top_k : int
        k of the top-k routing.
    form : {"token", "batch"}
        "token" (spec default): mean over tokens of Σ_{e∈K(x)} α(e)·p_e(x)·log(p_e(x)/p_g(e)).
        "batch": KL(p̄_batch ‖ p_g) with p̄_batch the mean of p(x) over the batch's tokens.
    """
    eps = 1e-12
    terms = []
    for layer, (p, mask) in enumerate(zip(probs, masks, strict=True)):
        if mask is not None:
            p = p[mask]
        log_ratio = torch.log(p.clamp_min(eps)) - torch.log(p_g[layer].clamp_min(eps))
        if form == "batch":
            p_bar = p.mean(dim=0)
            terms.append((p_bar * (torch.log(p_bar.clamp_min(eps)) - torch.log(p_g[layer].clamp_min(eps)))).sum())
            continue
        routed = torch.zeros_like(p, dtype=torch.bool).scatter_(1, p.detach().topk(top_k, dim=-1).indices, True)
        per_token = (routed * alpha[layer] * p * log_ratio).sum(dim=-1)  # Σ_{e∈K(x)} α(e) p_e log(p_e / p_g(e))
        terms.append(per_token.mean())
    return torch.stack(terms).mean()
