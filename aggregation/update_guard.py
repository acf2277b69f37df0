"""Rejecting bad client updates before any merge: everything a client sends is checked, not only its delta.

One client with a diverged optimiser, a corrupted buffer or a bug in its
bookkeeping would otherwise poison the global model for everyone (a NaN
``n_examples`` makes FedAvg's weights NaN) or fail the whole round (a weight
≤ 0 or routing statistics of the wrong shape raise inside the strategy). The
aggregator asks ``rejection`` about each update as it arrives and leaves
rejected ones out of the round, logging the client and the reason.

Rules
-----
- ``n_examples``: a finite real number > 0.
- ``delta``: the layout's flat float32 buffer, finite; ‖Δ‖₂ ≤ ``max_norm`` when a bound is given.
- ``routing``: optional. An empty tuple is accepted (``train.routing_stats=off``; a strategy that reads the
  statistics is refused at config load). Otherwise one RoutingStats per MoE layer the layout knows of
  (layers counted over its router and expert entries), each with ``n_tokens`` a finite real ≥ 0, p_sum,
  counts, margin_sum of shape [E] and x_sum of shape [E, d], all finite, where E is the layer's router rows
  (else its highest expert index + 1) and d the router's input width (checked only when the router is a
  2-D [E, d] entry). A layout with no MoE layers gives no expected shape: each layer is then only checked to
  be consistent in itself.
- ``metrics``: every value a (sum, weight) pair of finite reals with weight ≥ 0. An update whose metrics are
  not is rejected whole, not trimmed: a client that reports a NaN loss has diverged, whatever its delta says.
- ``compute_seconds`` a finite real ≥ 0, ``bytes_down`` / ``bytes_up`` integers ≥ 0 (the simulated clock
  reads them); ``residual``, when sent, the layout's flat float32 buffer. Its values are the client's own
  error-feedback state: a non-finite residual makes that client's next delta non-finite, rejected then.
"""

from __future__ import annotations

import bisect
import math
import numbers
from typing import Any

import numpy as np

from aggregation.messages import ClientUpdate
from aggregation.payload import PAYLOAD_DTYPE, PayloadLayout
from aggregation.routing_stats import RoutingStats

# Per MoE layer: (E, d) of the routing statistics the layout implies; None where the layout says nothing.
RoutingShape = tuple[tuple[int, int | None] | None, ...]


def rejection(update: ClientUpdate, layout: PayloadLayout, *, max_norm: float | None = None) -> str | None:
    """Why ``update`` must not be merged, or None when it may (rules: module docstring).

    Checks, in order: n_examples; the delta's shape and dtype against
    ``layout``; that the delta is finite; the routing statistics; the metrics,
    timing and byte counts; the residual's layout; that ‖Δ‖₂ ≤ ``max_norm``
    when a bound is given. One pass over the delta (a float32 dot product).
    """
    if not _is_real(update.n_examples) or not update.n_examples > 0 or not math.isfinite(update.n_examples):
        return f"n_examples is {update.n_examples}, must be a finite number > 0"
    delta = update.delta
    if not _fits(delta, layout):
        return f"delta has shape {np.shape(delta)} and dtype {_dtype(delta)}, layout needs ({layout.total},) float32"
    with np.errstate(over="ignore", invalid="ignore"):
        norm = math.sqrt(float(np.dot(delta, delta)))  # float32 BLAS: a NaN or Inf anywhere makes it non-finite
    if not math.isfinite(norm):
        if not np.isfinite(delta).all():
            return "delta has NaN or Inf values"
        norm = float(np.linalg.norm(delta.astype(np.float64)))  # finite values whose squares overflow float32
    reason = _routing_rejection(update.routing, expected_routing(layout)) or _side_rejection(update, layout)
    if reason is not None:
        return reason
    if max_norm is not None and norm > max_norm:
        return f"update norm {norm:.4g} exceeds the bound {max_norm:g}"
    return None


def expected_routing(layout: PayloadLayout) -> RoutingShape | None:
    """(E, d or None) per MoE layer, from the layout's router entries (else its expert indices).

    None when the layout has no MoE layer. O(L·log(entries)): routers are one
    run of entries, found by offset.
    """
    experts: dict[int, int] = {}
    for layer, e in layout.expert_keys():
        experts[layer] = max(experts.get(layer, 0), e + 1)
    routers = {layer: _router_shape(layout, layer) for layer in layout.router_layers()}
    layers = set(experts) | set(routers)
    if not layers:
        return None
    return tuple(routers.get(layer) or ((experts[layer], None) if layer in experts else None)
                 for layer in range(max(layers) + 1))


