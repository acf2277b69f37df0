"""Per-client expert state for personalised strategies (PFL-MoE-style, FedAlign-MoE ``personalized``).

A personalised client keeps its own values of the routed experts between the
rounds it is sampled in. In a deployment they never leave the device; the
simulator keeps them with the strategy, keyed by client id, and sends them
down as the client's ``ClientInstructions.start`` so that any worker can train the
client. Experts come last in the payload's canonical order, so a client's
experts are one contiguous block, ``layout.expert_block``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from aggregation.client_terms import PayloadStart
from aggregation.payload import PAYLOAD_DTYPE, PayloadLayout


class PersonalExperts:
    """Client id → that client's expert block (float32), for clients seen so far."""

    def __init__(self, layout: PayloadLayout) -> None:
        self.start, self.stop = layout.expert_block
        self._values: dict[int, np.ndarray] = {}

    @property
    def size(self) -> int:
        """Values in one client's expert block, ``stop - start``."""
        return self.stop - self.start

    def __contains__(self, client_id: int) -> bool:
        return client_id in self._values

    def __len__(self) -> int:
        return len(self._values)

    @property
    def nbytes(self) -> int:
        """Bytes held by all stored expert blocks together."""
        return sum(v.nbytes for v in self._values.values())

    def get(self, client_id: int) -> np.ndarray | None:
        """A read-only view of the client's experts; None for a client never stored."""
        values = self._values.get(client_id)
        if values is None:
            return None
        view = values.view()
        view.flags.writeable = False
        return view

    def start_for(self, client_id: int) -> PayloadStart | None:
        """The client's own experts as its training start (a copy); None for a client never stored."""
        own = self._values.get(client_id)
        return None if own is None else PayloadStart(self.start, own.copy())

    def start_of(self, client_id: int, global_payload: np.ndarray) -> np.ndarray:
        """The expert block client ``client_id`` trained from: its own, else the global one."""
        own = self.get(client_id)
        return own if own is not None else global_payload[self.start : self.stop]

    def put(self, client_id: int, values: np.ndarray) -> None:
        """Store a float32 copy of the client's expert block; raise ValueError unless it has shape (size,)."""
        if values.shape != (self.size,):
            raise ValueError(f"client {client_id}: personal experts have shape {values.shape}, expected ({self.size},)")
        self._values[client_id] = np.array(values, dtype=PAYLOAD_DTYPE)

    def state_dict(self) -> dict[int, np.ndarray]:
        """A copy of every stored expert block, keyed by client id in ascending order."""
        return {int(cid): v.copy() for cid, v in sorted(self._values.items())}

    def load_state_dict(self, state: dict[Any, Any]) -> None:
        """Restore ``state_dict()``'s output; client ids may come back as strings (JSON)."""
        values = {}
        for cid, v in state.items():
            a = np.asarray(v, dtype=PAYLOAD_DTYPE)
            if a.shape != (self.size,):
                raise ValueError(f"personal experts of client {cid} have shape {a.shape}, expected ({self.size},)")
            values[int(cid)] = a.copy()
        self._values = values
