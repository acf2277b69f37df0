"""Routing statistics of one MoE layer, as summable sums and counts.

A client's statistics are accumulated batch by batch (and, for a worker group,
rank by rank) by plain addition; the quantities of the spec (p̄, margin, μ) are
derived only when read, so the order of accumulation cannot change them.
Spec: ../shared/spec/fedalign_moe.md, "What a client computes and uploads".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Self

import numpy as np

# Divides sums by counts that may be fractional (a stale update's discounted statistics): where a count is
# 0 its sums are 0 too, so dividing by this instead gives the 0 an unused expert's mean is defined as.
_TINY = 1e-30


@dataclass(frozen=True, slots=True)
class RoutingStats:
    """Sums over the non-padding tokens a client routed through one MoE layer.

    ``stack`` puts a cohort's statistics of one layer on a leading client axis
    (n_tokens [N], the arrays [N, E] and [N, E, d]); every derived quantity
    below is then computed for all N clients in one operation.

    Attributes
    ----------
    n_tokens : int or float
        Number of tokens counted (fractional once ``scaled`` by a staleness discount).
    p_sum : ndarray [E]
        Σ_x p_e(x), the summed router probabilities.
    counts : ndarray [E]
        #{x : e ∈ K(x)}, tokens whose top-k set holds expert e.
    margin_sum : ndarray [E]
        Σ over routed x of p_e(x) − max_{e'∉K(x)} p_{e'}(x).
    x_sum : ndarray [E, d]
        Σ over routed x of the hidden state x entering the MoE block.
    """

    n_tokens: float | np.ndarray
    p_sum: np.ndarray
    counts: np.ndarray
    margin_sum: np.ndarray
    x_sum: np.ndarray

    @classmethod
    def zeros(cls, num_experts: int, hidden_size: int) -> Self:
        """Statistics of no tokens, the identity of ``+``."""
        return cls(
            n_tokens=0,
            p_sum=np.zeros(num_experts, dtype=np.float64),
            counts=np.zeros(num_experts, dtype=np.float64),
            margin_sum=np.zeros(num_experts, dtype=np.float64),
            x_sum=np.zeros((num_experts, hidden_size), dtype=np.float64),
        )

    @classmethod
    def stack(cls, stats: Sequence[Self]) -> Self:
        """The statistics of N clients (one layer) on a leading client axis.

        One ``concatenate`` per field rather than ``np.stack``, whose per-array
        Python work (~1.5 µs) was most of FedAlign-MoE's stacking time at 100 clients.
        """
        if not stats:
            raise ValueError("RoutingStats.stack needs at least one client's statistics")
        columns = []
        for f in fields(cls):
            arrays = [np.asarray(getattr(st, f.name)) for st in stats]
            shape = arrays[0].shape
            if any(a.shape != shape for a in arrays):
                raise ValueError(
                    f"cannot stack RoutingStats whose {f.name} shapes differ: {sorted({a.shape for a in arrays})}"
                )
            columns.append(np.array(arrays) if not shape else np.concatenate(arrays).reshape(len(arrays), *shape))
        return cls(*columns)

    def __add__(self, other: Self) -> Self:
        if self.x_sum.shape != other.x_sum.shape:
            raise ValueError(f"cannot add RoutingStats of shapes {self.x_sum.shape} and {other.x_sum.shape}")
        # Field by field, not dataclasses.astuple (which deep-copies the arrays).
        return type(self)(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def scaled(self, factor: float) -> Self:
        """Every sum times ``factor`` (a stale update's discount); the means p̄, m and μ are unchanged."""
        return type(self)(self.n_tokens * factor, self.p_sum * factor, self.counts * factor, self.margin_sum * factor,
                          self.x_sum * factor)

    @property
    def num_experts(self) -> int:
        """E, the layer's number of experts (the last axis of ``p_sum``)."""
        return int(self.p_sum.shape[-1])

    @property
    def p_bar(self) -> np.ndarray:
        """Spec stat 1: p̄(e), the mean router probability [E]."""
        return self.p_sum / np.maximum(self.n_tokens, _TINY)[..., None]

    @property
    def margin(self) -> np.ndarray:
        """Spec stat 3: m(e), mean routing margin over routed tokens, 0 where unused [E]."""
        # an unused expert's sum is 0: 0 / tiny = 0
        margin: np.ndarray = self.margin_sum / np.maximum(self.counts, _TINY)
        return margin

    @property
    def mu(self) -> np.ndarray:
        """Spec stat 4: μ(e), the semantic signature, mean routed hidden state [E, d]."""
        mu: np.ndarray = self.x_sum / np.maximum(self.counts, _TINY)[..., None]
        return mu

    @property
    def nbytes(self) -> int:
        """Bytes these statistics take on the wire."""
        arrays: int = sum(getattr(self, f.name).nbytes for f in fields(self) if f.name != "n_tokens")
        return 8 + arrays


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Total variation distance ½·Σ|p − q| between two distributions over experts."""
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())
