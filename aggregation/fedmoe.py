"""FedMoE-style aggregation: each expert averaged by how much each client used it.

A MoE baseline beside FedAlign-MoE (the paper's "FedMoE" row): client i's
update to expert e of layer l gets weight c_i(l, e) / Σ_j c_j(l, e), where
c_i(l, e) is the number of client i's tokens whose top-k set held e (the
``counts`` of its routing statistics). A client that never routed to e does
not blur it. Router row e is weighted the same way (``router_weighting =
"usage"``) or by n_i; every shared entry is FedAvg'd by n_i. An expert no
client of the round used keeps its value: there is nothing to learn it from.

The weights depend only on each client's own counts and their cohort sum, so
the merge is a running weighted sum: updates are folded in as they arrive and
the aggregator holds one payload-sized float64 buffer whatever the cohort.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from aggregation.errors import LayoutMismatch
from aggregation.options import Options
from aggregation.payload import PAYLOAD_DTYPE, PayloadLayout
from aggregation.strategy import RoundResult, Strategy, UpdateReader
from aggregation.weighting import accumulate

RouterWeighting = Literal["usage", "n"]


@dataclass(frozen=True, slots=True)
class _Block:
    """[start, stop) of the payload, merged as equal rows with one weight each.

    kind "shared": one row, weighted by n_i; "router": one router entry, row e
    expert e's; "expert": the experts ``experts`` of one layer, one row each.
    """

    start: int
    stop: int
    kind: Literal["shared", "router", "expert"]
    layer: int = -1
    experts: tuple[int, ...] = ()


def _blocks(layout: PayloadLayout) -> list[_Block]:
    """Few large blocks: the shared entries are one span, each router entry one block.

    A layer's experts are one [E, |θ(e)|] block when their spans are equal and
    adjacent (as the canonical layout places them), else one block each.
    """
    blocks: list[_Block] = []
    shared = layout.select(role="shared")
    if shared:
        blocks.append(_Block(shared[0].offset, shared[-1].offset + shared[-1].size, "shared"))
    # int(e.layer): a router entry always has a layer (PayloadLayout.build raises otherwise); the field admits None
    blocks += [_Block(e.offset, e.offset + e.size, "router", int(e.layer)) for e in layout.select(role="router")]  # type: ignore[arg-type]
    by_layer: dict[int, list[tuple[int, int, int]]] = {}
    for layer, expert in layout.expert_keys():
        by_layer.setdefault(layer, []).append((expert, *layout.expert_span(layer, expert)))
    for layer, spans in by_layer.items():
        sizes = {b - a for _, a, b in spans}
        adjacent = all(spans[k][2] == spans[k + 1][1] for k in range(len(spans) - 1))
        if len(sizes) == 1 and adjacent:
            blocks.append(_Block(spans[0][1], spans[-1][2], "expert", layer, tuple(e for e, _, _ in spans)))
        else:
            blocks += [_Block(a, b, "expert", layer, (e,)) for e, a, b in spans]
    return blocks


class FedMoEOptions(Options):
    """How FedMoE weights router rows."""

    router_weighting: RouterWeighting = Field("usage", description="router row e by usage of e, or by n_i")


class FedMoE(Strategy):
    """Per-expert averaging weighted by expert usage counts; shared entries by n_i."""

    name = "fedmoe"
    options_type = FedMoEOptions
    options: FedMoEOptions

    def __init__(self, layout: PayloadLayout, options: FedMoEOptions | None = None) -> None:
        super().__init__(layout, options)
        self._keys = layout.expert_keys()
        routers = layout.select(role="router")
        row_counts = {e.shape[0] for e in routers if e.shape}
        if routers and (len(row_counts) != 1 or any(not e.shape for e in routers)):
            raise LayoutMismatch(f"routers must be [E, ...] with one E for every MoE layer, layout has {row_counts}")
        layers = {k[0] for k in self._keys} | set(layout.router_layers())
        self._shape = (
            max(layers, default=-1) + 1,
            max([k[1] + 1 for k in self._keys] + list(row_counts), default=0),
        )  # (L, E) of the usage counts the layout needs
        self._blocks = _blocks(layout)

    @classmethod
    def reads_routing_stats(cls, options: Options) -> bool:
        """Always: the usage counts weight every expert."""
        return True

    def begin(self, global_payload: np.ndarray, *, round_idx: int) -> None:
        """Start the round with zero weighted sums and zero usage counts Σ_i c_i(l, e)."""
        super().begin(global_payload, round_idx=round_idx)
        self._sum = np.zeros(self.layout.total, dtype=np.float64)
        self._n: dict[int, float] = {}
        self._usage = np.zeros(self._shape)  # Σ_i c_i(l, e)
        self._counts: dict[int, np.ndarray] = {}  # per client: its c_i(l, e), for the weight report

    def _usage_counts(self, reader: UpdateReader) -> np.ndarray:
        """c_i as [L, E], validated against the layout."""
        u = reader.update
        where = f"client {u.client_id} round {u.round_idx}"
        num_layers, num_experts = self._shape
        if len(u.routing) != num_layers:
            raise LayoutMismatch(
                f"{where}: FedMoE needs routing statistics for {num_layers} MoE layers, got {len(u.routing)} "
                "(train.routing_stats must not be 'off')"
            )
        for layer, st in enumerate(u.routing):
            if st.num_experts != num_experts:
                raise LayoutMismatch(
                    f"{where}: routing layer {layer} has {st.num_experts} experts, layout has {num_experts}"
                )
        if not num_layers:
            return np.zeros(self._shape)
        return np.stack([np.asarray(st.counts, dtype=np.float64) for st in u.routing])

    def _weights(self, block: _Block, counts: np.ndarray, n: float) -> float | np.ndarray:
        """Row weights of ``block``: usage counts c(l, e), or n."""
        if block.kind == "expert":
            return counts[block.layer, list(block.experts)]
        if block.kind == "router" and self.options.router_weighting == "usage":
            layer_counts: np.ndarray = counts[block.layer]  # an integer index gives Any in numpy's stubs
            return layer_counts
        return n

    def add(self, reader: UpdateReader) -> None:
        """Fold each block of one update into the running sums, weighted by its usage counts c_i(l, e) or n_i."""
        u = self._checked(reader)
        if u.client_id in self._n:
            raise ValueError(f"client {u.client_id}: update added twice in one round")
        counts = self._usage_counts(reader)
        n = float(u.n_examples)
        for block in self._blocks:
            accumulate(self._sum[block.start : block.stop], reader.read(block.start, block.stop),
                       self._weights(block, counts, n))
        self._usage += counts
        self._n[u.client_id] = n
        self._counts[u.client_id] = counts

    def finish(self) -> RoundResult:
        """Divide each row's weighted sum by its total weight; a row of total weight 0 keeps its value."""
        if self._global is None:
            raise RuntimeError("finish() called before begin(); call begin(global_payload, round_idx=...) first")
        if not self._n:
            return RoundResult(self._global.copy(), {"n_aggregated": 0.0}, {})
        new = self._global.astype(np.float64)
        n_total = sum(self._n.values())
        for block in self._blocks:
            total = np.atleast_1d(self._weights(block, self._usage, n_total))[:, None]
            rows = self._sum[block.start : block.stop].reshape(len(total), -1)
            step = np.divide(rows, total, out=np.zeros_like(rows), where=total > 0)
            new[block.start : block.stop] += step.reshape(-1)
        used = [k for k in self._keys if self._usage[k] > 0]
        report = {
            "n_aggregated": float(len(self._n)),
            "experts_kept_frac": 1.0 - len(used) / len(self._keys) if self._keys else 0.0,
        }
        return RoundResult(new.astype(PAYLOAD_DTYPE), report, self._client_weights(used))

    def _client_weights(self, used: list[tuple[int, int]]) -> dict[int, float]:
        """Each client's usage share averaged over the merged experts (its n share when none was)."""
        n_total = sum(self._n.values())
        if not used:
            return {cid: n / n_total for cid, n in self._n.items()}
        return {cid: float(np.mean([c[k] / self._usage[k] for k in used])) for cid, c in self._counts.items()}