def _router_shape(layout: PayloadLayout, layer: int) -> tuple[int, int | None] | None:
    """(rows, input width) of layer ``layer``'s router: its 2-D entry [E, d] if it has one, else (E, None)."""
    start, stop = layout.router_span(layer)
    i = bisect.bisect_left(layout.entries, start, key=lambda entry: entry.offset)
    shapes = []
    while i < len(layout.entries) and layout.entries[i].offset < stop:
        shapes.append(layout.entries[i].shape)
        i += 1
    matrix = next((s for s in shapes if len(s) == 2), None)
    if matrix is not None:
        return matrix[0], matrix[1]
    return (shapes[0][0], None) if shapes and shapes[0] else None


def _routing_rejection(routing: Any, expected: RoutingShape | None) -> str | None:
    """Why the routing statistics are malformed, or None (an empty tuple is fine: they are optional)."""
    if not isinstance(routing, tuple):
        return f"routing statistics are a {type(routing).__name__}, not a tuple of RoutingStats"
    if not routing:
        return None
    if expected is not None and len(routing) != len(expected):
        return f"routing statistics have {len(routing)} layers, the layout has {len(expected)} MoE layers"
    for layer, st in enumerate(routing):
        where = f"routing statistics of layer {layer}"
        if not isinstance(st, RoutingStats):
            return f"{where} are a {type(st).__name__}, not RoutingStats"
        if not _is_real(st.n_tokens) or not math.isfinite(st.n_tokens) or st.n_tokens < 0:
            return f"{where}: n_tokens is {st.n_tokens}, must be a finite number >= 0"
        arrays = {"p_sum": st.p_sum, "counts": st.counts, "margin_sum": st.margin_sum, "x_sum": st.x_sum}
        for name, a in arrays.items():
            if not isinstance(a, np.ndarray) or a.dtype.kind not in "iuf":
                return f"{where}: {name} is not a numeric array ({_dtype(a)})"
        want = expected[layer] if expected is not None else None
        if want is None and st.p_sum.ndim != 1:
            return f"{where}: p_sum has shape {list(st.p_sum.shape)}, expected [E]"
        experts, hidden = want if want is not None else (st.p_sum.shape[0], None)
        for name in ("p_sum", "counts", "margin_sum"):
            if arrays[name].shape != (experts,):
                return f"{where}: {name} has shape {list(arrays[name].shape)}, expected [{experts}]"
        x = st.x_sum
        if x.ndim != 2 or x.shape[0] != experts or (hidden is not None and x.shape[1] != hidden):
            width = "d" if hidden is None else hidden
            return f"{where}: x_sum has shape {list(x.shape)}, expected [{experts}, {width}]"
        if not all(np.isfinite(a).all() for a in arrays.values()):
            return f"{where} have NaN or Inf values"
    return None


def _side_rejection(update: ClientUpdate, layout: PayloadLayout) -> str | None:
    """Why the metrics, timing, byte counts or residual are malformed, or None."""
    if not isinstance(update.metrics, dict):
        return f"metrics are a {type(update.metrics).__name__}, not a dict"
    for name, pair in update.metrics.items():
        ok = isinstance(pair, tuple | list) and len(pair) == 2 and all(_is_real(v) and math.isfinite(v) for v in pair)
        if not ok or pair[1] < 0:
            return f"metric {name!r} is {pair!r}, must be a (sum, weight) pair of finite numbers with weight >= 0"
    seconds = update.compute_seconds
    if not _is_real(seconds) or not math.isfinite(seconds) or seconds < 0:
        return f"compute_seconds is {seconds}, must be a finite number >= 0"
    for direction, by_class in (("bytes_down", update.bytes_down), ("bytes_up", update.bytes_up)):
        if not isinstance(by_class, dict):
            return f"{direction} is a {type(by_class).__name__}, not a dict"
        bad = next((k for k, v in by_class.items() if not isinstance(v, numbers.Integral) or v < 0), None)
        if bad is not None:
            return f"{direction}[{bad!r}] is {by_class[bad]!r}, must be an integer >= 0"
    if update.residual is not None and not _fits(update.residual, layout):
        return (f"residual has shape {np.shape(update.residual)} and dtype {_dtype(update.residual)}, "
                f"layout needs ({layout.total},) float32")
    return None


def _is_real(x: Any) -> bool:
    """A real scalar (Python or numpy), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool | np.bool_)


def _fits(buffer: Any, layout: PayloadLayout) -> bool:
    return isinstance(buffer, np.ndarray) and buffer.shape == (layout.total,) and buffer.dtype == PAYLOAD_DTYPE


def _dtype(a: Any) -> str:
    return str(a.dtype) if isinstance(a, np.ndarray) else type(a).__name__
