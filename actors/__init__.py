"""Ray actors and placement only: the ClientWorker pool and the Aggregator."""

from typing import Any

# Ray inlines a task return smaller than max_direct_call_object_size (100 KiB by default) into the
# reference itself, so every process handed the reference holds a private copy: measured with the tiny
# model's 56 KiB updates, 500 of them added 52 MiB to the aggregator before it read one. With 1 KiB,
# updates go to the shared object store and are read zero-copy. Applied to the embedded Ray; on a
# cluster, set RAY_max_direct_call_object_size=1024 where `ray start` runs (it matters only for updates
# under 100 KiB).
EMBEDDED_SYSTEM_CONFIG: dict[str, Any] = {"max_direct_call_object_size": 1024}

from actors.aggregator import Aggregator, RoundSummary
from actors.pool import WorkerPool, count_finished, gpu_total_bytes, resolve_num_workers, shard_by_work
from actors.worker import ClientWorker, Engine

__all__ = [
    "EMBEDDED_SYSTEM_CONFIG",
    "Aggregator",
    "ClientWorker",
    "Engine",
    "RoundSummary",
    "WorkerPool",
    "count_finished",
    "gpu_total_bytes",
    "resolve_num_workers",
    "shard_by_work",
]
