"""FedAvg: the n-weighted mean of client updates (McMahan et al., 2017, arXiv 1602.05629).

θ^t = θ^{t−1} + Σ_i n_i Δ_i / Σ_i n_i, accumulated as updates arrive, so the
aggregator holds one model-sized buffer whatever the cohort size.
"""

from __future__ import annotations

import numpy as np

from aggregation.strategy import RoundResult, Strategy, UpdateReader
from aggregation.weighting import WeightedMeanAccumulator


class FedAvg(Strategy):
    """Federated averaging weighted by each client's number of training examples."""

    name = "fedavg"

    def begin(self, global_payload: np.ndarray, *, round_idx: int) -> None:
        """Start the round with an empty n-weighted running sum of deltas."""
        super().begin(global_payload, round_idx=round_idx)
        self._mean = WeightedMeanAccumulator(self.layout.total)

    def add(self, reader: UpdateReader) -> None:
        """Fold one update's whole delta into the n-weighted running sum."""
        u = self._checked(reader)
        self._mean.add(u.client_id, reader.read(0, self.layout.total), u.n_examples)

    def finish(self) -> RoundResult:
        """θ^{t−1} plus the n-weighted mean delta; client weights n_i / Σ_j n_j (θ^{t−1} when nothing arrived)."""
        if self._global is None:
            raise RuntimeError("finish() called before begin(); call begin(global_payload, round_idx=...) first")
        weights = self._mean.normalised_weights()
        return RoundResult(self._mean.apply(self._global), {"n_aggregated": float(len(weights))}, weights)
