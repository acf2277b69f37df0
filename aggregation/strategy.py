"""The streaming Strategy protocol every federated algorithm implements.

A round is ``configure`` per sampled client, then ``begin`` with the global
payload, ``add`` once per arriving update, and ``finish``. Updates are reached
through an ``UpdateReader`` so the same strategy code runs on in-memory arrays
in unit tests and on zero-copy object-store buffers in the aggregator actor.
A strategy never samples clients, imports Ray, reads a clock or writes files.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from aggregation.errors import LayoutMismatch
from aggregation.messages import ClientInstructions, ClientUpdate
from aggregation.options import Options
from aggregation.payload import PayloadLayout


class UpdateReader(Protocol):
    """Access to one client update: cheap fields at once, tensor slices on demand."""

    @property
    def update(self) -> ClientUpdate:
        """The update's small fields, read at once; its delta is read in slices through ``read``."""
        ...

    def read(self, start: int, stop: int) -> np.ndarray:
        """Values ``[start, stop)`` of the update's flat delta (a view where possible)."""
        ...


@dataclass(frozen=True, slots=True)
class ArrayReader:
    """Reader over an update whose delta is a numpy array (in memory or object-store backed)."""

    update: ClientUpdate

    def read(self, start: int, stop: int) -> np.ndarray:
        """Values ``[start, stop)`` of ``update.delta``, a view of the array (never a copy)."""
        return self.update.delta[start:stop]


@dataclass(frozen=True)
class RoundResult:
    """What ``finish`` returns: the new global payload and the round's report.

    ``report`` holds scalar columns for the round table; ``client_weights``
    holds, per client id, the weight it received (strategy-specific meaning).
    """

    payload: np.ndarray
    report: dict[str, float] = field(default_factory=dict)
    client_weights: dict[int, float] = field(default_factory=dict)


class Strategy(ABC):
    """Base class: one level of inheritance, shared math lives in functions.

    ``options_type`` is the strategy's one declaration of its options: the run
    config validates the user's values with it (a built-in's under its own
    section of ``strategy``, a user strategy's under ``strategy.options``) and
    the aggregator passes the validated instance to ``__init__``.
    """

    name: ClassVar[str]
    options_type: ClassVar[type[Options]] = Options
    # True: ``add`` keeps its readers until ``finish``. The round then hands it readers over the aggregator's own
    # copy of each update (``aggregation.cohort_spool``), not over the object store, whose viewed objects stay pinned.
    keeps_readers: ClassVar[bool] = False

    def __init__(self, layout: PayloadLayout, options: Options | None = None) -> None:
        self.options = options if options is not None else self.options_type()
        if not isinstance(self.options, self.options_type):
            raise TypeError(f"{type(self).__name__} takes {self.options_type.__name__}, "
                            f"got {type(self.options).__name__}")
        self.layout = layout
        self._global: np.ndarray | None = None
        self._round = 0

    @classmethod
    def reads_routing_stats(cls, options: Options) -> bool:
        """Whether ``add`` reads the clients' routing statistics (the run refuses ``train.routing_stats=off``)."""
        return False

    def configure(self, client_id: int, round_idx: int, *, seed: int) -> ClientInstructions:
        """Instructions for one sampled client; the default asks for plain local training."""
        return ClientInstructions(client_id=client_id, round_idx=round_idx, seed=seed)

    def begin(self, global_payload: np.ndarray, *, round_idx: int) -> None:
        """Start aggregating round ``round_idx`` from ``global_payload`` (not modified)."""
        self.layout.check(global_payload, what=f"round {round_idx} global payload")
        self._global = global_payload
        self._round = round_idx

    def _checked(self, reader: UpdateReader) -> ClientUpdate:
        """Validate an arriving update at the boundary; return it."""
        if self._global is None:
            raise RuntimeError("Strategy.add called before begin(); call begin(global_payload, round_idx=...) first")
        u = reader.update
        self.layout.check(u.delta, what=f"client {u.client_id} round {u.round_idx} delta")
        if u.round_idx != self._round:
            raise LayoutMismatch(
                f"client {u.client_id}: update is for round {u.round_idx}, aggregating round {self._round}"
            )
        if u.n_examples <= 0:
            raise LayoutMismatch(f"client {u.client_id} round {u.round_idx}: n_examples={u.n_examples}, must be > 0")
        return u

    @abstractmethod
    def add(self, reader: UpdateReader) -> None:
        """Take one client's update into the round."""

    @abstractmethod
    def finish(self) -> RoundResult:
        """Close the round and return the new global payload."""

    def state_dict(self) -> dict[str, Any]:
        """State carried across rounds (checkpointed); stateless strategies return {}."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output; a stateless strategy accepts only {} and raises ValueError otherwise."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got keys {sorted(state)}")
