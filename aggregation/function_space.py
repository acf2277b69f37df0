"""Gram matrices of what clients' updates do to an expert's weights, from LoRA factors alone.

FedAlign-MoE's direction consensus (eq. 8, ../shared/spec/fedalign_moe.md) asks
whether two clients moved expert e the same way. For a LoRA expert the factor
deltas (ΔA, ΔB) are a poor witness: the reparametrisation A → GA, B → BG⁻¹
changes them without changing the expert, and while B ≈ 0 (LoRA's init) ΔA is
mostly noise that B does not yet pass on. What the expert computes changes by

    ΔW_i = (B + ΔB_i)(A + ΔA_i) − BA = ΔB_i·(A + ΔA_i) + B·ΔA_i

for each adapted matrix, a rank ≤ 2r matrix of d_out × d_in values: 4 M for
one OLMoE expert's gate/up projection, 1.6 GB for a cohort of 100. The Gram
matrix ⟨ΔW_i, ΔW_j⟩ is built here from the factors instead, through products
of r-row blocks, never from a materialised ΔW. peft's scaling α/r multiplies
every ΔW of a run alike (fedsim trains one α and r) and cancels in a cosine.

Plain numpy over one expert slice × the cohort, as ``semantic_alignment``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aggregation.errors import LayoutMismatch
from aggregation.payload import LayoutEntry
from aggregation.semantic_alignment import slice_gram


@dataclass(frozen=True)
class FactorPair:
    """One adapted matrix of an expert: where its factors sit in the expert's slice.

    ``a`` and ``b`` are [start, stop) ranges relative to the slice's first value;
    A is stored [rank, d_in] and B [d_out, rank], row-major (peft's shapes).
    """

    a: tuple[int, int]
    b: tuple[int, int]
    rank: int
    d_in: int
    d_out: int


@dataclass(frozen=True)
class ExpertFactors:
    """An expert slice read as LoRA pairs, plus the ranges trained in full (compared value by value)."""

    pairs: tuple[FactorPair, ...]
    plain: tuple[tuple[int, int], ...]


def expert_factors(entries: Sequence[LayoutEntry]) -> ExpertFactors:
    """The LoRA pairs of one expert's layout entries (adjacent, in buffer order).

    A pair is an entry whose parameter is named ``….lora_A.…`` with shape
    [r, d_in] and the entry of the same name with ``lora_B`` with shape
    [d_out, r]. Any other entry is plain: its values are the expert's own
    weights, and its delta enters the Gram matrix as it stands.
    """
    if not entries:
        return ExpertFactors((), ())
    start = entries[0].offset
    by_param = {e.param: e for e in entries}
    pairs: list[FactorPair] = []
    paired: set[str] = set()
    for e in entries:
        if ".lora_A." not in e.param:
            continue
        partner = by_param.get(e.param.replace(".lora_A.", ".lora_B."))
        if partner is None:
            continue
        if len(e.shape) != 2 or len(partner.shape) != 2 or e.shape[0] != partner.shape[1]:
            raise LayoutMismatch(
                f"{e.key} {e.shape} and {partner.key} {partner.shape} are not LoRA factors A [r, d_in], B [d_out, r]"
            )
        pairs.append(FactorPair((e.offset - start, e.offset - start + e.size),
                                (partner.offset - start, partner.offset - start + partner.size),
                                rank=e.shape[0], d_in=e.shape[1], d_out=partner.shape[0]))
        paired |= {e.param, partner.param}
    plain = tuple((e.offset - start, e.offset - start + e.size) for e in entries if e.param not in paired)
    return ExpertFactors(tuple(pairs), plain)


def _pair_gram_shared_base(a0: np.ndarray, b0: np.ndarray, da: np.ndarray, db: np.ndarray) -> np.ndarray:
    """⟨ΔW_i, ΔW_j⟩ of one adapted matrix when every client started from the same A, B.

    a0 [r, d_in], b0 [d_out, r]; da [N, r, d_in], db [N, d_out, r]. With
    P_i = A + ΔA_i, ΔW_i = ΔB_i·P_i + B·ΔA_i, and the four inner products
    reduce to r × r blocks of two syrks, ΔA's rows over d_in and ΔB's columns
    over d_out: O(N²·r²·(d_in + d_out)), r times the factor-space Gram.
    """
    n, r = da.shape[0], da.shape[1]
    aa = slice_gram(da.reshape(n * r, -1)).reshape(n, r, n, r)  # ⟨ΔA_i[p], ΔA_j[q]⟩
    bb = slice_gram(db.transpose(0, 2, 1).reshape(n * r, -1)).reshape(n, r, n, r)  # ⟨ΔB_i[:, p], ΔB_j[:, q]⟩
    a0 = a0.astype(np.float64)
    b0 = b0.astype(np.float64)
    m = da.astype(np.float64) @ a0.T  # [N, r, r]: ΔA_i·Aᵀ
    xb = db.astype(np.float64).transpose(0, 2, 1) @ b0  # [N, r, r]: ΔB_iᵀ·B
    # P_i·ΔA_jᵀ and P_i·P_jᵀ as [i, p, j, q]: A·ΔA_jᵀ is m[j]ᵀ, ΔA_i·Aᵀ is m[i]
    pa = aa + m.transpose(2, 0, 1)[None]
    pp = pa + (m[:, :, None, :] + (a0 @ a0.T)[None, :, None, :])
    # one pass over [N, r, N, r] per term, no product temporaries (einsum): 2.6× faster at N = 100, r = 8
    t1 = np.einsum("ipjq,ipjq->ij", bb, pp)  # ⟨ΔB_i·P_i, ΔB_j·P_j⟩
    t2 = np.einsum("ipq,ipjq->ij", xb, pa)  # ⟨ΔB_i·P_i, B·ΔA_j⟩
    t4 = np.einsum("pq,ipjq->ij", b0.T @ b0, aa)  # ⟨B·ΔA_i, B·ΔA_j⟩
    gram: np.ndarray = t1 + t2 + t2.T + t4
    return gram


def _pair_gram_own_base(a0: np.ndarray, b0: np.ndarray, da: np.ndarray, db: np.ndarray) -> np.ndarray:
    """⟨ΔW_i, ΔW_j⟩ of one adapted matrix when client i started from its own A_i, B_i.

    a0 [N, r, d_in], b0 [N, d_out, r]. ΔW_i = U_i·V_i with U_i = [ΔB_i, B_i + ΔB_i]
    [d_out, 2r] and V_i = [A_i; ΔA_i] [2r, d_in], so ⟨ΔW_i, ΔW_j⟩ is the sum of
    (U_iᵀU_j) ∘ (V_iV_jᵀ): two syrks of 2r rows per client.
    """
    n, r = da.shape[0], da.shape[1]
    u = np.concatenate([db, b0 + db], axis=2).transpose(0, 2, 1).reshape(n * 2 * r, -1)  # rows: U_i's columns
    v = np.concatenate([a0, da], axis=1).reshape(n * 2 * r, -1)  # rows: V_i's rows
    both = (slice_gram(u) * slice_gram(v)).reshape(n, 2 * r, n, 2 * r)
    gram: np.ndarray = both.sum(axis=(1, 3))
    return gram


def function_gram(deltas: np.ndarray, base: np.ndarray, factors: ExpertFactors) -> np.ndarray:
    """G_ij = ⟨ΔW_i, ΔW_j⟩ summed over the expert's adapted matrices, plus its plain ranges' ⟨Δ_i, Δ_j⟩.

    Parameters
    ----------
    deltas : ndarray [N, |θ(e)|]
        One expert's update from each client (float32 from the payload).
    base : ndarray [|θ(e)|] or [N, |θ(e)|]
        The expert's values the updates started from: the global θ_g^{t−1}(e),
        or each client's own start (personalized experts).
    factors : ExpertFactors
        The slice read by ``expert_factors``.

    Returns
    -------
    ndarray [N, N] float64
        The Gram matrix whose cosines are D of eq. 8 in function space. Memory:
        a few copies of the slice × cohort (the 2r-row stacks), never a d_out × d_in
        matrix per client.
    """
    x = np.asarray(deltas)
    b = np.asarray(base)
    n = x.shape[0]
    shared = b.ndim == 1
    gram = np.zeros((n, n))
    for p in factors.pairs:
        da = x[:, p.a[0] : p.a[1]].reshape(n, p.rank, p.d_in)
        db = x[:, p.b[0] : p.b[1]].reshape(n, p.d_out, p.rank)
        if shared:
            gram += _pair_gram_shared_base(b[p.a[0] : p.a[1]].reshape(p.rank, p.d_in),
                                           b[p.b[0] : p.b[1]].reshape(p.d_out, p.rank), da, db)
        else:
            gram += _pair_gram_own_base(b[:, p.a[0] : p.a[1]].reshape(n, p.rank, p.d_in),
                                        b[:, p.b[0] : p.b[1]].reshape(n, p.d_out, p.rank), da, db)
    for lo, hi in factors.plain:
        gram += slice_gram(np.ascontiguousarray(x[:, lo:hi]))  # one block: BLAS's syrk
    return gram
