"""The server's part of one round, without Ray: arrivals in any order, folded into the strategy in cohort order.

A ``RoundFold`` is given each client's result as it arrives, tagged with the
client's position in the cohort: a ``ClientUpdate``, or the reason the client
failed. A small reorder buffer folds them into the strategy strictly in cohort
order, so the merged payload is bit-identical whatever the arrival order or the
number of workers. Folding one update means: the update guard
(``update_guard.rejection``), admission on the simulated clock
(a ``sim_clock.SimulatedClock``: ``deadline`` decides as each update is folded,
``over_select`` only once every update is in), the asynchronous staleness
discount (a factor per update, computed by the caller), the clients' error-feedback
residuals, and the round's ledger: a row per client, bytes per payload class,
routing p̄, failures, rejections, and the train metrics kept as summable
``(sum, weight)`` pairs to the end (STYLE.md §2). The Ray actor
(``actors.aggregator``) is a ``ray.wait`` loop around it.
"""

from __future__ import annotations

import math
import time
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from aggregation.cohort_spool import CohortSpool
from aggregation.messages import ClientUpdate
from aggregation.payload import PayloadLayout, payload_class
from aggregation.sim_clock import OnTimeClock, SimulatedClock
from aggregation.strategy import ArrayReader, Strategy
from aggregation.update_guard import rejection


@dataclass(frozen=True)
class RoundSummary:
    """What the driver gets back besides the new payload (which stays in the object store).

    ``metrics`` holds each train metric as a ``(sum, weight)`` pair summed over
    the clients whose update the guard accepted (merged, or left out only for
    finishing late); ``metric`` turns one into the round's mean.
    """

    round_idx: int
    report: dict[str, float]
    clients: list[dict[str, Any]]
    failures: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # "client C: reason" for updates left out of the merge
    comm: list[dict[str, Any]] = field(default_factory=list)  # bytes per client, direction and payload class
    stragglers: list[int] = field(default_factory=list)  # clients left out for finishing late on the simulated clock
    sim_round_s: float = 0.0  # the round's length on the simulated clock
    routing_p_bar: dict[int, list[np.ndarray]] = field(default_factory=dict)
    aggregator_peak_rss_mib: float = 0.0
    # private memory now (when measured): object-store pages read zero-copy are shared
    aggregator_uss_mib: float = math.nan
    metrics: dict[str, tuple[float, float]] = field(default_factory=dict)  # Σ sum, Σ weight over accepted clients
    # the aggregator's seconds by phase: "fold" (strategy.add, reading each update, and copying it to the spool
    # when the strategy keeps its readers) and "merge" (strategy.finish)
    # here; the actor adds "wait" (for the next update to finish) and "get" (fetching it: transfer, restore)
    aggregator_seconds: dict[str, float] = field(default_factory=dict)
    spooled_bytes: int = 0  # the updates copied to the aggregator's disk for a strategy that keeps its readers

    def metric(self, name: str) -> float:
        """The round's mean of a summable metric, Σ sum / Σ weight (nan when absent or of zero weight)."""
        s, w = self.metrics.get(name, (0.0, 0.0))
        return s / w if w else float("nan")


def _client_row(u: ClientUpdate) -> dict[str, Any]:
    return {
        "client": u.client_id,
        "n_examples": u.n_examples,
        "train_loss": u.metric("train_loss"),
        "compression_error": u.metric("compression_error"),  # nan when the uplink is not compressed
        "compute_s": u.compute_seconds,
        "stats_s": u.metric("stats_seconds"),  # of compute_s, the routing-statistics pass after training (0: none)
        "alltoall_s": u.metric("alltoall_seconds"),  # nan unless the deepspeed engine profiles its exchanges
        "gpu_peak_mib": u.metric("gpu_peak_mib"),  # the worker's peak GPU memory for this client; nan on CPU
        "bytes_down": int(sum(u.bytes_down.values())),
        "bytes_up": int(sum(u.bytes_up.values())),
    }


def _comm_rows(u: ClientUpdate) -> list[dict[str, Any]]:
    rows = []
    for direction, by_class in (("down", u.bytes_down), ("up", u.bytes_up)):
        for key, nbytes in by_class.items():
            kind, layer, expert = payload_class(key)
            rows.append({"client": u.client_id, "direction": direction, "payload_class": kind,
                         "layer": layer, "expert": expert, "bytes": int(nbytes)})
    return rows


