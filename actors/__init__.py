"""Ray actors and placement only: the ClientWorker pool and the Aggregator."""

from actors.aggregator import Aggregator, RoundSummary
from actors.pool import WorkerPool, count_finished, resolve_num_workers, shard_by_size
from actors.worker import ClientWorker, Engine

__all__ = [
    "Aggregator",
    "ClientWorker",
    "Engine",
    "RoundSummary",
    "WorkerPool",
    "count_finished",
    "resolve_num_workers",
    "shard_by_size",
]
