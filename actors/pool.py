"""A fixed pool of ClientWorker actors (or worker groups) placed with Ray placement groups.

Hundreds of virtual clients share a few resident workers (an idle actor costs
~185 MB with torch imported, so never one actor per client). Each round the
cohort is split into per-worker shards by longest-processing-time on each
client's estimated work (the driver's: rows it will train, so a client capped
at a few local steps weighs what it trains, not what it holds), so the
slowest shard is as short as the estimates allow.

With ``group_size`` set, each unit of the pool is a worker group
(``actors.group``): G workers in a STRICT_PACK placement group that train each
of the unit's clients together; the first rank's task returns the update.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.group import group_contexts
from actors.worker import ClientWorker, Engine, drop_factory, store_factory
from aggregation.errors import ConfigError
from aggregation.messages import ClientInstructions, ClientUpdate


def shard_by_work(work: Sequence[float], num_workers: int) -> list[list[int]]:
    """Positions of ``work`` split into ``num_workers`` shards, largest first onto the least loaded.

    Deterministic (ties broken by worker index), so the same cohort always maps the same way.
    """
    heap: list[tuple[float, int]] = [(0, w) for w in range(num_workers)]  # (load, worker)
    shards: list[list[int]] = [[] for _ in range(num_workers)]
    for pos in sorted(range(len(work)), key=lambda i: (-work[i], i)):
        load, w = heapq.heappop(heap)
        shards[w].append(pos)
        heapq.heappush(heap, (load + work[pos], w))
    return shards


def round_robin(shards: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """(worker, position) pairs taking each shard's first position, then each one's second, and so on.

    Every shard keeps its own order.
    """
    depth = max((len(s) for s in shards), default=0)
    return [(w, shard[k]) for k in range(depth) for w, shard in enumerate(shards) if k < len(shard)]


def resolve_num_workers(
    requested: int, *, cpus_per_worker: float, gpus_per_worker: float, group_size: int | None = None,
    reserve_cpus: float = 0.0, nodes: Sequence[Mapping[str, float]] | None = None,
) -> int:
    """Workers (or worker groups) that fit the cluster; raise ConfigError naming the numbers if they do not.

    Checked before any actor starts. A group's G workers must share one node
    (STRICT_PACK), so groups are counted node by node. ``nodes``: the resources
    of the nodes an embedded Ray will have, so the check can run before it
    starts; None reads the running cluster's.
    """
    if nodes is None:
        # ray.nodes is unannotated: a list of dicts, one per node, with "Alive" and "Resources"
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]
    cpus = sum(n.get("CPU", 0.0) for n in nodes) - reserve_cpus
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    if group_size is None:
        fit = _fit(cpus, gpus, cpus_per_worker, gpus_per_worker)
        unit = f"workers × ({cpus_per_worker:g} CPU, {gpus_per_worker:g} GPU)"
    else:
        fit = sum(_fit(n.get("CPU", 0.0), n.get("GPU", 0.0), cpus_per_worker * group_size, gpus_per_worker * group_size)
                  for n in nodes)
        fit = min(fit, _fit(cpus, gpus, cpus_per_worker * group_size, gpus_per_worker * group_size))
        unit = f"groups × {group_size} workers × ({cpus_per_worker:g} CPU, {gpus_per_worker:g} GPU) on one node"
    if requested == 0:
        if fit < 1:
            raise ConfigError(
                f"workers: no {'worker' if group_size is None else 'group'} fits: {cpus:g} CPUs / {gpus:g} GPUs "
                f"available, asked: 1 of {unit}"
            )
        return fit
    if requested > fit:
        raise ConfigError(
            f"workers.num_workers: {requested} {unit} do not fit {cpus:g} CPUs / {gpus:g} GPUs; at most {fit}"
        )
    return requested


def gpu_total_bytes(gpus_per_worker: float, timeout_s: float = 60.0) -> float | None:
    """Total memory of a GPU a worker would get, read by a task on a GPU node; None if the cluster has none."""
    # ray.cluster_resources is unannotated: a dict of resource name to total quantity
    if ray.cluster_resources().get("GPU", 0.0) <= 0:  # type: ignore[no-untyped-call]
        return None

    @ray.remote(num_cpus=0, num_gpus=min(1.0, gpus_per_worker))
    def probe() -> float:
        import torch

        return float(torch.cuda.get_device_properties(0).total_memory)

    ref = probe.remote()
    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        ray.cancel(ref, force=True)
        return None
    return float(ray.get(ref))


def _fit(cpus: float, gpus: float, cpus_each: float, gpus_each: float) -> int:
    """How many units of (cpus_each, gpus_each) fit in (cpus, gpus)."""
    fit = int(round(cpus / cpus_each, 6))
    if gpus_each > 0:
        fit = min(fit, int(round(gpus / gpus_each, 6)))
    return max(fit, 0)


class WorkerPool:
    """Creates the workers inside placement groups and dispatches clients to them.

    ``group_size`` None: ``num_workers`` independent workers in one PACK
    (or, with ``spread``, SPREAD: over as many nodes as possible) placement
    group, each calling ``engine_factory()``. ``group_size`` G:
    ``num_workers`` groups of G workers, each group in its own STRICT_PACK
    placement group, each rank calling ``engine_factory(GroupContext)``. A
    group's ranks depend on each other, so Ray does not restart them
    (``max_restarts`` and ``max_task_retries`` apply to plain workers only).
    """

    def __init__(
        self,
        engine_factory: Callable[..., Engine],
        *,
        num_workers: int,
        cpus_per_worker: float,
        gpus_per_worker: float,
        group_size: int | None = None,
        spread: bool = False,
        max_restarts: int = 0,
        max_task_retries: int = 0,
        ready_timeout_s: float = 600.0,
    ) -> None:
        bundle: dict[str, float] = {"CPU": cpus_per_worker}
        if gpus_per_worker > 0:
            bundle["GPU"] = gpus_per_worker
        if group_size is None:
            strategy = "SPREAD" if spread else "PACK"
            self._pgs = [placement_group([dict(bundle) for _ in range(num_workers)], strategy=strategy)]
        else:
            self._pgs = [placement_group([dict(bundle) for _ in range(group_size)], strategy="STRICT_PACK")
                         for _ in range(num_workers)]
        ready, _ = ray.wait([pg.ready() for pg in self._pgs], num_returns=len(self._pgs), timeout=ready_timeout_s)
        if len(ready) < len(self._pgs):
            for pg in self._pgs:
                remove_placement_group(pg)
            what = f"{num_workers} bundles" if group_size is None else f"{num_workers} groups of {group_size} bundles"
            raise ConfigError(f"workers: {what} of {bundle} could not be placed within {ready_timeout_s:.0f} s")
        # A worker that Ray restarts re-runs its constructor and must find its arguments again: the engine
        # recipe waits in the GCS key-value store until shutdown, and the workers get its key (store_factory).
        self._factory_key = store_factory(engine_factory)
        if group_size is None:
            self.units = [
                [self._worker(self._pgs[0], i, i, None, max_restarts, max_task_retries, cpus_per_worker,
                              gpus_per_worker)]
                for i in range(num_workers)
            ]
        else:
            self.units = []
            for g, pg in enumerate(self._pgs):
                contexts = group_contexts(pg, group_size)
                self.units.append([
                    self._worker(pg, r, g * group_size + r, contexts[r], 0, 0, cpus_per_worker, gpus_per_worker)
                    for r in range(group_size)
                ])
        self.workers = [unit[0] for unit in self.units]  # the ranks whose tasks return results

    def _worker(self, pg: Any, bundle: int, index: int, context: Any, max_restarts: int, max_task_retries: int,
                cpus: float, gpus: float) -> Any:
        # @ray.remote makes ClientWorker an ActorClass, but ray's typing keeps the plain class, without options
        return ClientWorker.options(  # type: ignore[attr-defined]
            num_cpus=cpus,
            num_gpus=gpus,
            # a dead worker process is restarted in its bundle and its client in flight retried;
            # finished updates are task returns owned by the driver, so they outlive the worker
            max_restarts=max_restarts,
            max_task_retries=max_task_retries,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=bundle
            ),
        ).remote(self._factory_key, index, context)

    def __len__(self) -> int:
        return len(self.workers)

    def describe(self) -> Any:
        """Layout and initial payload from the first worker (all workers build the same)."""
        return ray.get(self.workers[0].describe.remote())

    def submit(
        self,
        payload_ref: ray.ObjectRef[np.ndarray],
        instructions: Sequence[ClientInstructions | ray.ObjectRef[ClientInstructions]],
        indices: Sequence[np.ndarray],
        work: Sequence[float],
    ) -> list[ray.ObjectRef[ClientUpdate]]:
        """Queue each client on a worker, balancing ``work``; return the update refs in cohort order.

        ``instructions``: per client, the instructions or an object ref to them
        (``actors.aggregator.instruction_refs``), passed on unread; Ray resolves a
        ref for the worker, so the caller never fetches a payload-sized instruction.

        Submitted round-robin over the shards (each worker's first client, then each one's
        second, ...), so every worker starts after about one submission per worker; shard by
        shard, the last of W workers waited for (W−1)/W of the cohort's submissions
        (~0.4 ms each) before its first client was sent.
        """
        refs: list[ray.ObjectRef[ClientUpdate] | None] = [None] * len(instructions)
        for w, pos in round_robin(shard_by_work(work, len(self.workers))):
            # every rank of a group gets the same clients in the same order
            unit_refs = [member.train.remote(indices[pos], payload_ref, instructions[pos]) for member in self.units[w]]
            refs[pos] = unit_refs[0]
        return [r for r in refs if r is not None]

    def evaluate(self, payload_ref: ray.ObjectRef[np.ndarray], chunks: Sequence[tuple[int, int]]) -> list[Any]:
        """Evaluate fixed test chunks spread over the workers; results in chunk order."""
        n = len(self.units)
        parts = [list(chunks[w::n]) for w in range(n)]
        refs = [[m.evaluate.remote(payload_ref, parts[w]) for m in self.units[w]] for w in range(n) if parts[w]]
        results = [ray.get(unit_refs)[0] for unit_refs in refs]  # all submitted already; rank 0's result
        out: list[Any] = [None] * len(chunks)
        for w, res in enumerate(results):
            for j, r in enumerate(res):
                out[w + j * n] = r
        return out

    def placement(self) -> list[dict[str, Any]]:
        """Where each worker runs: unit (worker or group), rank in it, node id and address, process id."""
        refs = [[m.where.remote() for m in unit] for unit in self.units]
        return [{"unit": u, "rank": r, **info}
                for u, unit_refs in enumerate(refs) for r, info in enumerate(ray.get(unit_refs))]

    def memory(self) -> list[dict[str, float]]:
        """Each worker's process id and peak resident memory (MiB), in ``placement`` order."""
        return ray.get([m.memory.remote() for unit in self.units for m in unit])

    def shutdown(self) -> None:
        """Kill every worker, remove the placement groups and drop the engine factory from the key-value store."""
        for unit in self.units:
            for member in unit:
                ray.kill(member)
        for pg in self._pgs:
            remove_placement_group(pg)
        drop_factory(self._factory_key)
