"""Simulated time: each client's simulated round duration, and which updates a round keeps.

The simulator measures how long a client's local training really took on its
worker; a device profile turns that into how long it would take on the
client's device and network (FedScale's model of systems heterogeneity):

    duration = compute_seconds × speed_factor + bytes_down / downlink + bytes_up / uplink + latency

Round policies decide which updates the server merges, on that clock:
``wait_all`` keeps every update (the round lasts as long as its slowest client);
``deadline`` keeps those that finish within ``deadline_s`` (the rest are
stragglers, dropped and logged; the round lasts the deadline when any was
dropped); ``over_select`` samples more clients than needed and keeps the
first ``keep`` to finish. Pure functions of the profiles and the updates'
metadata: no clock is read. A ``RoundClock`` is what the aggregator is handed
once, at its start: it is the ``aggregation.sim_clock.SimulatedClock`` the
server's round fold times its updates with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from aggregation.sim_clock import RoundTiming

__all__ = ["DeviceProfile", "Policy", "RoundClock", "RoundTiming", "select"]

Policy = Literal["wait_all", "deadline", "over_select"]


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """One client's device: compute slowdown, link speeds (bytes/s; inf: free) and a fixed latency (s)."""

    speed_factor: float = 1.0
    downlink_bps: float = math.inf
    uplink_bps: float = math.inf
    latency_s: float = 0.0

    def duration(self, compute_seconds: float, bytes_down: int, bytes_up: int) -> float:
        """Simulated seconds of one round's work for this client."""
        return (compute_seconds * self.speed_factor + bytes_down / self.downlink_bps + bytes_up / self.uplink_bps
                + self.latency_s)


def select(
    durations: Mapping[int, float], policy: Policy, *, deadline_s: float = math.inf, keep: int = 0
) -> RoundTiming:
    """Apply a round policy to the clients' simulated durations (ties broken by client id)."""
    if policy == "wait_all":
        kept = frozenset(durations)
    elif policy == "deadline":
        kept = frozenset(c for c, d in durations.items() if d <= deadline_s)
    elif policy == "over_select":
        order = sorted(durations, key=lambda c: (durations[c], c))
        kept = frozenset(order[:keep])
    else:
        raise ValueError(f"unknown round policy {policy!r}")
    stragglers = frozenset(durations) - kept
    if policy == "deadline" and stragglers:
        seconds = deadline_s
    else:
        seconds = max((durations[c] for c in kept), default=0.0)
    return RoundTiming(kept, stragglers, seconds)


@dataclass(frozen=True)
class RoundClock:
    """What the aggregator needs to time a round: profiles, the policy, and how compute time is modelled.

    ``seconds_per_example`` None takes each client's measured compute seconds
    (faithful to the model's real cost, but run-to-run timing noise can change
    which clients a deadline keeps); a number makes compute
    ``seconds_per_example × examples × epochs`` on a speed-1 device, so a
    schedule is exactly reproducible.
    """

    profiles: Mapping[int, DeviceProfile]
    policy: Policy = "wait_all"
    deadline_s: float = math.inf
    keep: int = 0
    seconds_per_example: float | None = None
    epochs: int = 1

    def duration(
        self, client_id: int, n_examples: float, compute_seconds: float, bytes_down: int, bytes_up: int
    ) -> float:
        """Simulated seconds of client ``client_id``'s round on its device profile (``DeviceProfile()`` if none).

        Compute is ``compute_seconds``, or ``seconds_per_example × n_examples × epochs`` when that is set.
        """
        compute = (compute_seconds if self.seconds_per_example is None
                   else self.seconds_per_example * n_examples * self.epochs)
        return self.profiles.get(client_id, DeviceProfile()).duration(compute, bytes_down, bytes_up)

    def timing(self, durations: Mapping[int, float]) -> RoundTiming:
        """The kept clients, stragglers and round length under the clock's policy: ``select`` of the durations (s)."""
        return select(durations, self.policy, deadline_s=self.deadline_s, keep=self.keep)
