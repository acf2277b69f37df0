"""FedProx (Li et al., 2020, arXiv 1812.06127): FedAvg's mean plus a client-side proximal term.

The client minimises L_task + (μ/2)·‖θ − θ_g‖² over the trainable payload; that
term runs in the engine, fed by the ``prox_mu`` instruction sent from here. The
server step is the n-weighted mean, as in FedAvg.
"""

from __future__ import annotations

import math

import numpy as np

from aggregation.messages import ClientInstructions
from aggregation.payload import PayloadLayout
from aggregation.strategy import RoundResult, Strategy, UpdateReader
from aggregation.weighting import WeightedMeanAccumulator


class FedProx(Strategy):
    """FedAvg whose clients add the proximal term (μ/2)·‖θ − θ_g‖²."""

    name = "fedprox"

    def __init__(self, layout: PayloadLayout, *, mu: float) -> None:
        if not (math.isfinite(mu) and mu >= 0):
            raise ValueError(f"strategy.prox_mu must be a finite number >= 0, got {mu}")
        super().__init__(layout)
        self.mu = mu

    def configure(self, client_id: int, round_idx: int, *, seed: int) -> ClientInstructions:
        """Plain local-training instructions plus ``prox_mu`` = μ, the weight of the client's proximal term."""
        return ClientInstructions(client_id=client_id, round_idx=round_idx, seed=seed, prox_mu=self.mu)

    def begin(self, global_payload: np.ndarray, *, round_idx: int) -> None:
        """Start the round with an empty n-weighted running sum of deltas."""
        super().begin(global_payload, round_idx=round_idx)
        self._mean = WeightedMeanAccumulator(self.layout.total)

    def add(self, reader: UpdateReader) -> None:
        """Fold one update's whole delta into the n-weighted running sum."""
        u = self._checked(reader)
        self._mean.add(u.client_id, reader.read(0, self.layout.total), u.n_examples)

    def finish(self) -> RoundResult:
        """The FedAvg step: θ^{t−1} plus the n-weighted mean delta; client weights n_i / Σ_j n_j."""
        if self._global is None:
            raise RuntimeError("finish() called before begin(); call begin(global_payload, round_idx=...) first")
        weights = self._mean.normalised_weights()
        return RoundResult(self._mean.apply(self._global), {"n_aggregated": float(len(weights))}, weights)
