"""Routing statistics and router probabilities, observed through forward hooks.

One mechanism for every family: a forward hook on each MoE layer's router
module (found through the family spec) sees the router's input x [tokens, H]
and its logits (the first element when the router returns ``(logits, top-k
weights, top-k indices)`` as in transformers 5.x, the last of Switch's
``(dispatch, probability, logits)``),
so no model code is patched and any forward pass (training, evaluation,
``generate``) can be observed. K(x) is the set of experts the router chose
(its top-k indices when it returns them, else the top-k of p(x)), so a
router that selects on other scores (DeepSeek-V3: sigmoid scores plus a bias,
within groups) is observed as it routes.

Statistics (spec ../shared/spec/fedalign_moe.md, "What a client computes and
uploads"), over the non-padding tokens only, with p(x) = softmax(W_g x) (for
a sigmoid router, its sigmoid scores normalised to sum to one):

- p_sum(e)      = Σ_x p_e(x)
- counts(e)     = #{x : e ∈ K(x)},                      K(x) = top-k of p(x) (Switch: its dispatch,
                                                        empty for a token dropped for capacity)
- margin_sum(e) = Σ_{x : e∈K(x)} p_e(x) − max_{e'∉K(x)} p_{e'}(x)   (max of nothing = 0, when k = E)
- x_sum(e)      = Σ_{x : e∈K(x)} x

Sums are kept in float64 on the model's device and leave it only in ``stats()``.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Self

import numpy as np
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from aggregation.routing_stats import RoutingStats
from fedsim.models.registry import family_of


class _LayerSums:
    """Running sums of one MoE layer (the fields of RoutingStats, as device tensors)."""

    def __init__(self, num_experts: int, hidden_size: int, device: torch.device) -> None:
        self.n_tokens = 0
        self.p_sum = torch.zeros(num_experts, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_experts, dtype=torch.float64, device=device)
        self.margin_sum = torch.zeros(num_experts, dtype=torch.float64, device=device)
        self.x_sum = torch.zeros(num_experts, hidden_size, dtype=torch.float64, device=device)

    def to_stats(self) -> RoutingStats:
        """The sums as host numpy arrays."""

        def host(t: torch.Tensor) -> np.ndarray:
            return t.cpu().numpy()

        return RoutingStats(self.n_tokens, host(self.p_sum), host(self.counts), host(self.margin_sum), host(self.x_sum))


class RoutingRecorder:
    """Records routing statistics (and optionally router probabilities) of a model's forward passes.

    Use as a context manager: the hooks are registered on entry and removed
    on exit. Set the batch's attention mask before each forward pass (an
    encoder-decoder's MoE layers see the encoder's tokens or the decoder's:
    set both); without one, every token counts.

    Parameters
    ----------
    model : nn.Module
        A model of a known family, plain or peft-wrapped.
    keep_probs : bool
        Keep, for the latest forward pass, each MoE layer's router
        probabilities [tokens, E] with their autograd graph (``probs``), for a
        regulariser on the routing. They are replaced when the next forward
        pass reaches the first MoE layer.
    collect_stats : bool
        Accumulate the routing statistics. Off, the recorder only keeps
        probabilities (e.g. during training, when statistics come from a
        separate no-grad pass).

    Attributes
    ----------
    probs : list of Tensor
        One float32 [tokens, E] tensor per MoE layer of the latest forward pass,
        in layer order, over all tokens (padding included: select with ``mask``).
    masks : list of (Tensor or None)
        Per MoE layer, the flattened boolean mask [tokens] of the stack it sits
        in (True = real token), as last set.

    Notes
    -----
    Every call of a router fires its hook, so a gradient-checkpointed
    layer, recomputed in the backward pass, would be counted twice.
    """

    def __init__(self, model: nn.Module, *, keep_probs: bool = False, collect_stats: bool = True) -> None:
        spec = family_of(model)
        config: Any = model.config
        self._routers = spec.routers(model)
        self._stacks = spec.moe_stacks(model)
        self._returns = spec.router_returns
        self._scores = spec.router_scores
        self._top_k = spec.top_k(config)
        self._num_experts = spec.num_experts(config)
        self._hidden_size = int(config.hidden_size)
        self._device = next(self._routers[0].parameters()).device
        self._keep_probs = keep_probs
        self._collect_stats = collect_stats
        self._handles: list[RemovableHandle] = []
        self._sums: list[_LayerSums] = []
        self.probs: list[torch.Tensor] = []
        self._stack_masks: tuple[torch.Tensor | None, ...] = (None, None)
        self.reset()

    def __enter__(self) -> Self:
        for layer, router in enumerate(self._routers):
            self._handles.append(router.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def set_mask(self, attention_mask: torch.Tensor | None, decoder_mask: torch.Tensor | None = None) -> None:
        """Mark the padding of the next batch: [batch, seq] with 1 for real tokens, or None for none.

        ``decoder_mask`` covers an encoder-decoder's decoder tokens (its MoE
        layers in the second stack); ``attention_mask`` covers the rest.
        """

        def flat(mask: torch.Tensor | None) -> torch.Tensor | None:
            return None if mask is None else mask.reshape(-1).to(self._device, torch.bool)

        if attention_mask is not None and decoder_mask is None and 1 in self._stacks:
            raise ValueError("an encoder-decoder's decoder MoE layers see other tokens: set decoder_mask too")

        self._stack_masks = (flat(attention_mask), flat(decoder_mask))

    @property
    def masks(self) -> list[torch.Tensor | None]:
        """Per MoE layer, the flattened boolean mask [tokens] of its stack (True = real token), as last set."""
        return [self._stack_masks[stack] for stack in self._stacks]

    def reset(self) -> None:
        """Forget the accumulated statistics."""
        self._sums = [_LayerSums(self._num_experts, self._hidden_size, self._device) for _ in self._routers]

    def stats(self) -> tuple[RoutingStats, ...]:
        """Statistics accumulated since creation or ``reset``, one per MoE layer, in layer order."""
        return tuple(s.to_stats() for s in self._sums)

    def _hook(self, layer: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self._returns == "dispatch_probs_logits":  # Switch: K(x) is its dispatch, after capacity drops
                logits, chosen = output[2], output[0].reshape(-1, output[0].shape[-1]).bool()
            else:
                logits = output[0] if isinstance(output, tuple) else output
                chosen = output[2] if isinstance(output, tuple) and len(output) >= 3 else None
            probs = routing_probabilities(logits, self._scores)
            probs = probs.reshape(-1, probs.shape[-1])  # Switch's router keeps the [batch, seq] axes
            if self._keep_probs:
                if layer == 0:
                    self.probs = []
                self.probs.append(probs)
            if self._collect_stats:
                hidden = args[0]
                with torch.no_grad():
                    self._accumulate(layer, hidden.reshape(-1, hidden.shape[-1]), probs.detach(), chosen)

        return hook

    def _accumulate(self, layer: int, x: torch.Tensor, p: torch.Tensor, chosen: torch.Tensor | None) -> None:
        """Add one batch to layer ``layer``'s sums: tokens x [tokens, H], probabilities p [tokens, E], choices.

        The router's choices: indices [tokens, k], a boolean dispatch mask [tokens, E] (a token dropped for
        capacity has none), or None for the top-k of p.
        """
        mask = self._stack_masks[self._stacks[layer]]
        if mask is not None:
            if mask.numel() != x.shape[0]:
                raise ValueError(
                    f"MoE layer {layer}: the attention mask covers {mask.numel()} tokens, "
                    f"the router saw {x.shape[0]}; call set_mask for each batch"
                )
            x, p = x[mask], p[mask]
            chosen = None if chosen is None else chosen.reshape(-1, chosen.shape[-1])[mask]
        if chosen is None:
            chosen = p.topk(self._top_k, dim=-1).indices
        if chosen.dtype == torch.bool:
            routed = chosen
        else:
            routed = torch.zeros_like(p, dtype=torch.bool).scatter_(1, chosen.long(), True)
        p64 = p.double()
        if self._top_k < p.shape[1]:
            best_unrouted = p64.masked_fill(routed, float("-inf")).amax(dim=-1, keepdim=True)
        else:
            best_unrouted = torch.zeros_like(p64[:, :1])
        routed64 = routed.double()
        s = self._sums[layer]
        s.n_tokens += int(x.shape[0])
        s.p_sum += p64.sum(dim=0)
        s.counts += routed64.sum(dim=0)
        s.margin_sum += ((p64 - best_unrouted) * routed64).sum(dim=0)  # spec stat 3, summed
        s.x_sum += routed64.T @ x.double()  # spec stat 4, summed


def routing_probabilities(logits: torch.Tensor, scores: str = "softmax") -> torch.Tensor:
    """The routing distribution p(x) [tokens, E] in float32: softmax of the logits, or normalised sigmoid scores."""
    logits = logits.float()
    if scores == "sigmoid":
        s = torch.sigmoid(logits)
        return s / s.sum(dim=-1, keepdim=True)
    return torch.softmax(logits, dim=-1)  # as the routers do: top-k is taken on float32 p
