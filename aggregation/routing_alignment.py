"""FedAlign-MoE Module 1, server side: consistency-based gating-distribution alignment.

Plain numpy over one MoE layer at a time; every formula carries its equation
number from the spec (../shared/spec/fedalign_moe.md, "Module 1"). Arrays are
indexed [client, expert] in the order the caller stacked the round's clients;
no function depends on that order beyond returning rows in it.

Clients whose routing agrees with the global routing distribution and whose
routing decisions are confident get more say over each expert's router row and
over the next global routing distribution; the same scores give each client the
expert weights α it uses in its routing regulariser next time it is sampled.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

ScoreMode = Literal["om", "o", "m", "uniform"]
SCORE_MODES: tuple[ScoreMode, ...] = ("om", "o", "m", "uniform")


def uniform_routing(num_layers: int, num_experts: int) -> np.ndarray:
    """p_g^0: the uniform routing distribution of every layer, [L, E] float64.

    The spec starts from it because no client has reported routing yet.
    """
    return np.full((num_layers, num_experts), 1.0 / num_experts, dtype=np.float64)


def overlap(p_bar: np.ndarray, p_g: np.ndarray) -> np.ndarray:
    """Overlap of each client's routing with the global routing distribution.

    Parameters
    ----------
    p_bar : ndarray [N, E]
        Each client's empirical routing distribution p̄_i(e).
    p_g : ndarray [E]
        The previous round's global routing distribution p_g^{t−1}.

    Returns
    -------
    ndarray [N, E]
        o_i(e), each row summing to 1; a row of zeros for a client whose routing
        has no mass where p_g has (e.g. a client that routed no token).
    """
    joint = np.asarray(p_bar, dtype=np.float64) * np.asarray(p_g, dtype=np.float64)[None, :]
    total = joint.sum(axis=1, keepdims=True)
    # (1) o_i(e) = p̄_i(e)·p_g(e) / Σ_e' p̄_i(e')·p_g(e')
    o: np.ndarray = np.divide(joint, total, out=np.zeros_like(joint), where=total > 0)
    return o


def consistency_scores(o: np.ndarray, margin: np.ndarray, mode: ScoreMode = "om") -> np.ndarray:
    """Consistency score s_i(e) of each client for each expert.

    Parameters
    ----------
    o : ndarray [N, E]
        Overlap from ``overlap`` (eq. 1).
    margin : ndarray [N, E]
        Routing-decision margin m_i(e), 0 for an expert the client never routed to.
    mode : {"om", "o", "m", "uniform"}
        "om" is the method; the others are the spec's ablations (overlap only,
        margin only, all ones).

    Returns
    -------
    ndarray [N, E], non-negative
        Margins are ≥ 0 by definition; negatives can only be float noise from the
        client's sums and are clipped so that the weights of eq. 3 stay ≥ 0.
    """
    o = np.asarray(o, dtype=np.float64)
    m = np.maximum(np.asarray(margin, dtype=np.float64), 0.0)
    if o.shape != m.shape:
        raise ValueError(f"overlap has shape {o.shape}, margin has shape {m.shape}; they must match")
    if mode == "om":
        s = o * m  # (2) s_i(e) = o_i(e)·m_i(e)
    elif mode == "o":
        s = o.copy()  # (2, ablation) s_i(e) = o_i(e)
    elif mode == "m":
        s = m  # (2, ablation) s_i(e) = m_i(e)
    elif mode == "uniform":
        s = np.ones_like(o)  # (2, ablation) s_i(e) = 1
    else:
        raise ValueError(f"score mode must be one of {SCORE_MODES}, got {mode!r}")
    clipped: np.ndarray = np.maximum(s, 0.0)
    return clipped


def example_weights(n: np.ndarray, num_experts: int) -> np.ndarray:
    """n_i / Σ_j n_j repeated for every expert, [N, E]: FedAvg's weights in ω's shape."""
    n = np.asarray(n, dtype=np.float64)
    if n.ndim != 1 or n.size == 0 or not np.all(n > 0):
        raise ValueError(f"n must be a non-empty vector of positive example counts, got {n!r}")
    return np.repeat((n / n.sum())[:, None], num_experts, axis=1)


def consistency_weights(s: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Per-expert client weights ω_i(e) from the consistency scores.

    Parameters
    ----------
    s : ndarray [N, E]
        Non-negative scores (eq. 2).
    n : ndarray [N]
        Training examples per client, all > 0.

    Returns
    -------
    ndarray [N, E]
        Each column sums to 1. A column whose scores are all zero (no client
        routed confidently to that expert) falls back to n_i / Σ_j n_j, so every
        expert's router row still moves with the cohort.
    """
    s = np.asarray(s, dtype=np.float64)
    fallback = example_weights(n, s.shape[1])
    total = s.sum(axis=0, keepdims=True)
    # (3) ω_i(e) = s_i(e) / Σ_j s_j(e); n_i / Σ_j n_j where Σ_j s_j(e) = 0
    omega = np.divide(s, total, out=np.zeros_like(s), where=total > 0)
    return np.where(total > 0, omega, fallback)


