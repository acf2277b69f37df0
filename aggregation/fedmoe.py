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

from typing import Literal

import numpy as np

from aggregation.errors import LayoutMismatch
from aggregation.payload import PAYLOAD_DTYPE, PayloadLayout
from aggregation.strategy import RoundResult, Strategy, UpdateReader

RouterWeighting = Literal["usage", "n"]


class FedMoE(Strategy):
    """Per-expert averaging weighted by expert usage counts; shared entries by n_i."""

    name = "fedmoe"

    def __init__(self, layout: PayloadLayout, *, router_weighting: RouterWeighting = "usage") -> None:
        if router_weighting not in ("usage", "n"):
            raise ValueError(f"strategy.fedmoe.router_weighting must be 'usage' or 'n', got {router_weighting!r}")
        super().__init__(layout)
        self.router_weighting = router_weighting
        self._keys = layout.expert_keys()
        routers = layout.select(role="router")
        self._row_counts = {e.shape[0] for e in routers if e.shape}
        if routers and (len(self._row_counts) != 1 or any(not e.shape for e in routers)):
            raise LayoutMismatch(f"routers must be [E, ...] with one E for every MoE layer, layout has {self._row_counts}")
        self._shared = [(e.offset, e.offset + e.size) for e in layout.select(role="shared")]
        layers = {k[0] for k in self._keys} | set(layout.router_layers())
        self._shape = (
            max(layers, default=-1) + 1,
            max([k[1] + 1 for k in self._keys] + list(self._row_counts), default=0),
        )  # (L, E) of the usage counts the layout needs

    def begin(self, global_payload: np.ndarray, *, round_idx: int) -> None:
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
                raise LayoutMismatch(f"{where}: routing layer {layer} has {st.num_experts} experts, layout has {num_experts}")
        if not num_layers:
            return np.zeros(self._shape)
        return np.stack([np.asarray(st.counts, dtype=np.float64) for st in u.routing])

    def add(self, reader: UpdateReader) -> None:
        u = self._checked(reader)
        if u.client_id in self._n:
            raise ValueError(f"client {u.client_id}: update added twice in one round")
        counts = self._usage_counts(reader)
        n = float(u.n_examples)
        for a, b in self._shared:
            np.add(self._sum[a:b], np.multiply(reader.read(a, b), n, dtype=np.float64), out=self._sum[a:b])
        for layer, expert in self._keys:
            a, b = self.layout.expert_span(layer, expert)
            c = counts[layer, expert]
            np.add(self._sum[a:b], np.multiply(reader.read(a, b), c, dtype=np.float64), out=self._sum[a:b])
        for entry in self.layout.select(role="router"):
            a, b = entry.offset, entry.offset + entry.size
            rows = np.asarray(reader.read(a, b), dtype=np.float64).reshape(entry.shape[0], -1)
            w = counts[entry.layer][:, None] if self.router_weighting == "usage" else n
            self._sum[a:b] += (rows * w).reshape(-1)
        self._usage += counts
        self._n[u.client_id] = n
        self._counts[u.client_id] = counts

    def finish(self) -> RoundResult:
        """Divide each segment's weighted sum by its total weight; unused experts keep their value."""
        if self._global is None:
            raise RuntimeError("finish() called before begin(); call begin(global_payload, round_idx=...) first")
        base = self._global.astype(np.float64)
        new = base.copy()
        n_total = sum(self._n.values())
        if not self._n:
            return RoundResult(self._global.copy(), {"n_aggregated": 0.0}, {})
        for a, b in self._shared:
            new[a:b] += self._sum[a:b] / n_total
        used = [k for k in self._keys if self._usage[k] > 0]
        for key in used:
            a, b = self.layout.expert_span(*key)
            new[a:b] += self._sum[a:b] / self._usage[key]
        for entry in self.layout.select(role="router"):
            a, b = entry.offset, entry.offset + entry.size
            rows = self._sum[a:b].reshape(entry.shape[0], -1)
            if self.router_weighting == "usage":
                usage = self._usage[entry.layer][:, None]
                step = np.divide(rows, usage, out=np.zeros_like(rows), where=usage > 0)
            else:
                step = rows / n_total
            new[a:b] += step.reshape(-1)
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
