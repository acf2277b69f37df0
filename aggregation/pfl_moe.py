"""PFL-MoE-style personalised experts: experts stay with each client, the rest is FedAvg'd.

A personalisation baseline for MoE fine-tuning in the spirit of PFL-MoE (Guo et
al., 2021, arXiv 2012.15589): each client keeps its own routed experts across
the rounds it is sampled in, while the shared parts (attention LoRA) and the
routers are averaged by n_i as in FedAvg. A client sampled for the first time
starts from the global experts. The global experts, which newcomers start from
and the global test set evaluates, are ``global_experts = "fedavg"``: the
n-weighted mean of the cohort's trained experts θ_i(e) (which makes round 1
exactly FedAvg), or ``"frozen"``: never updated, so experts are purely local.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import Field

from aggregation.messages import ClientInstructions
from aggregation.options import Options
from aggregation.payload import PAYLOAD_DTYPE, PayloadLayout
from aggregation.personal import PersonalExperts
from aggregation.strategy import RoundResult, Strategy, UpdateReader
from aggregation.weighting import accumulate

GlobalExperts = Literal["fedavg", "frozen"]


class PFLMoEOptions(Options):
    """What the global experts are."""

    global_experts: GlobalExperts = Field(
        "fedavg", description="global experts (newcomers, global eval): n-weighted mean of trained ones, or frozen"
    )


class PFLMoE(Strategy):
    """Local experts per client id; shared entries and routers averaged by n_i."""

    name = "pfl_moe"
    options_type = PFLMoEOptions
    options: PFLMoEOptions

    def __init__(self, layout: PayloadLayout, options: PFLMoEOptions | None = None) -> None:
        super().__init__(layout, options)
        self.personal = PersonalExperts(layout)

    def configure(self, client_id: int, round_idx: int, *, seed: int) -> ClientInstructions:
        """The client starts from its own experts when it has been sampled before, from the global ones otherwise."""
        return ClientInstructions(client_id=client_id, round_idx=round_idx, seed=seed,
                                  start=self.personal.start_for(client_id))

    def begin(self, global_payload: np.ndarray, *, round_idx: int) -> None:
        """Start the round with a zero float64 sum over the payload and no client seen."""
        super().begin(global_payload, round_idx=round_idx)
        self._sum = np.zeros(self.layout.total, dtype=np.float64)  # Σ n_i Δ_i before the expert block, Σ n_i θ_i in it
        self._n: dict[int, float] = {}
        self._trained: dict[int, np.ndarray] = {}

    def add(self, reader: UpdateReader) -> None:
        """Add n_i·Δ_i before the expert block and n_i·θ_i(e) in it; hold θ_i(e) to store at ``finish``."""
        u = self._checked(reader)
        if u.client_id in self._n:
            raise ValueError(f"client {u.client_id}: update added twice in one round")
        a, b = self.personal.start, self.personal.stop
        n = float(u.n_examples)
        accumulate(self._sum[:a], reader.read(0, a), n)
        # _checked raised unless begin() set _global, so it is an array here
        start = self.personal.start_of(u.client_id, self._global)  # type: ignore[arg-type]
        theta = start.astype(np.float64) + reader.read(a, b)
        accumulate(self._sum[a:b], theta, n)
        self._trained[u.client_id] = theta.astype(PAYLOAD_DTYPE)  # stored at finish: a failed round changes nothing
        self._n[u.client_id] = n

    def finish(self) -> RoundResult:
        """FedAvg before the expert block, global experts per ``global_experts``; store each client's experts."""
        if self._global is None:
            raise RuntimeError("finish() called before begin(); call begin(global_payload, round_idx=...) first")
        total = sum(self._n.values())
        if not total:
            return RoundResult(self._global.copy(), {"n_aggregated": 0.0}, {})
        a, b = self.personal.start, self.personal.stop
        new = self._global.astype(np.float64)
        new[:a] += self._sum[:a] / total
        if self.options.global_experts == "fedavg":
            new[a:b] = self._sum[a:b] / total
        for cid, theta in self._trained.items():
            self.personal.put(cid, theta)
        self._trained = {}
        report = {
            "n_aggregated": float(len(self._n)),
            "personal_clients": float(len(self.personal)),
            "personal_state_mib": self.personal.nbytes / 2**20,
        }
        return RoundResult(new.astype(PAYLOAD_DTYPE), report, {cid: n / total for cid, n in self._n.items()})

    def state_dict(self) -> dict[str, Any]:
        """Every client's personal experts (``PersonalExperts.state_dict``) under "personal"."""
        return {"personal": self.personal.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s output; raise ValueError unless its only key is "personal"."""
        if set(state) != {"personal"}:
            raise ValueError(f"PFLMoE state must have the key 'personal', got {sorted(state)}")
        self.personal.load_state_dict(state["personal"])
