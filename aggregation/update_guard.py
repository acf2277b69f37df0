"""Rejecting bad client updates before any merge: non-finite values, a wrong layout, an absurd norm.

One client with a diverged optimiser or a corrupted buffer would otherwise
poison the global model for everyone; the aggregator asks ``rejection`` about
each update as it arrives and leaves rejected ones out of the round, logging
the client and the reason.
"""

from __future__ import annotations

import math

import numpy as np

from aggregation.messages import ClientUpdate
from aggregation.payload import PayloadLayout


def rejection(update: ClientUpdate, layout: PayloadLayout, *, max_norm: float | None = None) -> str | None:
    """Why ``update`` must not be merged, or None when it may.

    Checks, in order: the delta's shape and dtype against ``layout``; that the
    delta and the routing statistics are finite; that ‖Δ‖₂ ≤ ``max_norm``
    when a bound is given. One pass over the delta (a float32 dot product).
    """
    delta = update.delta
    if delta.shape != (layout.total,) or delta.dtype != np.float32:
        return f"delta has shape {delta.shape} and dtype {delta.dtype}, layout needs ({layout.total},) float32"
    with np.errstate(over="ignore", invalid="ignore"):
        norm = math.sqrt(float(np.dot(delta, delta)))  # float32 BLAS: a NaN or Inf anywhere makes it non-finite
    if not math.isfinite(norm):
        if not np.isfinite(delta).all():
            return "delta has NaN or Inf values"
        norm = float(np.linalg.norm(delta.astype(np.float64)))  # finite values whose squares overflow float32
    for layer, st in enumerate(update.routing):
        if not all(np.isfinite(a).all() for a in (st.p_sum, st.counts, st.margin_sum, st.x_sum)):
            return f"routing statistics of layer {layer} have NaN or Inf values"
    if max_norm is not None and norm > max_norm:
        return f"update norm {norm:.4g} exceeds the bound {max_norm:g}"
    return None
