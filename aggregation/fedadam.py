"""FedAdam (Reddi et al., 2021, arXiv 2003.00295): Adam on the server over the averaged update.

The n-weighted mean update Δ̄ is treated as a pseudo-gradient:
m ← β1·m + (1 − β1)·Δ̄,  v ← β2·v + (1 − β2)·Δ̄²,  θ ← θ + η·m / (√v + τ).
The moments m and v are strategy state, so they travel in checkpoints.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field

from aggregation.options import Options
from aggregation.payload import PAYLOAD_DTYPE, PayloadLayout
from aggregation.strategy import RoundResult, Strategy, UpdateReader
from aggregation.weighting import WeightedMeanAccumulator


class FedAdamOptions(Options):
    """Server Adam's step size η, moment decays β1, β2 and adaptivity τ."""

    server_lr: float = Field(0.01, gt=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.99, ge=0, lt=1)
    tau: float = Field(1e-3, gt=0)


class FedAdam(Strategy):
    """Server-side Adam on the n-weighted mean of client deltas (no bias correction, as in the paper)."""

    name = "fedadam"
    options_type = FedAdamOptions
    options: FedAdamOptions

    def __init__(self, layout: PayloadLayout, options: FedAdamOptions | None = None) -> None:
        super().__init__(layout, options)
        self._m = np.zeros(layout.total, dtype=np.float64)
        self._v = np.zeros(layout.total, dtype=np.float64)

    def begin(self, global_payload: np.ndarray, *, round_idx: int) -> None:
        """Start the round with an empty n-weighted running sum of deltas."""
        super().begin(global_payload, round_idx=round_idx)
        self._mean = WeightedMeanAccumulator(self.layout.total)

    def add(self, reader: UpdateReader) -> None:
        """Fold one update's whole delta into the n-weighted running sum."""
        u = self._checked(reader)
        self._mean.add(u.client_id, reader.read(0, self.layout.total), u.n_examples)

    def finish(self) -> RoundResult:
        """One server Adam step with the n-weighted mean delta Δ̄ as pseudo-gradient; θ^{t−1} when nothing arrived."""
        if self._global is None:
            raise RuntimeError("finish() called before begin(); call begin(global_payload, round_idx=...) first")
        weights = self._mean.normalised_weights()
        if not weights:
            return RoundResult(self._global.copy(), {"n_aggregated": 0.0}, {})
        base = self._global.astype(np.float64)
        pseudo_grad = self._mean.apply(self._global).astype(np.float64) - base  # Δ̄
        o = self.options
        self._m = o.beta1 * self._m + (1 - o.beta1) * pseudo_grad
        self._v = o.beta2 * self._v + (1 - o.beta2) * pseudo_grad**2
        new = base + o.server_lr * self._m / (np.sqrt(self._v) + o.tau)
        return RoundResult(new.astype(PAYLOAD_DTYPE), {"n_aggregated": float(len(weights))}, weights)

    def state_dict(self) -> dict[str, Any]:
        """Copies of the moments m and v, float64 [layout.total] each, under "m" and "v"."""
        return {"m": self._m.copy(), "v": self._v.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore m and v from ``state_dict()``'s output; raise ValueError unless both are [layout.total]."""
        m, v = np.asarray(state["m"], dtype=np.float64), np.asarray(state["v"], dtype=np.float64)
        if m.shape != (self.layout.total,) or v.shape != (self.layout.total,):
            raise ValueError(f"FedAdam state has shapes {m.shape}, {v.shape}; layout expects ({self.layout.total},)")
        self._m, self._v = m.copy(), v.copy()
