"""Aggregator: a Ray actor that runs a Strategy over updates as they complete.

Updates arrive as object refs; the actor waits on them with ``ray.wait``
(without prefetching the rest) and reads each one zero-copy from the object
store, so the cohort is never gathered into driver or aggregator memory. Arrivals are folded into the strategy in cohort
order through a small reorder buffer (of refs-backed views, not copies): the
result is bit-identical whatever the number of workers or arrival order.
"""

from __future__ import annotations

import math
import resource
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import psutil
import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

from aggregation.buffered import staleness_discount
from aggregation.errors import ClientFailure
from aggregation.messages import ClientInstructions, ClientUpdate
from aggregation.payload import PayloadLayout, payload_class
from aggregation.strategy import ArrayReader, Strategy
from aggregation.update_guard import rejection
from aggregation.virtual_clock import RoundClock, select


@dataclass(frozen=True)
class RoundSummary:
    """What the driver gets back besides the new payload (which stays in the object store)."""

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


def _duration(u: ClientUpdate, clock: RoundClock) -> float:
    """The update's length on the simulated clock.

    Read before the guard sees the update: an ``n_examples`` or ``compute_seconds`` the guard will reject
    (NaN, negative) counts as 0, so it cannot make the round's length NaN.
    """
    n, seconds = (v if isinstance(v, int | float) and math.isfinite(v) and v > 0 else 0
                  for v in (u.n_examples, u.compute_seconds))
    return clock.duration(u.client_id, n, seconds, sum(u.bytes_down.values()), sum(u.bytes_up.values()))


def _failure_reason(exc: Exception) -> str:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, ClientFailure):
        return str(cause)
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


