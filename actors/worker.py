"""ClientWorker: a Ray actor that keeps one engine (and its frozen base model) resident.

The actor is handed a picklable engine factory by the driver, so ``actors/``
never imports the simulator; it trains the virtual clients it is given one at
a time and returns each ``ClientUpdate`` as an object in the object store.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import ray

from actors.group import GroupContext
from aggregation.errors import ClientFailure
from aggregation.messages import ClientInstructions, ClientUpdate
from aggregation.payload import PayloadLayout


class Engine(Protocol):
    """What a worker needs of an engine (``fedsim.engine`` provides them)."""

    layout: PayloadLayout
    initial_payload: np.ndarray

    def train(self, indices: np.ndarray, payload: np.ndarray, instructions: ClientInstructions) -> ClientUpdate | None: ...

    def evaluate(self, payload: np.ndarray, chunks: list[tuple[int, int]]) -> list[Any]: ...


@ray.remote
class ClientWorker:
    """Hosts one engine; trains clients sequentially, evaluates test chunks."""

    def __init__(self, engine_factory: Callable[..., Engine], worker_index: int, group: GroupContext | None = None) -> None:
        self.worker_index = worker_index
        self.engine = engine_factory() if group is None else engine_factory(group)

    def describe(self) -> tuple[PayloadLayout, np.ndarray]:
        """The payload layout and the initial global payload (the base's fresh LoRA and router)."""
        return self.engine.layout, self.engine.initial_payload

    def train(
        self, indices: np.ndarray, payload: np.ndarray, instructions: ClientInstructions
    ) -> ClientUpdate | None:
        """Train one client; its ``ClientUpdate`` goes back as this task's return value (None from ranks > 0 of a group).

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
        return self.engine.evaluate(payload, chunks)

    def memory(self) -> dict[str, float]:
        """Process id and peak resident memory (MiB) of this worker."""
        return {"pid": os.getpid(), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    def where(self) -> dict[str, Any]:
        """The node and process this worker runs in."""
        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "node_ip": ray.util.get_node_ip_address(), "pid": os.getpid()}
