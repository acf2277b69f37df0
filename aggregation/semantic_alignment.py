"""FedAlign-MoE Module 2, server side: semantic-aware expert aggregation.

Plain numpy over one (layer, expert) slice at a time; every formula carries its
equation number from the spec (../shared/spec/fedalign_moe.md, "Module 2").
Arrays are indexed [client] or [client, client] in the order the caller stacked
the round's clients. The terms that do not read the updates (σ, τ, the σ gate,
the excluded-pair count) and π also take leading batch axes, [..., N, N], so
the caller computes them for many experts of a layer in one call rather than
a dozen small-matrix calls per expert.

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

# float64 bytes of one array of a batch's σ terms (its signatures [k, N, d], each of its few [k, N, N] matrices)
SIGMA_BATCH_BYTES = 4 * 2**20


def sigma_batch(num_clients: int, hidden: int) -> int:
    """How many experts' σ terms (eqs. 7, 9 and 10's gate) to compute together, as [k, N, ...] arrays.

    As many as keep each array under ``SIGMA_BATCH_BYTES``: a layer's experts at
    once at the demo's shape (N = 100, d = 128: up to 40), two at a time for
    N = 100 signatures of OLMoE's d = 2048, one at a time from N ≈ 500. One
    batch replaces a dozen small-matrix calls per expert; at large N the
    per-expert calls cost little next to their O(N²) work anyway.
    """
    return max(1, SIGMA_BATCH_BYTES // (8 * num_clients * max(num_clients, hidden)))


def _cosine_from_gram(gram: np.ndarray) -> np.ndarray:
    """Cosines between the vectors whose Gram matrix is ``gram`` [..., N, N]; 0 where a vector is zero."""
    g = np.asarray(gram, dtype=np.float64)
    norms = np.sqrt(np.maximum(np.diagonal(g, axis1=-2, axis2=-1), 0.0))
    denom = norms[..., :, None] * norms[..., None, :]
    cos = np.divide(g, denom, out=np.zeros_like(g), where=denom > 0)
    clipped: np.ndarray = np.clip(cos, -1.0, 1.0, out=cos)
    return clipped


def _set_diagonal(a: np.ndarray, value: float | bool) -> np.ndarray:
    """``a`` [..., N, N] with the diagonal of every matrix set to ``value``, in place."""
    idx = np.arange(a.shape[-1])
    a[..., idx, idx] = value
    return a


def signature_similarity(mu: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Semantic similarity σ_ij(e) of the clients' signatures of one expert, or of a batch of experts.

    Parameters
    ----------
    mu : ndarray [..., N, d]
        μ_i(e): the mean hidden state each client routed to expert e.
    counts : ndarray [..., N]
        c_i(e): how many tokens each client routed to expert e.

    Returns
    -------
    sigma : ndarray [..., N, N] float64
        cos(μ_i(e), μ_j(e)); 0 where a signature is the zero vector.
    counted : ndarray [..., N, N] of bool
        True for pairs i ≠ j that both routed tokens to e. Only these pairs enter
        the threshold (eq. 9) and can be aligned (eq. 10): a client that never
        used the expert says nothing about what the expert means.
    """
    x = np.asarray(mu, dtype=np.float64)
    used = np.asarray(counts, dtype=np.float64) > 0
    # (7) σ_ij(e) = cos(μ_i(e), μ_j(e)); not aligned where c_i(e) = 0 or c_j(e) = 0
    sigma = _cosine_from_gram(x @ np.swapaxes(x, -1, -2))  # stacked: as fast as one syrk per matrix (measured)
    counted = _set_diagonal(used[..., :, None] & used[..., None, :], False)
    return sigma, counted


