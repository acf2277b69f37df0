"""Worker groups: G ClientWorkers placed together and bound into one torch.distributed world.

A group trains one virtual client at a time with all G of its workers (an
engine with experts sharded over them, e.g. ``fedsim.engine.deepspeed_engine``);
several groups run side by side, each in its own placement group
(STRICT_PACK: one node, one bundle per rank) and its own world with its own
rendezvous port, so groups never share a collective.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


@dataclass(frozen=True, slots=True)
class GroupContext:
    """What one rank of a group needs to join its world (handed to the engine factory)."""

    rank: int
    size: int
    master_addr: str
    master_port: int


@ray.remote(num_cpus=0)
def _free_address() -> tuple[str, int]:
    """The node's address and a port free on it now, for the group's rendezvous (rank 0 listens there)."""
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    # ray.util leaves get_node_ip_address unannotated (it returns the address as a str)
    return ray.util.get_node_ip_address(), port  # type: ignore[no-untyped-call]


def rendezvous(pg: PlacementGroup) -> tuple[str, int]:
    """Address and free port on the node of the group's first bundle (where rank 0 runs)."""
    strategy = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=0)
    return ray.get(_free_address.options(scheduling_strategy=strategy).remote())


def group_contexts(pg: PlacementGroup, size: int) -> list[GroupContext]:
    """One context per rank, all pointing at the same fresh rendezvous."""
    addr, port = rendezvous(pg)
    return [GroupContext(rank=r, size=size, master_addr=addr, master_port=port) for r in range(size)]
