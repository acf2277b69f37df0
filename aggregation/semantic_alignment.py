"""FedAlign-MoE Module 2, server side: semantic-aware expert aggregation.

Plain numpy over one (layer, expert) slice at a time; every formula carries its
equation number from the spec (../shared/spec/fedalign_moe.md, "Module 2").
Arrays are indexed [client] or [client, client] in the order the caller stacked
the round's clients.

The same expert index can mean different things on different clients under
data heterogeneity. Two clients' updates of expert e are merged only when the
tokens they routed to e look alike (signature similarity σ, gated against a
threshold set by the round's own spread of similarities) and the updates point
the same way (direction consensus D). The pairwise terms are not summable, so
the caller builds them from one expert slice of every client at a time: D is the
Gram matrix of those slices, normalised.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Gate = Literal["hard", "soft"]


def _cosine_from_gram(gram: np.ndarray) -> np.ndarray:
    """Cosines between the vectors whose Gram matrix is ``gram``; 0 where a vector is zero."""
    g = np.asarray(gram, dtype=np.float64)
    norms = np.sqrt(np.maximum(np.diag(g), 0.0))
    denom = norms[:, None] * norms[None, :]
    cos = np.divide(g, denom, out=np.zeros_like(g), where=denom > 0)
    clipped: np.ndarray = np.clip(cos, -1.0, 1.0)
    return clipped


def signature_similarity(mu: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Semantic similarity σ_ij(e) of the clients' signatures of one expert.

    Parameters
    ----------
    mu : ndarray [N, d]
        μ_i(e): the mean hidden state each client routed to expert e.
    counts : ndarray [N]
        c_i(e): how many tokens each client routed to expert e.

    Returns
    -------
    sigma : ndarray [N, N]
        cos(μ_i(e), μ_j(e)); 0 where a signature is the zero vector.
    counted : ndarray [N, N] of bool
        True for pairs i ≠ j that both routed tokens to e. Only these pairs enter
        the threshold (eq. 9) and can be aligned (eq. 10): a client that never
        used the expert says nothing about what the expert means.
    """
    x = np.asarray(mu, dtype=np.float64)
    used = np.asarray(counts, dtype=np.float64) > 0
    # (7) σ_ij(e) = cos(μ_i(e), μ_j(e)); not aligned where c_i(e) = 0 or c_j(e) = 0
    sigma = _cosine_from_gram(x @ x.T)
    counted = used[:, None] & used[None, :]
    np.fill_diagonal(counted, False)
    return sigma, counted


def slice_gram(deltas: np.ndarray) -> np.ndarray:
    """Gram matrix G_ij = ⟨Δ_i(e), Δ_j(e)⟩ of one expert slice of every client, [N, N] float64.

    ``deltas`` is [N, |θ(e)|]: one expert's flattened update from each client.
    The product runs in the deltas' own precision (float32 from the payload:
    twice the speed of float64 and no float64 copy of the slice; the cosines
    of eq. 8 it feeds move by ~1e-6) and is returned as float64.
    """
    x = np.asarray(deltas)
    gram: np.ndarray = (x @ x.T).astype(np.float64)
    return gram


def direction_consensus(gram: np.ndarray) -> np.ndarray:
    """Direction consensus D_ij(e) from the Gram matrix of one expert slice.

    Returns
    -------
    ndarray [N, N]
        cos(Δ_i(e), Δ_j(e)); 0 where an update of the expert is zero (it has no
        direction to agree with).
    """
    # (8) D_ij(e) = cos(Δ_i(e), Δ_j(e)) = G_ij / sqrt(G_ii·G_jj)
    return _cosine_from_gram(gram)


def threshold(sigma: np.ndarray, counted: np.ndarray, *, beta: float = 1.0) -> float:
    """The round's similarity threshold τ_e for one expert.

    M and Σ are the mean and the population standard deviation (ddof = 0) of
    σ_ij(e) over the counted pairs i < j. Returns nan when no pair is counted:
    then no pair can be aligned.
    """
    upper = np.triu(np.asarray(counted, dtype=bool), k=1)
    values = np.asarray(sigma, dtype=np.float64)[upper]
    if values.size == 0:
        return float("nan")
    # (9) τ_e = M(e) − β·Σ(e)
    return float(values.mean() - beta * values.std())