def slice_gram(deltas: np.ndarray) -> np.ndarray:
    """Gram matrix G_ij = ⟨Δ_i(e), Δ_j(e)⟩ of one expert slice of every client, [N, N] float64.

    ``deltas`` is [N, |θ(e)|]: one expert's flattened update from each client,
    float32 from the payload, best as one contiguous block. ``X @ X.T`` on one
    buffer is BLAS's symmetric rank-k product (syrk, half the work of a general
    product), run in float32; only the N×N result is cast to float64. A float64
    product would need a float64 copy of the slice and took ~5× as long (70 ms
    against 14 ms for 100 clients × 57,344 values, one thread); float32 moves
    G_ij by ~1e-6·sqrt(G_ii·G_jj) and the cosines of eq. 8 by ~1e-6.
    """
    x = np.asarray(deltas)
    gram: np.ndarray = (x @ x.T).astype(np.float64)
    return gram


def direction_consensus(gram: np.ndarray) -> np.ndarray:
    """Direction consensus D_ij(e) from the Gram matrix of one expert slice (or a batch of them).

    Returns
    -------
    ndarray [..., N, N]
        cos(Δ_i(e), Δ_j(e)); 0 where an update of the expert is zero (it has no
        direction to agree with).
    """
    # (8) D_ij(e) = cos(Δ_i(e), Δ_j(e)) = G_ij / sqrt(G_ii·G_jj)
    return _cosine_from_gram(gram)


def thresholds(sigma: np.ndarray, counted: np.ndarray, *, beta: float = 1.0) -> np.ndarray:
    """The round's similarity threshold τ_e of each expert of a batch: [...], one per leading index.

    M and Σ are the mean and the population standard deviation (ddof = 0) of
    σ_ij(e) over the counted pairs i < j. nan where no pair is counted: then no
    pair can be aligned.
    """
    s = np.asarray(sigma, dtype=np.float64)
    upper = np.triu(np.asarray(counted, dtype=bool), k=1)
    pairs = upper.sum(axis=(-2, -1))
    some = pairs > 0
    mean = np.divide(np.where(upper, s, 0.0).sum(axis=(-2, -1)), pairs, out=np.full(pairs.shape, np.nan), where=some)
    spread = np.where(upper, s - mean[..., None, None], 0.0)
    var = np.divide((spread * spread).sum(axis=(-2, -1)), pairs, out=np.full(pairs.shape, np.nan), where=some)
    # (9) τ_e = M(e) − β·Σ(e)
    tau: np.ndarray = mean - beta * np.sqrt(var)
    return tau


def threshold(sigma: np.ndarray, counted: np.ndarray, *, beta: float = 1.0) -> float:
    """The round's similarity threshold τ_e of one expert ([N, N] inputs); see ``thresholds``."""
    return float(thresholds(sigma, counted, beta=beta))


def sigma_gate(
    sigma: np.ndarray,
    counted: np.ndarray,
    tau: float | np.ndarray,
    *,
    gate: Gate = "hard",
    temperature: float = 0.05,
    tol: float = 1e-9,
) -> np.ndarray:
    """The σ factor of γ_ij(e) (eq. 10), [..., N, N]: 0 where a pair is not counted (the diagonal included).

    ``tau`` holds one threshold per leading index (``thresholds``). It reads no
    update, so the caller computes it for many experts of a layer at once,
    before their slices are read. Options as in ``gate_weights``.
    """
    s = np.asarray(sigma, dtype=np.float64)
    t = np.asarray(tau, dtype=np.float64)[..., None, None]
    if gate == "hard":
        g = (s >= t - tol).astype(np.float64)
    elif gate == "soft":
        g = 0.5 * (1.0 + np.tanh((s - t) / (2.0 * temperature)))  # sigmoid, overflow-free
    else:
        raise ValueError(f"gate must be 'hard' or 'soft', got {gate!r}")
    gated: np.ndarray = np.where(np.asarray(counted, dtype=bool), g, 0.0)
    return gated


def gated_consensus(gate: np.ndarray, consensus: np.ndarray) -> np.ndarray:
    """γ_ij(e) from the σ factor (``sigma_gate``) and the direction consensus D, [..., N, N]; γ_ii(e) = 1."""
    # (10) γ_ij(e) = 1[σ_ij(e) ≥ τ_e]·max(D_ij(e), 0), γ_ii(e) = 1
    gamma = np.asarray(gate, dtype=np.float64) * np.maximum(np.asarray(consensus, dtype=np.float64), 0.0)
    return _set_diagonal(gamma, 1.0)


