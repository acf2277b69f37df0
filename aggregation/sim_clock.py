"""The simulated clock as the server's round fold sees it: a protocol, its answer, and the clock of no simulation.

The clock itself (device profiles, round policies, availability, asynchronous
buffering) lives with the simulator, in ``fedsim.sim``; ``aggregation`` may not
import it (DESIGN.md's dependency direction). The round fold and the Aggregator
actor hold any object that satisfies ``SimulatedClock``: the run's
``fedsim.sim.clock.RoundClock``, handed to the actor once, at its start, or
``OnTimeClock`` when a round is not simulated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class RoundTiming:
    """Which clients a round keeps on the simulated clock, and how long it lasts."""

    kept: frozenset[int]
    stragglers: frozenset[int]
    round_seconds: float


class SimulatedClock(Protocol):
    """What the round fold needs of the simulated clock: each update's duration, and the round's policy on them.

    ``policy`` is ``"wait_all"``, ``"deadline"`` (an update is on time when its
    duration is at most ``deadline_s``; the fold decides as each is folded) or
    ``"over_select"`` (which updates are kept is known only once all have
    arrived; the fold waits for the last one).
    """

    @property
    def policy(self) -> str:
        """The round policy: ``"wait_all"``, ``"deadline"`` or ``"over_select"``."""
        ...

    @property
    def deadline_s(self) -> float:
        """The latest simulated duration (s) that is on time under ``"deadline"``; inf otherwise."""
        ...

    def duration(
        self, client_id: int, n_examples: float, compute_seconds: float, bytes_down: int, bytes_up: int
    ) -> float:
        """Simulated seconds of client ``client_id``'s round, from its update's examples, compute time and bytes."""
        ...

    def timing(self, durations: Mapping[int, float]) -> RoundTiming:
        """The kept clients, the stragglers and the round's length, from every client's simulated seconds."""
        ...


class OnTimeClock:
    """The clock of a round that is not simulated: every update on time, lasting its measured compute seconds.

    The same numbers as ``fedsim.sim.clock.RoundClock(profiles={})``: ``wait_all`` on speed-1 devices with
    free links and no latency.
    """

    policy = "wait_all"
    deadline_s = math.inf

    def duration(
        self, client_id: int, n_examples: float, compute_seconds: float, bytes_down: int, bytes_up: int
    ) -> float:
        """The measured ``compute_seconds`` (transfers are free, the device is a speed-1 one)."""
        return float(compute_seconds)

    def timing(self, durations: Mapping[int, float]) -> RoundTiming:
        """Every client kept, none late; the round lasts as long as its slowest client (0 when empty)."""
        kept = frozenset(durations)
        return RoundTiming(kept, frozenset(), max((durations[c] for c in kept), default=0.0))
