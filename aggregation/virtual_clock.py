"""Simulated time: device profiles, each client's simulated round duration, and which updates a round keeps.

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
metadata: no clock is read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

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


def random_profiles(
    num_clients: int, *, seed: int, slow_fraction: float = 0.0, slow_factor: float = 1.0,
    downlink_bps: float = math.inf, uplink_bps: float = math.inf, latency_s: float = 0.0,
) -> dict[int, DeviceProfile]:
    """Profiles where a seeded ``slow_fraction`` of the clients compute ``slow_factor`` times slower."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC10C]))
    slow = set(rng.choice(num_clients, size=round(slow_fraction * num_clients), replace=False).tolist())
    return {
        c: DeviceProfile(slow_factor if c in slow else 1.0, downlink_bps, uplink_bps, latency_s)
        for c in range(num_clients)
    }


@dataclass(frozen=True, slots=True)
class RoundTiming:
    """Which clients a round keeps on the simulated clock, and how long it lasts."""

    kept: frozenset[int]
    stragglers: frozenset[int]
    round_seconds: float


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


def available(num_clients: int, *, round_idx: int, seed: int, probability: float) -> list[int]:
    """Clients online at round ``round_idx`` under a seeded on/off process (each up with ``probability``)."""
    if probability >= 1.0:
        return list(range(num_clients))
    rng = np.random.default_rng(np.random.SeedSequence([seed, round_idx, 0xA7A1]))
    return [c for c in range(num_clients) if rng.random() < probability]


@dataclass(frozen=True)
class AvailabilityTrace:
    """When each client is online: intervals [active_i, inactive_i) of a cycle of ``period`` seconds, repeated.

    The shape of FedScale's client behaviour traces (``active`` and ``inactive`` time stamps and a
    ``finish_time`` per client).
    """

    intervals: dict[int, tuple[tuple[float, float], ...]]
    period: dict[int, float]

    def online(self, at_s: float) -> list[int]:
        """Clients online at simulated time ``at_s``."""
        return [c for c, spans in sorted(self.intervals.items())
                if any(a <= at_s % self.period[c] < b for a, b in spans)]

    def next_online(self, after_s: float) -> float:
        """The first time after ``after_s`` at which some client comes online (inf if none ever does)."""
        best = math.inf
        for c, spans in self.intervals.items():
            cycle = after_s - after_s % self.period[c]
            for a, _ in spans:
                start = cycle + a if cycle + a > after_s else cycle + self.period[c] + a
                best = min(best, start)
        return best


def over_selected(per_round: int, rate: float, num_available: int) -> int:
    """How many to sample for over-selection: ⌈k·(1 + r)⌉, at most the available clients."""
    return min(num_available, math.ceil(per_round * (1.0 + rate)))




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
