"""Ray actors and placement only: the ClientWorker pool and the Aggregator."""

from typing import Any

from actors.aggregator import Aggregator, RoundSummary, aggregator_options, reserved_cpus
from actors.pool import WorkerPool, gpu_total_bytes, resolve_num_workers, shard_by_work
from actors.worker import ClientWorker, Engine

# Ray's max_direct_call_object_size: an object under it (100 KiB by default) is inlined into each process
# handed its reference instead of going to the shared object store.
RAY_INLINE_DEFAULT_BYTES = 100 * 1024
SHARED_STORE_ONLY_BYTES = 1024
INLINE_BUDGET_BYTES = 8 * 2**20  # a round's inlined updates may take this much private memory in a receiver


def embedded_system_config(update_bytes: int, clients_per_round: int) -> dict[str, Any]:
    """Ray's system config for an embedded Ray whose rounds carry ``clients_per_round`` updates of ``update_bytes``.

    Inlining is fast for the small control messages (instructions, round
    summaries, small payloads) and for small updates, but every receiver
    then holds private copies. Measured with the tiny model's 56 KiB updates:
    500 in a round added 31 % to the aggregator's private memory (USS, ~58 MiB),
    against 4 % with a 1 KiB limit, which sends them to the shared store to be
    read zero-copy; at 10 clients per round the 1 KiB limit cost 6–7 % of the
    round (overhead ratio 1.17 against 1.10), as every small object then went
    through the store too. So the limit drops to 1 KiB only when a round's
    updates are small enough to be inlined and together exceed
    ``INLINE_BUDGET_BYTES``; otherwise Ray's default holds (updates of 100 KiB
    or more go to the shared store either way). On a cluster, the same choice is
    ``RAY_max_direct_call_object_size`` where ``ray start`` runs.
    """
    if update_bytes < RAY_INLINE_DEFAULT_BYTES and update_bytes * clients_per_round > INLINE_BUDGET_BYTES:
        return {"max_direct_call_object_size": SHARED_STORE_ONLY_BYTES}
    return {}


# For an embedded Ray started before the workload is known (tests, benchmarks of the aggregator alone): every
# object over 1 KiB in the shared store, the choice that bounds memory whatever the cohort.
EMBEDDED_SYSTEM_CONFIG: dict[str, Any] = {"max_direct_call_object_size": SHARED_STORE_ONLY_BYTES}

__all__ = [
    "EMBEDDED_SYSTEM_CONFIG",
    "INLINE_BUDGET_BYTES",
    "RAY_INLINE_DEFAULT_BYTES",
    "SHARED_STORE_ONLY_BYTES",
    "Aggregator",
    "ClientWorker",
    "Engine",
    "RoundSummary",
    "WorkerPool",
    "aggregator_options",
    "embedded_system_config",
    "gpu_total_bytes",
    "reserved_cpus",
    "resolve_num_workers",
    "shard_by_work",
]
