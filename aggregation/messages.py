"""What crosses the wire between the driver, the workers and the aggregator.

Frozen records, as in pfl's contexts: ``ClientInstructions`` goes down with the
round's payload, ``ClientUpdate`` comes back. Arrays placed inside are made
read-only, because ``frozen`` alone does not freeze them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from aggregation.client_terms import ClientTerm, PayloadStart
from aggregation.routing_stats import RoutingStats


def _readonly(a: np.ndarray | None) -> np.ndarray | None:
    if a is not None and a.flags.writeable:
        a.flags.writeable = False
    return a


@dataclass(frozen=True, slots=True)
class ClientInstructions:
    """What the strategy asks of one client in one round.

    Attributes
    ----------
    client_id, round_idx : int
        Who and when (rounds count from 1).
    seed : int
        The client's training seed, derived from (run seed, round, client) so it
        does not depend on which worker runs it.
    terms : tuple of ClientTerm
        Loss terms the client adds to its task loss (``aggregation.client_terms``): the client side of the
        strategy, applied by the engine without knowing which strategy sent them.
    start : PayloadStart or None
        Values the client trains from instead of the global payload's at their range (a personalised
        client's own experts); its delta is measured from that start.
    residual : ndarray [layout.total] or None
        The client's error-feedback residual from its last compressed update
        (client-side state, kept for it by the aggregator between rounds).
    """

    client_id: int
    round_idx: int
    seed: int
    terms: tuple[ClientTerm, ...] = ()
    start: PayloadStart | None = None
    residual: np.ndarray | None = None

    def __post_init__(self) -> None:
        _readonly(self.residual)


@dataclass(frozen=True, slots=True)
class ClientUpdate:
    """One client's result for one round.

    Attributes
    ----------
    client_id, round_idx : int
    n_examples : float
        Training examples, the update's FedAvg weight; fractional once an
        asynchronous update's staleness discount is applied.
    delta : ndarray [layout.total] float32
        θ_i − θ_g over the flat trainable payload.
    routing : tuple of RoutingStats
        One entry per MoE layer, after local training.
    metrics : dict of str to (sum, weight)
        Summable training metrics, e.g. ``{"train_loss": (Σ loss·n, n)}``.
    compute_seconds : float
        Measured local-training time of this client on its worker.
    bytes_down, bytes_up : dict of str to int
        Bytes by payload class: ``PayloadLayout.class_bytes`` keys ("shared",
        "router/L<l>", "expert/L<l>/E<e>") and "routing_stats"; as encoded on the wire.
    residual : ndarray [layout.total] or None
        The new error-feedback residual (compressed uplinks only); client-side
        state, not counted in ``bytes_up``.
    """

    client_id: int
    round_idx: int
    n_examples: float
    delta: np.ndarray
    routing: tuple[RoutingStats, ...]
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)
    compute_seconds: float = 0.0
    bytes_down: dict[str, int] = field(default_factory=dict)
    bytes_up: dict[str, int] = field(default_factory=dict)
    residual: np.ndarray | None = None

    def __post_init__(self) -> None:
        _readonly(self.delta)

    def metric(self, name: str) -> float:
        """Mean value of a summable metric (nan when absent or of zero weight)."""
        s, w = self.metrics.get(name, (0.0, 0.0))
        return s / w if w else float("nan")
