"""Asynchronous buffered aggregation (FedBuff, Nguyen et al. 2022) on the simulated clock: the schedule's math.

Clients train concurrently, each from the global model version that was
current when it started; the server merges the first K updates to arrive on
the simulated clock, then publishes the next version. An update that started
from version v and is merged into version t has staleness τ = t − v and
counts with its weight discounted by s(τ) = (1 + τ)^(−a) (FedBuff's
polynomial discount; a = 0.5 by default), its routing statistics discounted
the same way. The discount is worked out here, on the driver, and handed to the
aggregator as one factor per update (``discounts``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


def staleness_discount(staleness: int, exponent: float) -> float:
    """s(τ) = (1 + τ)^(−a); 1 for a fresh update."""
    if staleness < 0:
        raise ValueError(f"staleness {staleness} < 0")
    return float((1.0 + staleness) ** (-exponent))


def discounts(staleness: list[int], exponent: float) -> list[tuple[int, float]]:
    """(τ, s(τ)) per update, in order: the staleness and weight factor the aggregator's fold takes for each."""
    return [(tau, staleness_discount(tau, exponent)) for tau in staleness]


@dataclass(frozen=True, slots=True)
class Flight(Generic[T]):
    """A client training in the background: who, since when on the simulated clock, from which version."""

    client: int
    start_s: float
    version: int
    handle: T  # what the caller tracks it by (an object reference)


def next_buffer(flights: list[Flight[T]], durations: list[float], k: int) -> list[tuple[Flight[T], float]]:
    """The first ``k`` arrivals (flight, arrival time), in order of simulated arrival (ties by client id)."""
    if len(flights) != len(durations):
        raise ValueError(f"{len(flights)} flights but {len(durations)} durations")
    order = sorted(range(len(flights)), key=lambda i: (flights[i].start_s + durations[i], flights[i].client))
    return [(flights[i], flights[i].start_s + durations[i]) for i in order[:k]]
