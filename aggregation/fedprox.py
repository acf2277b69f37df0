"""FedProx (Li et al., 2020, arXiv 1812.06127): FedAvg's mean plus a client-side proximal term.

The client minimises L_task + (μ/2)·‖θ − θ_g‖² over the trainable payload; that
term is the ``ProximalTerm`` sent with every client's instructions, which the
engine adds to the loss. The server step is the n-weighted mean, as in FedAvg.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from aggregation.client_terms import ProximalTerm
from aggregation.messages import ClientInstructions
from aggregation.options import Options
from aggregation.strategy import RoundResult, Strategy, UpdateReader
from aggregation.weighting import WeightedMeanAccumulator


class FedProxOptions(Options):
    """FedProx's one option."""

    mu: float = Field(0.01, ge=0, description="μ of the client's proximal term (μ/2)·‖θ − θ_g‖²; 0: FedAvg")


class FedProx(Strategy):
    """FedAvg whose clients add the proximal term (μ/2)·‖θ − θ_g‖²."""

    name = "fedprox"
    options_type = FedProxOptions
    options: FedProxOptions

    def configure(self, client_id: int, round_idx: int, *, seed: int) -> ClientInstructions:
        """Plain local-training instructions plus the proximal term, when μ > 0."""
        terms = (ProximalTerm(self.options.mu),) if self.options.mu > 0 else ()
        return ClientInstructions(client_id=client_id, round_idx=round_idx, seed=seed, terms=terms)

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