@ray.remote(num_cpus=0)
class Aggregator:
    """Holds the strategy (and its cross-round state) for the whole run."""

    def __init__(
        self,
        strategy_factory: Callable[[PayloadLayout], Strategy],
        layout: PayloadLayout,
        max_update_norm: float | None = None,
        measure_memory: bool = False,
    ) -> None:
        self.strategy = strategy_factory(layout)
        self.layout = layout
        self.max_update_norm = max_update_norm
        # Reading private memory walks every mapping of this process (~6 ms with torch and Ray loaded), on the
        # round's critical path: only when asked.
        self.measure_memory = measure_memory
        # Error-feedback residuals of compressed uplinks: client-side state, kept here between the
        # rounds a client is sampled in (one payload-sized float32 array per such client).
        self.residuals: dict[int, np.ndarray] = {}

    def configure(self, round_idx: int, client_ids: list[int], seeds: list[int]) -> list[ClientInstructions]:
        """The strategy's instructions, with each client's error-feedback residual when it has one."""
        out = []
        for c, s in zip(client_ids, seeds, strict=True):
            ins = self.strategy.configure(c, round_idx, seed=s)
            out.append(replace(ins, residual=self.residuals[c]) if c in self.residuals else ins)
        return out

    def durations(self, update_refs: list[ray.ObjectRef[ClientUpdate]], clock: RoundClock) -> list[float]:
        """Each update's simulated duration, once all have finished.

        0 for a client that failed: it is known at once. Read zero-copy; nothing is merged.
        """
        out = []
        for ref in update_refs:
            try:
                u = ray.get(ref)
            except (RayTaskError, RayActorError, ObjectLostError, ray.exceptions.RaySystemError):
                out.append(0.0)
                continue
            out.append(_duration(u, clock))
            del u
        return out

    @ray.method(num_returns=2)
    def aggregate(
        self, round_idx: int, global_payload: np.ndarray, update_refs: list[ray.ObjectRef[ClientUpdate]],
        clock: RoundClock | None = None, staleness: list[int] | None = None, staleness_exponent: float = 0.5,
    ) -> tuple[np.ndarray, RoundSummary]:
        """Fold the round's updates (refs in cohort order) into the strategy; return new payload and summary.

        With a ``clock``, each update's simulated duration decides whether it is merged: under
        ``deadline`` as it arrives, under ``over_select`` once every update is in (only then is it
        known which finished first on the simulated clock; the updates wait as object-store views).
        With ``staleness`` (asynchronous buffered aggregation), update i counts with its weight and
        routing statistics discounted by (1 + staleness[i])^(−staleness_exponent).
        """
        clock = clock or RoundClock(profiles={})
        stale = {i: t for i, t in enumerate(staleness)} if staleness is not None else {}
        self.strategy.begin(global_payload, round_idx=round_idx)
        position = {ref: i for i, ref in enumerate(update_refs)}
        pending = list(update_refs)
        update_refs.clear()  # hold each ref only until it is folded in: small updates live inline in this process
        arrived: dict[int, ClientUpdate | None] = {}
        next_i = 0
        rows: list[dict[str, Any]] = []  # cheap per-client facts; the update itself is not kept
        p_bar: dict[int, list[np.ndarray]] = {}
        failures: list[str] = []
        rejected: list[str] = []
        comm: list[dict[str, Any]] = []
        durations: dict[int, float] = {}
        kept: frozenset[int] | None = None  # decided before folding only under over_select
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, fetch_local=False)
            for ref in ready:
                i = position.pop(ref)
                try:
                    arrived[i] = ray.get(ref)
                except (RayTaskError, RayActorError, ObjectLostError, ray.exceptions.RaySystemError) as exc:
                    failures.append(_failure_reason(exc))
                    arrived[i] = None
            del ready, ref
            for u in (a for a in arrived.values() if a is not None and a.client_id not in durations):
                durations[u.client_id] = _duration(u, clock)
            if clock.policy == "over_select" and pending:
                continue
            if clock.policy == "over_select" and kept is None:
                kept = select(durations, "over_select", keep=clock.keep).kept
            while next_i in arrived:
                update = arrived.pop(next_i)
                tau = stale.get(next_i)
                next_i += 1
                if update is not None and tau is not None:  # started from an older version, merged into this one
                    update = replace(update, round_idx=round_idx)
                if update is not None:
                    on_time = kept is None or update.client_id in kept
                    if clock.policy == "deadline":
                        on_time = durations[update.client_id] <= clock.deadline_s
                    self._fold(update, rows, p_bar, rejected, comm, durations[update.client_id], on_time,
                               None if tau is None else (tau, staleness_discount(tau, staleness_exponent)))
                del update  # a strategy that needs the tensors later keeps its own reader
        timing = select(durations, clock.policy, deadline_s=clock.deadline_s, keep=clock.keep)
        result = self.strategy.finish()
        clients = [{**r, "weight": 0.0 if r["rejected"] or r["straggler"] else
                    result.client_weights.get(r["client"], float("nan"))} for r in rows]
        summary = RoundSummary(
            round_idx=round_idx,
            report=dict(result.report),
            clients=clients,
            failures=failures,
            rejected=rejected,
            comm=comm,
            stragglers=sorted(timing.stragglers),
            sim_round_s=timing.round_seconds,
            routing_p_bar=p_bar,
            aggregator_peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            aggregator_uss_mib=psutil.Process().memory_full_info().uss / 2**20 if self.measure_memory else math.nan,
        )
        return result.payload, summary

    def _fold(self, update: ClientUpdate, rows: list[dict[str, Any]], p_bar: dict[int, list[np.ndarray]],
              rejected: list[str], comm: list[dict[str, Any]], duration: float, on_time: bool,
              stale: tuple[int, float] | None = None) -> None:
        """Merge one update into the strategy, unless it is a straggler or the guard rejects it.

        A straggler or rejected update is only recorded. ``stale``: (staleness, discount) of an
        asynchronous update.
        """
        reason = rejection(update, self.layout, max_norm=self.max_update_norm)
        rows.append({**_client_row(update), "rejected": reason or "", "sim_duration_s": duration,
                     "straggler": not on_time, "staleness": -1 if stale is None else stale[0]})
        if stale is not None and stale[1] != 1.0:
            update = replace(update, n_examples=update.n_examples * stale[1],
                             routing=tuple(s.scaled(stale[1]) for s in update.routing))
        comm.extend(_comm_rows(update))
        if not on_time:
            return
        if reason is not None:
            rejected.append(f"client {update.client_id}: {reason}")
            self.residuals.pop(update.client_id, None)  # a rejected update's residual is as suspect as it is
            return
        if update.residual is not None:
            self.residuals[update.client_id] = update.residual
        self.strategy.add(ArrayReader(update))
        if update.routing:
            p_bar[update.client_id] = [s.p_bar for s in update.routing]

    def state_dict(self) -> dict[str, Any]:
        """The strategy's state and the clients' error-feedback residuals (for checkpoints)."""
        return {"strategy": self.strategy.state_dict(), "residuals": dict(self.residuals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the strategy's state and the residuals from ``state_dict()``'s output (a checkpoint)."""
        self.strategy.load_state_dict(state["strategy"])
        self.residuals = dict(state["residuals"])
