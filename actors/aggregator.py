"""Aggregator: a Ray actor that runs a Strategy over updates as they complete.

Updates arrive as object refs, read zero-copy from the object store, so the
cohort is never gathered into driver or aggregator memory. In a synchronous
round the driver hands each ref over as its client finishes (``deliver_updates``)
and keeps none: Ray keeps every ref passed in a call's arguments until the call
returns, so a round's refs passed to ``aggregate`` itself would hold the whole
cohort in the store (spilling it once it outgrows the store) until the round
ends; delivered one by one, each update leaves the store once folded. Each
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
import queue
import resource
import time
from collections.abc import Callable, Iterator, Mapping
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

__all__ = ["Aggregator", "RoundSummary", "aggregator_options", "deliver_updates", "instruction_refs",
           "reserved_cpus"]

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


def finished_in_order(
    update_refs: list[ray.ObjectRef[ClientUpdate]], poll_s: float,
) -> Iterator[tuple[int, list[tuple[int, ray.ObjectRef[ClientUpdate]]]]]:
    """(how many have finished, [(cohort position, ref), ...] of those finished since) every ``poll_s`` seconds.

    Takes the refs over: ``update_refs`` is emptied, so a ref lives only until
    its consumer drops it (small updates live inline in the holder's process).
    A poll in which nothing finished yields an empty batch.
    """
    position = {ref: i for i, ref in enumerate(update_refs)}
    pending, total = list(update_refs), len(update_refs)
    update_refs.clear()
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=poll_s, fetch_local=False)
        batch = [(position.pop(ref), ref) for ref in ready]
        del ready  # the batch is the only holder here: each ref goes when its consumer pops it
        yield total - len(pending), batch


def deliver_updates(
    aggregator: Any, round_idx: int, update_refs: list[ray.ObjectRef[ClientUpdate]],
    progress: Callable[[int, int], None], poll_s: float = 0.25,
) -> None:
    """Hand each update to ``aggregator`` (running ``aggregate(round_idx, ..., len(update_refs))``) as it finishes.

    Takes the refs over: ``update_refs`` is emptied and no ref is kept past its
    delivery, so an update leaves the object store as soon as the aggregator has
    folded it. ``progress(done, total)`` is called every ``poll_s`` seconds
    and after the last update.
    """
    total = len(update_refs)
    for done, batch in finished_in_order(update_refs, poll_s):
        while batch:
            position, ref = batch.pop()
            # in a list, so the aggregator gets the ref itself, not its value fetched into the call
            aggregator.deliver.remote(round_idx, position, [ref])
            del ref
        progress(done, total)


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


# "mailbox": ``deliver`` runs on a thread of its own while ``aggregate`` waits for it; every other method runs
# one at a time, in call order, as on an actor without concurrency
@ray.remote(num_cpus=0, concurrency_groups={"mailbox": 1})  # type: ignore[call-overload]  # a class's option
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
        # (round, cohort position, ref) handed over by ``deliver``, taken by ``aggregate``
        self.mailbox: queue.SimpleQueue[tuple[int, int, ray.ObjectRef[ClientUpdate]]] = queue.SimpleQueue()

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

    @ray.method(concurrency_group="mailbox")
    def deliver(self, round_idx: int, position: int, update_ref: list[ray.ObjectRef[ClientUpdate]]) -> None:
        """Hand the update at cohort ``position`` of round ``round_idx`` to ``aggregate`` (``[ref]``: a list of one).

        The caller may drop its ref as soon as this is called: the mailbox holds one until the update is folded.
        """
        self.mailbox.put((round_idx, position, update_ref[0]))

    def _delivered(self, round_idx: int, count: int) -> Iterator[tuple[int, ray.ObjectRef[ClientUpdate]]]:
        """The ``count`` (position, ref) pairs of round ``round_idx`` from the mailbox, as they are delivered.

        A delivery for another round (left by a round that failed part-way) is dropped.
        """
        while count:
            delivered_round, position, ref = self.mailbox.get()
            if delivered_round == round_idx:
                count -= 1
                yield position, ref
            del ref

    @staticmethod
    def _as_finished(
        update_refs: list[ray.ObjectRef[ClientUpdate]],
    ) -> Iterator[tuple[int, ray.ObjectRef[ClientUpdate]]]:
        """(position, ref) of each of ``update_refs`` (cohort order) as it finishes; the list is emptied."""
        for _, batch in finished_in_order(update_refs, poll_s=0.05):
            while batch:
                yield batch.pop()

    @ray.method(num_returns=2)
    def aggregate(
        self, round_idx: int, global_payload: np.ndarray, updates: list[ray.ObjectRef[ClientUpdate]] | int,
        staleness: list[tuple[int, float]] | None = None,
    ) -> tuple[np.ndarray, RoundSummary]:
        """Fold the round's updates into the strategy; return new payload and summary.

        ``updates``: the refs, in cohort order; or how many updates ``deliver`` will hand over (the driver's
        synchronous rounds, ``deliver_updates``), their refs then never held by this call's arguments.

        On the run's clock, each update's simulated duration decides whether it is merged: under
        ``deadline`` as it arrives, under ``over_select`` once every update is in (only then is it
        known which finished first on the simulated clock; the updates wait as object-store views).
        With ``staleness`` (asynchronous buffered aggregation), (τ_i, s_i) per update: update i counts
        with its weight and routing statistics discounted by the factor s_i, and τ_i goes to its row.
        """
        count = updates if isinstance(updates, int) else len(updates)
        fold = RoundFold(
            self.strategy, self.layout, global_payload, round_idx=round_idx, cohort_size=count,
            residuals=self.residuals, max_update_norm=self.max_update_norm, clock=self.clock, staleness=staleness,
        )
        arrivals = self._delivered(round_idx, updates) if isinstance(updates, int) else self._as_finished(updates)
        wait_s = get_s = 0.0
        for _ in range(count):
            t0 = time.perf_counter()
            i, ref = next(arrivals)
            wait_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            try:
                update = ray.get(ref)
            except _LOST as exc:
                fold.arrive(i, _failure_reason(exc))
            else:
                get_s += time.perf_counter() - t0
                fold.arrive(i, update)
                del update  # the fold holds it until its turn
            del ref
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
