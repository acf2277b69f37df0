"""Aggregator: a Ray actor that runs a Strategy over updates as they complete.

Updates arrive as object refs; the actor waits on them with ``ray.wait``
(without prefetching the rest) and reads each one zero-copy from the object
store, so the cohort is never gathered into driver or aggregator memory. Each
arrival goes to the round's ``aggregation.round_fold.RoundFold``, which folds
them into the strategy in cohort order (its reorder buffer holds refs-backed
views, not copies): the result is bit-identical whatever the number of workers
or arrival order. The instructions go out the same way, as one object ref per
client that the driver hands to the workers unread (``instruction_refs``). The
simulated clock that times the updates is handed to the actor once, at its
start (``aggregation.sim_clock.SimulatedClock``), not with every round.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import psutil
import ray
from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

from aggregation.errors import ClientFailure
from aggregation.messages import ClientInstructions, ClientUpdate
from aggregation.payload import PayloadLayout
from aggregation.round_fold import RoundFold, RoundSummary, simulated_duration
from aggregation.sim_clock import OnTimeClock, SimulatedClock
from aggregation.strategy import Strategy

__all__ = ["Aggregator", "RoundSummary", "aggregator_options", "instruction_refs", "reserved_cpus"]

# what ray.get raises for a client whose update will never come: the task failed, its worker died, the object is gone
_LOST = (RayTaskError, RayActorError, ObjectLostError, ray.exceptions.RaySystemError)


def _failure_reason(exc: Exception) -> str:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, ClientFailure):
        return str(cause)
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def instruction_refs(
    aggregator: Any, round_idx: int, client_ids: list[int], seeds: list[int]
) -> list[ray.ObjectRef[ClientInstructions]]:
    """One object ref per client to its instructions for round ``round_idx``, in ``client_ids`` order.

    The caller passes them to ``WorkerPool.submit`` unread: Ray resolves each
    as a top-level task argument on the worker, so an instruction carrying a
    payload-sized residual or expert block goes from the aggregator to the worker
    through the object store, never through the driver (small ones, under
    Ray's inlining limit, travel inline in the task). ``aggregator``: the
    Aggregator actor's handle (untyped: mypy does not apply ``@ray.remote``).
    """
    if not client_ids:
        return []
    refs = aggregator.configure.options(num_returns=len(client_ids)).remote(round_idx, client_ids, seeds)
    return [refs] if len(client_ids) == 1 else list(refs)  # Ray gives one ref, not a list, for num_returns=1


def reserved_cpus(cpus: int) -> int:
    """CPUs Ray reserves for the Aggregator actor given ``workers.aggregator_cpus``: none for 1, else all of them.

    With one thread the actor mostly waits on the workers while they train,
    so it takes no CPU from them (``num_cpus=0``, as it always has).
    """
    return cpus if cpus > 1 else 0


def aggregator_options(cpus: int, env: Mapping[str, str]) -> dict[str, Any]:
    """Ray ``.options(...)`` for the Aggregator actor given ``workers.aggregator_cpus``.

    1: none, the class's own ``num_cpus=0``; Ray then starts the actor with
    ``OMP_NUM_THREADS=1``, so numpy's BLAS and torch run one thread. More:
    ``cpus`` CPUs reserved, and the actor's process started with ``env``, which
    should set the thread counts to ``cpus`` (``fedsim.environment.thread_env``):
    BLAS reads them once, when it loads, so they must be in the process's
    environment from its start. The Gram matrices of FedAlign-MoE's
    direction consensus then run on that many threads.
    """
    if reserved_cpus(cpus) == 0:
        return {}
    return {"num_cpus": reserved_cpus(cpus), "runtime_env": {"env_vars": dict(env)}}


@ray.remote(num_cpus=0)
class Aggregator:
    """Holds the strategy (and its cross-round state) and the run's simulated clock for the whole run.

    ``clock``: the simulated clock every round is timed on (profiles and round policy); None:
    ``OnTimeClock()``, every update on time.
    """

    def __init__(
        self,
        strategy_factory: Callable[[PayloadLayout], Strategy],
        layout: PayloadLayout,
        max_update_norm: float | None = None,
        measure_memory: bool = False,
        clock: SimulatedClock | None = None,
    ) -> None:
        self.strategy = strategy_factory(layout)
        self.layout = layout
        self.max_update_norm = max_update_norm
        self.clock: SimulatedClock = clock if clock is not None else OnTimeClock()
        # Reading private memory walks every mapping of this process (~6 ms with torch and Ray loaded), on the
        # round's critical path: only when asked.
        self.measure_memory = measure_memory
        # Error-feedback residuals of compressed uplinks: client-side state, kept here between the
        # rounds a client is sampled in (one payload-sized float32 array per such client).
        self.residuals: dict[int, np.ndarray] = {}

    def configure(
        self, round_idx: int, client_ids: list[int], seeds: list[int]
    ) -> ClientInstructions | list[ClientInstructions]:
        """The strategy's instructions, with each client's error-feedback residual when it has one.

        One return value per client: call it with ``num_returns=len(client_ids)``
        (``instruction_refs``); for a single client the instructions themselves, not a list of one.
        """
        out = []
        for c, s in zip(client_ids, seeds, strict=True):
            ins = self.strategy.configure(c, round_idx, seed=s)
            out.append(replace(ins, residual=self.residuals[c]) if c in self.residuals else ins)
        return out[0] if len(out) == 1 else out

    def durations(self, update_refs: list[ray.ObjectRef[ClientUpdate]]) -> list[float]:
        """Each update's simulated duration on the run's clock, once all have finished.

        0 for a client that failed: it is known at once. Read zero-copy; nothing is merged.
        """
        out = []
        for ref in update_refs:
            try:
                u = ray.get(ref)
            except _LOST:
                out.append(0.0)
                continue
            out.append(simulated_duration(u, self.clock))
            del u
        return out

    @ray.method(num_returns=2)
    def aggregate(
        self, round_idx: int, global_payload: np.ndarray, update_refs: list[ray.ObjectRef[ClientUpdate]],
        staleness: list[tuple[int, float]] | None = None,
    ) -> tuple[np.ndarray, RoundSummary]:
        """Fold the round's updates (refs in cohort order) into the strategy; return new payload and summary.

        On the run's clock, each update's simulated duration decides whether it is merged: under
        ``deadline`` as it arrives, under ``over_select`` once every update is in (only then is it
        known which finished first on the simulated clock; the updates wait as object-store views).
        With ``staleness`` (asynchronous buffered aggregation), (τ_i, s_i) per update: update i counts
        with its weight and routing statistics discounted by the factor s_i, and τ_i goes to its row.
        """
        fold = RoundFold(
            self.strategy, self.layout, global_payload, round_idx=round_idx, cohort_size=len(update_refs),
            residuals=self.residuals, max_update_norm=self.max_update_norm, clock=self.clock, staleness=staleness,
        )
        position = {ref: i for i, ref in enumerate(update_refs)}
        pending = list(update_refs)
        update_refs.clear()  # hold each ref only until it is folded in: small updates live inline in this process
        wait_s = get_s = 0.0
        while pending:
            t0 = time.perf_counter()
            ready, pending = ray.wait(pending, num_returns=1, fetch_local=False)
            wait_s += time.perf_counter() - t0
            for ref in ready:
                i = position.pop(ref)
                t0 = time.perf_counter()
                try:
                    update = ray.get(ref)
                except _LOST as exc:
                    fold.arrive(i, _failure_reason(exc))
                else:
                    get_s += time.perf_counter() - t0
                    fold.arrive(i, update)
                    del update  # the fold holds it until its turn
            del ready, ref
        payload, summary = fold.finish()
        return payload, replace(
            summary,
            aggregator_seconds={"wait": wait_s, "get": get_s, **summary.aggregator_seconds},
            aggregator_peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            aggregator_uss_mib=psutil.Process().memory_full_info().uss / 2**20 if self.measure_memory else math.nan,
        )

    def state_dict(self) -> dict[str, Any]:
        """The strategy's state and the clients' error-feedback residuals (for checkpoints)."""
        return {"strategy": self.strategy.state_dict(), "residuals": dict(self.residuals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the strategy's state and the residuals from ``state_dict()``'s output (a checkpoint)."""
        self.strategy.load_state_dict(state["strategy"])
        self.residuals = dict(state["residuals"])
