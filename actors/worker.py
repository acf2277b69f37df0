"""ClientWorker: a Ray actor that keeps one engine (and its frozen base model) resident.

The driver hands the pool a picklable engine factory, so ``actors/`` never
imports the simulator; the pool keeps it in the cluster's key-value store
(``store_factory``) and each actor is created with its key. A worker trains
the virtual clients it is given one at a time and returns each
``ClientUpdate`` as an object in the object store.
"""

from __future__ import annotations

import os
import resource
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import ray
from ray import cloudpickle
from ray.experimental import internal_kv

from actors.group import GroupContext
from aggregation.errors import ClientFailure
from aggregation.messages import ClientInstructions, ClientUpdate
from aggregation.payload import PayloadLayout


class Engine(Protocol):
    """What a worker needs of an engine (``fedsim.engine`` provides them)."""

    layout: PayloadLayout
    initial_payload: np.ndarray

    def train(
        self, indices: np.ndarray, payload: np.ndarray, instructions: ClientInstructions
    ) -> ClientUpdate | None:
        """The update of client ``instructions.client_id`` trained on its rows ``indices`` from ``payload``.

        None from ranks > 0 of a worker group (rank 0 returns the group's update).
        """
        ...

    def evaluate(self, payload: np.ndarray, chunks: list[tuple[int, int]]) -> list[Any]:
        """One result per chunk, in order: ``payload`` evaluated on test rows [lo, hi) of each ``(lo, hi)``."""
        ...


FACTORY_NAMESPACE = "fedsim"


def store_factory(engine_factory: Callable[..., Engine]) -> str:
    """Keep ``engine_factory`` in the GCS key-value store for as long as the pool lives; return its key.

    The workers get the key, a short string, as their constructor argument.
    An argument Ray keeps in the object store (any ``ray.put`` reference, or a
    value over ``max_direct_call_object_size``: a recipe is ~1.1 KiB, over the
    1 KiB limit ``actors.embedded_system_config`` may set) can be gone when Ray
    restarts a dead worker (ray-project/ray#53727; Ray says so in an error
    line at creation when ``max_restarts`` > 0); a key is inlined in the task
    Ray keeps for the restart, and the store holds the recipe until ``drop_factory``.
    """
    key = f"engine-factory-{uuid.uuid4().hex}"
    # ray's vendored cloudpickle is unannotated (dumps returns bytes)
    internal_kv._internal_kv_put(key, cloudpickle.dumps(engine_factory), namespace=FACTORY_NAMESPACE)  # type: ignore[no-untyped-call]
    return key


def load_factory(key: str) -> Callable[..., Engine]:
    """The engine factory ``store_factory`` kept under ``key``."""
    blob = internal_kv._internal_kv_get(key, namespace=FACTORY_NAMESPACE)
    if blob is None:
        raise RuntimeError(f"engine factory {key} is not in the GCS key-value store (was its pool shut down?)")
    factory: Callable[..., Engine] = cloudpickle.loads(blob)
    return factory


def drop_factory(key: str) -> None:
    """Remove the factory kept under ``key``; a worker restarted after this fails to construct."""
    internal_kv._internal_kv_del(key, namespace=FACTORY_NAMESPACE)


@ray.remote
class ClientWorker:
    """Hosts one engine; trains clients sequentially, evaluates test chunks."""

    def __init__(self, factory_key: str, worker_index: int, group: GroupContext | None = None) -> None:
        """Build the engine from the factory stored under ``factory_key`` (``store_factory``).

        Ray runs this again, with the same arguments, when it restarts the worker.
        """
        engine_factory = load_factory(factory_key)
        self.worker_index = worker_index
        self.engine = engine_factory() if group is None else engine_factory(group)

    def describe(self) -> tuple[PayloadLayout, np.ndarray]:
        """The payload layout and the initial global payload (the base's fresh LoRA and router)."""
        return self.engine.layout, self.engine.initial_payload

    def train(
        self, indices: np.ndarray, payload: np.ndarray, instructions: ClientInstructions
    ) -> ClientUpdate | None:
        """Train one client; its ``ClientUpdate`` is this task's return value (None from ranks > 0 of a group).

        Returned, not ``ray.put`` here: a task's return is owned by the caller
        and lives in the node's object store, so updates already finished
        survive this worker's death while Ray restarts it and retries the
        client in flight. (Returns under ``max_direct_call_object_size`` are
        inlined into every process handed the reference, and held by the
        caller; the embedded Ray lowers that limit when a round's small
        updates would add up, see ``actors.embedded_system_config``.)
        """
        try:
            return self.engine.train(indices, payload, instructions)
        except ClientFailure:
            raise
        except Exception as exc:  # any failure becomes data naming the client and round
            raise ClientFailure(instructions.client_id, instructions.round_idx, f"{type(exc).__name__}: {exc}") from exc

    def evaluate(self, payload: np.ndarray, chunks: list[tuple[int, int]]) -> list[Any]:
        """The engine's per-chunk results for ``payload`` on test rows [lo, hi) of each chunk, in chunk order."""
        return self.engine.evaluate(payload, chunks)

    def memory(self) -> dict[str, float]:
        """Process id and peak resident memory (MiB) of this worker."""
        return {"pid": os.getpid(), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    def where(self) -> dict[str, Any]:
        """The node and process this worker runs in."""
        context = ray.get_runtime_context()
        # ray.util leaves get_node_ip_address unannotated (it returns the address as a str)
        return {"node_id": context.get_node_id(), "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid()}  # type: ignore[no-untyped-call]