def gate_weights(
    sigma: np.ndarray,
    counted: np.ndarray,
    consensus: np.ndarray,
    tau: float | np.ndarray,
    *,
    gate: Gate = "hard",
    temperature: float = 0.05,
    tol: float = 1e-9,
) -> np.ndarray:
    """Gated pairwise weights γ_ij(e) of one expert (or a batch): ``sigma_gate``, then ``gated_consensus``.

    Parameters
    ----------
    sigma, counted : ndarray [..., N, N]
        From ``signature_similarity`` (eq. 7).
    consensus : ndarray [..., N, N]
        D from ``direction_consensus`` (eq. 8).
    tau : float or ndarray [...]
        From ``threshold`` or ``thresholds`` (eq. 9).
    gate : {"hard", "soft"}
        "hard": 1[σ ≥ τ − tol]; "soft": sigmoid((σ − τ)/T), the spec's option.
    temperature : float
        T of the soft gate.
    tol : float
        Slack of the hard comparison, so that cosines of 1.0 and 0.9999999999999999
        do not gate pairs out on rounding noise.

    Returns
    -------
    ndarray [..., N, N], symmetric, entries in [0, 1]
        γ_ii = 1; 0 for pairs that are not counted.
    """
    return gated_consensus(sigma_gate(sigma, counted, tau, gate=gate, temperature=temperature, tol=tol), consensus)


def excluded_pairs(
    sigma: np.ndarray, counted: np.ndarray, tau: float | np.ndarray, *, tol: float = 1e-9
) -> tuple[int, int]:
    """(pairs i < j gated out by σ < τ − tol, counted pairs i < j), summed over a batch: a round-report diagnostic."""
    upper = np.triu(np.asarray(counted, dtype=bool), k=1)
    below = np.asarray(sigma, dtype=np.float64) < np.asarray(tau, dtype=np.float64)[..., None, None] - tol
    return int((upper & below).sum()), int(upper.sum())


def client_weights(gamma: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Client weights π_i(e) of one expert, or of a batch of experts.

    Returns
    -------
    ndarray [..., N]
        n_i·Σ_{j≠i} γ_ij(e), normalised to sum 1; a client with no aligned partner
        gets 0. All zeros when no pair is aligned: then the expert keeps its value
        (eq. 12).
    """
    g = np.asarray(gamma, dtype=np.float64)
    degree = g.sum(axis=-1) - np.diagonal(g, axis1=-2, axis2=-1)
    # (11) π_i(e) ∝ n_i·Σ_{j≠i} γ_ij(e)
    raw = np.asarray(n, dtype=np.float64) * degree
    total = raw.sum(axis=-1, keepdims=True)
    pi: np.ndarray = np.divide(raw, total, out=np.zeros_like(raw), where=total > 0)
    return pi


def merge_expert(base: np.ndarray, deltas: np.ndarray, pi: np.ndarray) -> np.ndarray:
    """θ_g^t(e) from one expert slice: [|θ(e)|] float64.

    ``base`` is θ_g^{t−1}(e), ``deltas`` [N, |θ(e)|], ``pi`` [N] from ``client_weights``.
    The weighted sum Σ_i π_i·Δ_i runs in the deltas' precision (float32: one
    matrix-vector product over the slice block, no float64 copy of it) and is
    added to ``base`` in float64.
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
    ndarray [N, |θ(e)|] in ``thetas``' precision (at least float32)
        Row i is Σ_j γ_ij(e)·θ_j(e) / Σ_j γ_ij(e): γ's rows normalised in float64,
        cast to ``thetas``' precision and multiplied, so a float32 slice is never
        copied to float64.
    """
    g = np.asarray(gamma, dtype=np.float64)
    x = np.asarray(thetas)
    weights = g / g.sum(axis=1, keepdims=True)
    # (12, personalized) θ_i(e) ← Σ_j γ_ij(e)·θ_j(e) / Σ_j γ_ij(e)
    views: np.ndarray = weights.astype(np.result_type(x.dtype, np.float32)) @ x
    return views