def simulated_duration(u: ClientUpdate, clock: SimulatedClock) -> float:
    """The update's length on the simulated clock (seconds).

    Read before the guard sees the update: an ``n_examples`` or ``compute_seconds`` the guard will reject
    (NaN, negative) counts as 0, so it cannot make the round's length NaN.
    """
    n, seconds = (v if isinstance(v, int | float) and math.isfinite(v) and v > 0 else 0
                  for v in (u.n_examples, u.compute_seconds))
    return clock.duration(u.client_id, n, seconds, sum(u.bytes_down.values()), sum(u.bytes_up.values()))


class RoundFold:
    """One round of a strategy, fed arrivals in any order and folding them in cohort order.

    Parameters
    ----------
    strategy : Strategy
        The run's strategy; ``begin`` is called here, ``add`` once per merged update, ``finish`` in ``finish``.
    layout : PayloadLayout
        The payload layout the guard checks each update against.
    global_payload : ndarray [layout.total] float32
        The round's starting global payload (not modified).
    round_idx : int
        The round (or asynchronous step) being aggregated, from 1.
    cohort_size : int
        How many results will arrive: one per cohort position 0 … cohort_size − 1.
    residuals : mutable mapping of client id to ndarray [layout.total]
        The clients' error-feedback residuals, owned by the caller and updated in place: a merged update's
        new residual replaces its client's, a rejected update's client loses its own.
    max_update_norm : float or None
        The guard's bound on ‖Δ‖₂; None: no bound.
    clock : SimulatedClock or None
        Durations and round policy of the simulated clock; None: ``OnTimeClock()``, every update on time.
    staleness : sequence of (int, float) or None
        Asynchronous aggregation: (τ_i, s_i) per cohort position, the update's staleness and its discount
        factor (FedBuff's s(τ_i), computed by the caller); update i counts with its ``n_examples`` and routing
        statistics scaled by s_i, is merged into ``round_idx``, and its row in the clients table records τ_i.
    spool_dir : str or None
        Where a strategy that keeps its readers (``Strategy.keeps_readers``) gets the round's updates copied
        (``aggregation.cohort_spool``); None: the system's temporary directory.
    """

    def __init__(
        self, strategy: Strategy, layout: PayloadLayout, global_payload: np.ndarray, *, round_idx: int,
        cohort_size: int, residuals: MutableMapping[int, np.ndarray], max_update_norm: float | None = None,
        clock: SimulatedClock | None = None, staleness: Sequence[tuple[int, float]] | None = None,
        spool_dir: str | None = None,
    ) -> None:
        if staleness is not None and len(staleness) != cohort_size:
            raise ValueError(f"round {round_idx}: {len(staleness)} staleness values for a cohort of {cohort_size}")
        self.strategy = strategy
        self.layout = layout
        self.round_idx = round_idx
        self.cohort_size = cohort_size
        self.residuals = residuals
        self.max_update_norm = max_update_norm
        self.clock = clock if clock is not None else OnTimeClock()
        self.staleness = staleness
        self._waiting: dict[int, ClientUpdate | None] = {}  # arrived, not folded yet (None: failed)
        self._next = 0  # the cohort position folded next
        self._arrived = 0
        self._durations: dict[int, float] = {}  # simulated seconds per client id
        self._kept: frozenset[int] | None = None  # decided before folding only under over_select
        self._rows: list[dict[str, Any]] = []  # cheap per-client facts; the update itself is not kept
        self._p_bar: dict[int, list[np.ndarray]] = {}
        self._failures: list[str] = []
        self._rejected: list[str] = []
        self._comm: list[dict[str, Any]] = []
        self._metrics: dict[str, tuple[float, float]] = {}
        self._fold_s = 0.0
        self._spool = CohortSpool(spool_dir) if strategy.keeps_readers else None
        strategy.begin(global_payload, round_idx=round_idx)

    def arrive(self, position: int, result: ClientUpdate | str) -> None:
        """Take the result of the client at cohort ``position``: its update, or why it failed.

        Folds every update it unblocks; a failure is recorded at once. Under
        ``over_select`` nothing is folded until the last result is in.
        """
        if not 0 <= position < self.cohort_size or position < self._next or position in self._waiting:
            raise ValueError(f"round {self.round_idx}: position {position} arrived twice or is outside the "
                             f"cohort of {self.cohort_size}")
        self._arrived += 1
        if isinstance(result, str):
            self._failures.append(result)
            self._waiting[position] = None
        else:
            self._durations[result.client_id] = simulated_duration(result, self.clock)
            self._waiting[position] = result
        if self.clock.policy == "over_select":
            if self._arrived < self.cohort_size:
                return
            if self._kept is None:  # only now is it known which finished first on the simulated clock
                self._kept = self.clock.timing(self._durations).kept
        while self._next in self._waiting:
            update = self._waiting.pop(self._next)
            stale = None if self.staleness is None else self.staleness[self._next]
            self._next += 1
            if update is None:
                continue
            if stale is not None:  # started from an older version, merged into this one
                update = replace(update, round_idx=self.round_idx)
            on_time = self._kept is None or update.client_id in self._kept
            if self.clock.policy == "deadline":
                on_time = self._durations[update.client_id] <= self.clock.deadline_s
            self._fold(update, self._durations[update.client_id], on_time, stale)
            del update  # a strategy that needs the tensors later keeps its own reader

    def _fold(self, update: ClientUpdate, duration: float, on_time: bool, stale: tuple[int, float] | None) -> None:
        """Merge one update into the strategy, unless it is a straggler or the guard rejects it.

        A straggler or rejected update is only recorded. ``stale``: (staleness, discount) of an
        asynchronous update.
        """
        reason = rejection(update, self.layout, max_norm=self.max_update_norm)
        self._rows.append({**_client_row(update), "rejected": reason or "", "sim_duration_s": duration,
                           "straggler": not on_time, "staleness": -1 if stale is None else stale[0]})
        if reason is None:  # a rejected update's metrics may be NaN; a straggler's are sound
            for name, (s, w) in update.metrics.items():
                total, weight = self._metrics.get(name, (0.0, 0.0))
                self._metrics[name] = (total + float(s), weight + float(w))
        if stale is not None and stale[1] != 1.0:
            update = replace(update, n_examples=update.n_examples * stale[1],
                             routing=tuple(s.scaled(stale[1]) for s in update.routing))
        self._comm.extend(_comm_rows(update))
        if not on_time:
            return
        if reason is not None:
            self._rejected.append(f"client {update.client_id}: {reason}")
            self.residuals.pop(update.client_id, None)  # a rejected update's residual is as suspect as it is
            return
        if update.residual is not None:
            self.residuals[update.client_id] = update.residual
        t0 = time.perf_counter()
        reader = ArrayReader(update)
        self.strategy.add(reader if self._spool is None else self._spool.keep(reader))
        self._fold_s += time.perf_counter() - t0
        if update.routing:
            self._p_bar[update.client_id] = [s.p_bar for s in update.routing]

    def finish(self) -> tuple[np.ndarray, RoundSummary]:
        """The strategy's new global payload and the round's summary, once every position has arrived.

        The summary's aggregator memory fields are left at their defaults: the process that hosts the
        fold measures itself.
        """
        if self._next < self.cohort_size:
            missing = sorted(set(range(self._next, self.cohort_size)) - set(self._waiting))
            raise RuntimeError(f"round {self.round_idx}: finish() before positions {missing} of the cohort arrived")
        timing = self.clock.timing(self._durations)
        t0 = time.perf_counter()
        result = self.strategy.finish()
        merge_s = time.perf_counter() - t0
        spooled = 0
        if self._spool is not None:
            spooled = self._spool.nbytes
            self._spool.close()
        clients = [{**r, "weight": 0.0 if r["rejected"] or r["straggler"] else
                    result.client_weights.get(r["client"], float("nan"))} for r in self._rows]
        summary = RoundSummary(
            round_idx=self.round_idx,
            report=dict(result.report),
            clients=clients,
            failures=self._failures,
            rejected=self._rejected,
            comm=self._comm,
            stragglers=sorted(timing.stragglers),
            sim_round_s=timing.round_seconds,
            routing_p_bar=self._p_bar,
            metrics=dict(self._metrics),
            aggregator_seconds={"fold": self._fold_s, "merge": merge_s},
            spooled_bytes=spooled,
        )
        return result.payload, summary
