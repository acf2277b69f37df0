"""Streaming weighted sums of flat updates: the inner loop of every strategy.

``accumulate`` is ``acc += w·x`` for a float64 ``acc`` and a float32 ``x``
(often a read-only view of the object store) in one fused pass: numpy needs a
float64 temporary for ``w·x``, which made FedAvg's merge run at 0.35× the
speed of a plain copy of the same bytes; torch's in-place ``add_`` casts on
the fly (0.69× on one thread). See ``benchmarks/aggregate.py``.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from aggregation.payload import PAYLOAD_DTYPE

# torch warns, once per process, that a tensor over a read-only array could be written through.
# Ours are only read: spend that one warning here, silenced.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    torch.from_numpy(np.frombuffer(bytes(8), dtype=np.float64))  # a read-only array


def accumulate(acc: np.ndarray, values: np.ndarray, weight: float | np.ndarray) -> None:
    """``acc += weight · values`` in place, in ``acc``'s precision, without a temporary.

    A 1-D ``weight`` of length R weighs the R equal rows of ``acc`` and
    ``values`` (flat or 2-D) one by one: row r gets ``weight[r]``.
    """
    x = torch.from_numpy(np.asarray(values))
    if np.ndim(weight) == 0:
        torch.from_numpy(acc).add_(x, alpha=float(weight))
        return
    w = torch.from_numpy(np.asarray(weight, dtype=np.float64))
    torch.from_numpy(acc).view(len(w), -1).addcmul_(x.view(len(w), -1), w[:, None])


class WeightedMeanAccumulator:
    """Σ_i w_i·Δ_i and Σ_i w_i, accumulated in float64 one update at a time.

    Holds one model-sized float64 buffer whatever the cohort size.
    """

    def __init__(self, size: int) -> None:
        self._sum = np.zeros(size, dtype=np.float64)
        self.weights: dict[int, float] = {}

    def add(self, client_id: int, delta: np.ndarray, weight: float) -> None:
        """Add weight·delta to the sum; raise ValueError for a client already added this round."""
        if client_id in self.weights:
            raise ValueError(f"client {client_id}: update added twice in one round")
        accumulate(self._sum, delta, weight)
        self.weights[client_id] = float(weight)

    def apply(self, base: np.ndarray) -> np.ndarray:
        """``base`` + Σ w_i Δ_i / Σ w_i as float32; ``base`` itself when no weight arrived."""
        total = sum(self.weights.values())
        if total == 0:
            return base.copy()
        return (base.astype(np.float64) + self._sum / total).astype(PAYLOAD_DTYPE)

    def normalised_weights(self) -> dict[int, float]:
        """w_i / Σ_j w_j per client id; {} when the weights sum to 0 (none arrived)."""
        total = sum(self.weights.values())
        return {cid: w / total for cid, w in self.weights.items()} if total else {}
