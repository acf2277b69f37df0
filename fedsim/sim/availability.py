"""Which clients are online when a round samples, and how many to sample when over-selecting.

Two models of availability: a seeded on/off process (each client up with
``system.availability`` at each round, independently) and a FedScale client
behaviour trace (``system.availability_trace``: each client online in fixed
intervals of a repeating cycle, on the simulated clock; read by
``fedsim.sim.fedscale``, built from the config by
``fedsim.sim.profiles.build_availability``). Over-selection samples
⌈k·(1 + r)⌉ of the online clients so that the first k to finish can be kept
(``fedsim.sim.clock``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from aggregation.errors import RunFailed

if TYPE_CHECKING:
    from fedsim.config import RunConfig

log = logging.getLogger("fedsim")


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


def online_at_round(
    cfg: RunConfig, trace: AvailabilityTrace | None, r: int, sim_time: float
) -> tuple[list[int], float]:
    """Clients online when round ``r`` starts, and that start on the simulated clock.

    With a trace, a round that would find nobody online waits until somebody comes online.
    """
    if trace is None:
        online_now = available(cfg.data.num_clients, round_idx=r, seed=cfg.seed, probability=cfg.system.availability)
        return online_now, sim_time
    online = trace.online(sim_time)
    if not online:
        later = trace.next_online(sim_time)
        if not math.isfinite(later):
            raise RunFailed(f"round {r}: no client of system.availability_trace is ever online again")
        log.info(
            "round %d: no client online at %.1f s on the simulated clock; waiting until %.1f s", r, sim_time, later
        )
        sim_time, online = later, trace.online(later)
    return online, sim_time