def global_routing(omega: np.ndarray, p_bar: np.ndarray, *, previous: np.ndarray) -> np.ndarray:
    """The new global routing distribution p_g^t of one layer, [E].

    ``previous`` (p_g^{t−1}) is returned unchanged when the weighted mass is zero
    everywhere (every client routed no token), since there is nothing to
    renormalise; the spec does not cover that case.
    """
    # (4) p_g^t(e) = Σ_i ω_i(e)·p̄_i(e), renormalised over e
    p = (np.asarray(omega, dtype=np.float64) * np.asarray(p_bar, dtype=np.float64)).sum(axis=0)
    total = p.sum()
    if not total > 0:
        return np.array(previous, dtype=np.float64, copy=True)
    p_g: np.ndarray = p / total
    return p_g


def merge_router_rows(base: np.ndarray, deltas: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Router rows (and bias elements) merged expert by expert.

    Parameters
    ----------
    base : ndarray [E, R]
        The global router rows W_g^{t−1}[e, :] (R values per expert row: the
        weight row, plus the bias element when the router has one).
    deltas : ndarray [N, E, R]
        Each client's change of those rows, Δ_i = W_{g,i}^t − W_g^{t−1}.
    weights : ndarray [N, E]
        ω_i(e) (eq. 3), or n-weights for the "fedavg" option; columns sum to 1.

    Returns
    -------
    ndarray [E, R] float64
        W_g^t[e, :] = Σ_i ω_i(e)·W_{g,i}^t[e, :] = W_g^{t−1}[e, :] + Σ_i ω_i(e)·Δ_i[e, :]
        (the two agree because every column of ω sums to 1).
    """
    w = np.asarray(weights, dtype=np.float64)
    # (5) W_g^t[e,:] = Σ_i ω_i(e)·W_{g,i}^t[e,:]
    merged: np.ndarray = np.asarray(base, dtype=np.float64) + np.einsum(
        "ne,ner->er", w, np.asarray(deltas, dtype=np.float64)
    )
    return merged


def adaptive_alpha(s: np.ndarray) -> np.ndarray:
    """Adaptive expert weights α_i(e) ∈ [0, 1] for each client's routing regulariser.

    Returns
    -------
    ndarray [N, E]
        s_i(e) / max_e' s_i(e'). A client whose scores are all zero carries no
        information about which experts it routes to consistently; it gets α = 1,
        the value of a client never seen.
    """
    s = np.asarray(s, dtype=np.float64)
    peak = s.max(axis=1, keepdims=True)
    # (6) α_i(e) = s_i(e) / max_e' s_i(e')
    alpha = np.divide(s, peak, out=np.ones_like(s), where=peak > 0)
    clipped: np.ndarray = np.clip(alpha, 0.0, 1.0)
    return clipped


def weight_entropy(weights: np.ndarray) -> float:
    """Mean over experts of the entropy (nats) of the client weights of each expert.

    A diagnostic: log N when every client weighs the same, 0 when one client
    takes an expert alone.
    """
    w = np.asarray(weights, dtype=np.float64)
    logs = np.log(w, out=np.zeros_like(w), where=w > 0)
    return float(-(w * logs).sum(axis=0).mean()) if w.size else 0.0