def gate_weights(
    sigma: np.ndarray,
    counted: np.ndarray,
    consensus: np.ndarray,
    tau: float,
    *,
    gate: Gate = "hard",
    temperature: float = 0.05,
    tol: float = 1e-9,
) -> np.ndarray:
    """Gated pairwise weights γ_ij(e) of one expert.

    Parameters
    ----------
    sigma, counted : ndarray [N, N]
        From ``signature_similarity`` (eq. 7).
    consensus : ndarray [N, N]
        D from ``direction_consensus`` (eq. 8).
    tau : float
        From ``threshold`` (eq. 9).
    gate : {"hard", "soft"}
        "hard": 1[σ ≥ τ − tol]; "soft": sigmoid((σ − τ)/T), the spec's option.
    temperature : float
        T of the soft gate.
    tol : float
        Slack of the hard comparison, so that cosines of 1.0 and 0.9999999999999999
        do not gate pairs out on rounding noise.

    Returns
    -------
    ndarray [N, N], symmetric, entries in [0, 1]
        γ_ii = 1; 0 for pairs that are not counted.
    """
    s = np.asarray(sigma, dtype=np.float64)
    ok = np.asarray(counted, dtype=bool)
    if gate == "hard":
        g = (s >= tau - tol).astype(np.float64)
    elif gate == "soft":
        g = 0.5 * (1.0 + np.tanh((s - tau) / (2.0 * temperature)))  # sigmoid, overflow-free
    else:
        raise ValueError(f"gate must be 'hard' or 'soft', got {gate!r}")
    # (10) γ_ij(e) = 1[σ_ij(e) ≥ τ_e]·max(D_ij(e), 0), γ_ii(e) = 1
    gamma = np.where(ok, g * np.maximum(np.asarray(consensus, dtype=np.float64), 0.0), 0.0)
    np.fill_diagonal(gamma, 1.0)
    return gamma


def excluded_pairs(sigma: np.ndarray, counted: np.ndarray, tau: float, *, tol: float = 1e-9) -> tuple[int, int]:
    """(pairs i < j gated out by σ < τ − tol, counted pairs i < j): a diagnostic for the round report."""
    upper = np.triu(np.asarray(counted, dtype=bool), k=1)
    values = np.asarray(sigma, dtype=np.float64)[upper]
    return int((values < tau - tol).sum()) if values.size else 0, int(values.size)


def client_weights(gamma: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Client weights π_i(e) of one expert.

    Returns
    -------
    ndarray [N]
        n_i·Σ_{j≠i} γ_ij(e), normalised to sum 1; a client with no aligned partner
        gets 0. All zeros when no pair is aligned: then the expert keeps its value
        (eq. 12).
    """
    g = np.asarray(gamma, dtype=np.float64)
    degree = g.sum(axis=1) - np.diag(g)
    # (11) π_i(e) ∝ n_i·Σ_{j≠i} γ_ij(e)
    raw = np.asarray(n, dtype=np.float64) * degree
    total = raw.sum()
    return raw / total if total > 0 else np.zeros_like(raw)


def merge_expert(base: np.ndarray, deltas: np.ndarray, pi: np.ndarray) -> np.ndarray:
    """θ_g^t(e) from one expert slice: [|θ(e)|] float64.

    ``base`` is θ_g^{t−1}(e), ``deltas`` [N, |θ(e)|], ``pi`` [N] from ``client_weights``.
    The weighted sum runs in the deltas' precision and is added to ``base`` in float64.
    """
    b = np.asarray(base, dtype=np.float64)
    p = np.asarray(pi, dtype=np.float64)
    if not p.sum() > 0:
        return b.copy()  # (12) every π_i(e) = 0: expert e keeps θ_g^{t−1}(e)
    # (12) θ_g^t(e) = θ_g^{t−1}(e) + Σ_i π_i(e)·Δ_i(e)
    d = np.asarray(deltas)
    merged: np.ndarray = b + p.astype(d.dtype) @ d
    return merged


def personalized_view(gamma: np.ndarray, thetas: np.ndarray) -> np.ndarray:
    """Each client's own view of one expert under ``expert_agg = "personalized"``.

    Parameters
    ----------
    gamma : ndarray [N, N]
        From ``gate_weights`` (eq. 10); γ_ii = 1 keeps every denominator ≥ 1.
    thetas : ndarray [N, |θ(e)|]
        θ_j(e) = θ_g^{t−1}(e) + Δ_j(e) of every client.

    Returns
    -------
    ndarray [N, |θ(e)|] float64
        Row i is Σ_j γ_ij(e)·θ_j(e) / Σ_j γ_ij(e).
    """
    g = np.asarray(gamma, dtype=np.float64)
    # (12, personalized) θ_i(e) ← Σ_j γ_ij(e)·θ_j(e) / Σ_j γ_ij(e)
    views: np.ndarray = (g @ np.asarray(thetas, dtype=np.float64)) / g.sum(axis=1, keepdims=True)
    return views
