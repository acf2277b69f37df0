"""Streaming n-weighted mean of flat updates, shared by FedAvg and FedProx."""

from __future__ import annotations

import numpy as np

from aggregation.payload import PAYLOAD_DTYPE


class WeightedMeanAccumulator:
    """Σ_i w_i·Δ_i and Σ_i w_i, accumulated in float64 one update at a time.

    Holds one model-sized float64 buffer whatever the cohort size.
    """

    def __init__(self, size: int) -> None:
        self._sum = np.zeros(size, dtype=np.float64)
        self.weights: dict[int, float] = {}

    def add(self, client_id: int, delta: np.ndarray, weight: float) -> None:
        if client_id in self.weights:
            raise ValueError(f"client {client_id}: update added twice in one round")
        np.add(self._sum, np.multiply(delta, weight, dtype=np.float64), out=self._sum)
        self.weights[client_id] = float(weight)

    def apply(self, base: np.ndarray) -> np.ndarray:
        """base + Σ w_i Δ_i / Σ w_i as float32; ``base`` itself when no weight arrived."""
        total = sum(self.weights.values())
        if total == 0:
            return base.copy()
        return (base.astype(np.float64) + self._sum / total).astype(PAYLOAD_DTYPE)

    def normalised_weights(self) -> dict[int, float]:
        total = sum(self.weights.values())
        return {cid: w / total for cid, w in self.weights.items()} if total else {}
