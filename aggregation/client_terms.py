"""The client side of a strategy: loss terms and a starting point, sent with the instructions.

A strategy that needs its clients to train differently (FedProx's proximal
term, FedAlign-MoE's routing regulariser, PFL-MoE's personal experts) says so
in ``ClientInstructions`` with the picklable records below. The engine adds
every term to the task loss and writes the start into the payload without
knowing which strategy sent them, so a user's own strategy gets its client
side the same way as the built-ins. The records hold numpy arrays (cheap to
pickle, read-only once sent); ``bind`` turns one into a torch function on the
worker's device once per client.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from aggregation.routing_regulariser import RegForm, routing_regulariser


def _readonly(a: np.ndarray) -> np.ndarray:
    if a.flags.writeable:
        a.flags.writeable = False
    return a


@dataclass(frozen=True)
class TermInputs:
    """What a client-side term may read at one training step.

    Attributes
    ----------
    params : sequence of Tensor
        The trainable tensors (this process's share of them), with their autograd graph.
    start : sequence of Tensor
        Their values when the client began training (detached); empty unless a term ``reads_start``.
    param_weights : sequence of float
        How many times each tensor counts in a sum over the payload: 1, or the expert-parallel group's
        size for an expert shard, whose squared norms the group's processes then sum to the payload's.
    probs : sequence of Tensor [tokens, E]
        Per MoE layer, this step's router probabilities with their graph; empty unless a term ``reads_routing``.
    masks : sequence of (Tensor [tokens] of bool, or None)
        Per MoE layer, the real (non-padding) tokens of ``probs``; None counts every token.
    top_k : int
        The model's top-k routing.
    """

    params: Sequence[torch.Tensor]
    start: Sequence[torch.Tensor]
    param_weights: Sequence[float]
    probs: Sequence[torch.Tensor]
    masks: Sequence[torch.Tensor | None]
    top_k: int


BoundTerm = Callable[[TermInputs], torch.Tensor]


def _as_tensor(value: torch.Tensor | int) -> torch.Tensor:
    """``sum`` over tensors, typed: it starts from the int 0, so mypy sees ``Tensor | int``."""
    return value if isinstance(value, torch.Tensor) else torch.tensor(float(value))


class ClientTerm(ABC):
    """A loss term a strategy asks a client to add to its task loss at every step.

    Subclasses are frozen dataclasses of numbers and numpy arrays, importable
    by the workers (they are pickled into the instructions). ``reads_routing``
    and ``reads_start`` tell the engine what to record for them; recording
    router probabilities with their graph costs memory, so it happens only
    when some term asks.
    """

    reads_routing: ClassVar[bool] = False
    reads_start: ClassVar[bool] = False

    @abstractmethod
    def bind(self, device: torch.device) -> BoundTerm:
        """The term as a function of one step's inputs, its constants moved to ``device`` once."""


@dataclass(frozen=True)
class ProximalTerm(ClientTerm):
    """FedProx's (μ/2)·‖θ − θ_start‖² over the trainable payload (Li et al., 2020)."""

    mu: float
    reads_start: ClassVar[bool] = True

    def bind(self, device: torch.device) -> BoundTerm:
        """(μ/2)·Σ w·‖p − p_start‖² over the trainable tensors."""

        def term(inputs: TermInputs) -> torch.Tensor:
            prox = sum(
                w * ((p - a) ** 2).sum()
                for p, a, w in zip(inputs.params, inputs.start, inputs.param_weights, strict=True)
            )
            return 0.5 * self.mu * _as_tensor(prox)

        return term


@dataclass(frozen=True)
class RoutingRegulariserTerm(ClientTerm):
    """FedAlign-MoE's λ·L_reg pulling the client's routing toward p_g (spec, Module 1 regularisation).

    Attributes
    ----------
    weight : float
        λ.
    p_g : ndarray [L, E]
        The global routing distribution of the previous round.
    alpha : ndarray [L, E]
        The client's adaptive expert weights α_i(e).
    form : {"token", "batch"}
        ``routing_regulariser``'s form.
    """

    weight: float
    p_g: np.ndarray
    alpha: np.ndarray
    form: RegForm = "token"
    reads_routing: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.p_g.shape != self.alpha.shape or self.p_g.ndim != 2:
            raise ValueError(f"p_g {self.p_g.shape} and alpha {self.alpha.shape} must both be [L, E]")
        _readonly(self.p_g)
        _readonly(self.alpha)

    def bind(self, device: torch.device) -> BoundTerm:
        """λ·L_reg of one step's recorded probabilities."""
        p_g = torch.tensor(self.p_g, dtype=torch.float32, device=device)  # copies the read-only array
        alpha = torch.tensor(self.alpha, dtype=torch.float32, device=device)

        def term(inputs: TermInputs) -> torch.Tensor:
            reg = routing_regulariser(list(inputs.probs), inputs.masks, p_g, alpha, top_k=inputs.top_k, form=self.form)
            return self.weight * reg

        return term


@dataclass(frozen=True)
class PayloadStart:
    """Values the client starts from instead of the global payload's, at ``[offset, offset + len(values))``.

    PFL-MoE and personalised FedAlign-MoE send a client its own experts this
    way. The delta the client returns is measured from this start, and the
    payload classes it covers wholly are not counted as sent down (the client
    holds them already).
    """

    offset: int
    values: np.ndarray

    def __post_init__(self) -> None:
        if self.offset < 0 or self.values.ndim != 1:
            raise ValueError(f"a payload start needs offset >= 0 and 1-D values, got {self.offset}, "
                             f"{self.values.shape}")
        _readonly(self.values)

    @property
    def stop(self) -> int:
        """One past the last payload index the start covers."""
        return self.offset + len(self.values)

    def covers(self, span: tuple[int, int]) -> bool:
        """Whether the payload range ``[start, stop)`` lies wholly inside this start."""
        return self.offset <= span[0] and span[1] <= self.stop
