"""FedAvgM with a load-balancing term on the clients: a strategy written outside fedsim.

Server (Hsu et al., 2019, arXiv 1909.06335): the n-weighted mean delta Δ̄ feeds
a momentum buffer, v ← β·v + Δ̄, and the model moves by θ ← θ + η·v. The buffer
is state across rounds, so it is saved in checkpoints and restored on resume.

Clients: with ``balance > 0`` each client adds the Switch Transformer's
load-balancing loss (Fedus et al., 2021) to its task loss, E·Σ_e f_e·P_e per MoE
layer (f_e: share of the token's top-k slots routed to expert e; P_e: mean
router probability of e), which pushes the router toward using every expert.

Run it on the demo from the repository's root::

    PYTHONPATH=examples/custom_strategy python -m fedsim run --config configs/demo.yaml \
        strategy.name=fedavgm:FedAvgM strategy.options.momentum=0.9
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field

from aggregation import (
    ClientInstructions,
    ClientTerm,
    Options,
    PayloadLayout,
    RoundResult,
    Strategy,
    TermInputs,
    UpdateReader,
)
from aggregation.client_terms import BoundTerm


class FedAvgMOptions(Options):
    """Validated from ``strategy.options`` when the config loads."""

    momentum: float = Field(0.9, ge=0, lt=1, description="β of the server's momentum buffer")
    server_lr: float = Field(1.0, gt=0, description="η, the server's step size")
    balance: float = Field(0.0, ge=0, description="weight of the clients' load-balancing term; 0: none")


@dataclass(frozen=True)
class LoadBalanceTerm(ClientTerm):
    """weight · mean over MoE layers of E·Σ_e f_e·P_e over the step's real tokens."""

    weight: float
    reads_routing: ClassVar[bool] = True  # the engine records router probabilities for it

    def bind(self, device: torch.device) -> BoundTerm:
        """The term as a function of one training step's routing probabilities."""

        def term(inputs: TermInputs) -> torch.Tensor:
            losses = []
            for probs, mask in zip(inputs.probs, inputs.masks, strict=True):
                p = probs if mask is None else probs[mask]  # [tokens, E]
                chosen = torch.zeros_like(p).scatter_(1, p.detach().topk(inputs.top_k, dim=-1).indices, 1.0)
                f = chosen.mean(dim=0) / inputs.top_k  # no gradient: a count
                losses.append(p.shape[-1] * (f * p.mean(dim=0)).sum())
            return self.weight * torch.stack(losses).mean()

        return term


class FedAvgM(Strategy):
    """FedAvg with server momentum; optionally asks clients to balance their routing."""

    name = "fedavgm"
    options_type = FedAvgMOptions
    options: FedAvgMOptions

    def __init__(self, layout: PayloadLayout, options: FedAvgMOptions | None = None) -> None:
        super().__init__(layout, options)
        self._velocity = np.zeros(layout.total, dtype=np.float64)

    def configure(self, client_id: int, round_idx: int, *, seed: int) -> ClientInstructions:
        """Plain local training, plus the load-balancing term when ``balance > 0``."""
        terms = (LoadBalanceTerm(self.options.balance),) if self.options.balance > 0 else ()
        return ClientInstructions(client_id=client_id, round_idx=round_idx, seed=seed, terms=terms)

    def begin(self, global_payload: np.ndarray, *, round_idx: int) -> None:
        """Start the round with a zero float64 sum Σ n_i·Δ_i."""
        super().begin(global_payload, round_idx=round_idx)
        self._sum = np.zeros(self.layout.total, dtype=np.float64)
        self._n: dict[int, float] = {}

    def add(self, reader: UpdateReader) -> None:
        """Fold one checked update into the sum; its delta is read once, through the reader."""
        update = self._checked(reader)  # the base class's layout, round and n_examples checks
        if update.client_id in self._n:
            raise ValueError(f"client {update.client_id}: update added twice in one round")
        self._sum += update.n_examples * reader.read(0, self.layout.total)
        self._n[update.client_id] = float(update.n_examples)

    def finish(self) -> RoundResult:
        """The momentum step v ← β·v + Δ̄, θ ← θ + η·v; θ unchanged (and v kept) when nothing arrived."""
        if self._global is None:
            raise RuntimeError("finish() called before begin()")
        total = sum(self._n.values())
        if not total:
            return RoundResult(self._global.copy(), {"n_aggregated": 0.0}, {})
        self._velocity = self.options.momentum * self._velocity + self._sum / total
        new = self._global + self.options.server_lr * self._velocity
        report = {"n_aggregated": float(len(self._n)), "velocity_norm": float(np.linalg.norm(self._velocity))}
        return RoundResult(new.astype(self._global.dtype), report, {c: n / total for c, n in self._n.items()})

    def state_dict(self) -> dict[str, Any]:
        """The momentum buffer, for checkpoints."""
        return {"velocity": self._velocity.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the momentum buffer saved by ``state_dict``."""
        velocity = np.asarray(state["velocity"], dtype=np.float64)
        if velocity.shape != (self.layout.total,):
            raise ValueError(f"velocity has shape {velocity.shape}, the layout needs ({self.layout.total},)")
        self._velocity = velocity.copy()
