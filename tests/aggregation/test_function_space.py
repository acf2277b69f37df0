"""Gram matrices of the change of an expert's effective weights, computed from its LoRA factors."""

from __future__ import annotations

import numpy as np
import pytest

from aggregation.errors import LayoutMismatch
from aggregation.function_space import ExpertFactors, FactorPair, expert_factors, function_gram
from aggregation.payload import EntrySpec, PayloadLayout
from aggregation.semantic_alignment import slice_gram

# one adapted matrix, r = 1, d_in = d_out = 2: A (2 values) then B (2 values)
ONE_PAIR = ExpertFactors((FactorPair((0, 2), (2, 4), rank=1, d_in=2, d_out=2),), ())


def _delta_w(a0: np.ndarray, b0: np.ndarray, da: np.ndarray, db: np.ndarray) -> np.ndarray:
    """ΔW = (B + ΔB)(A + ΔA) − BA, materialised (the brute force the module avoids)."""
    return (b0 + db) @ (a0 + da) - b0 @ a0


def _pack(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[..., r, d_in] and [..., d_out, r] factors as one flat slice per leading index: A, then B."""
    lead = a.shape[:-2]
    return np.concatenate([a.reshape(*lead, -1), b.reshape(*lead, -1)], axis=-1)


def _random_factors(rng: np.random.Generator, n: int, r: int, d_in: int, d_out: int):  # type: ignore[no-untyped-def]
    return (rng.normal(size=(r, d_in)), rng.normal(size=(d_out, r)),
            rng.normal(size=(n, r, d_in)), rng.normal(size=(n, d_out, r)))


def test_a_hand_computed_pair_gives_the_gram_of_the_effective_weight_changes() -> None:
    # Prepare: A = [1, 0], B = [1, 0]ᵀ; client 1 moves A by [0, 1] and B by [0, 1]ᵀ, client 2 moves A by [0, −1]
    base = np.array([1.0, 0.0, 1.0, 0.0])
    deltas = np.array([[0.0, 1.0, 0.0, 1.0], [0.0, -1.0, 0.0, 0.0]], dtype=np.float32)

    # Execute
    gram = function_gram(deltas, base, ONE_PAIR)

    # Assert: ΔW_1 = [[0, 1], [1, 1]], ΔW_2 = [[0, −1], [0, 0]] by hand; the factor Gram differs (G_11 = 2)
    np.testing.assert_allclose(gram, [[3.0, -1.0], [-1.0, 1.0]], atol=1e-12)
    np.testing.assert_allclose(slice_gram(deltas), [[2.0, -1.0], [-1.0, 1.0]])


@pytest.mark.parametrize("own_base", [False, True], ids=["shared-base", "own-base"])
def test_the_gram_equals_the_brute_force_one_over_two_adapted_matrices_and_a_plain_range(own_base: bool) -> None:
    # Prepare: 5 clients, rank 3; matrices 7 → 4 and 4 → 6, then 5 values trained in full
    rng = np.random.default_rng(0)
    n, r = 5, 3
    first, second = _random_factors(rng, n, r, 7, 4), _random_factors(rng, n, r, 4, 6)
    if own_base:  # personalized experts: each client started from its own factors
        first = (first[0] + rng.normal(size=(n, r, 7)), first[1] + rng.normal(size=(n, 4, r)), *first[2:])
        second = (second[0] + rng.normal(size=(n, r, 4)), second[1] + rng.normal(size=(n, 6, r)), *second[2:])
    plain_base, plain_delta = rng.normal(size=5), rng.normal(size=(n, 5))
    lead = (n,) if own_base else ()
    base = np.concatenate([_pack(*first[:2]), _pack(*second[:2]), np.broadcast_to(plain_base, (*lead, 5))], axis=-1)
    deltas = np.concatenate([_pack(*first[2:]), _pack(*second[2:]), plain_delta], axis=1)
    factors = ExpertFactors(
        (FactorPair((0, 21), (21, 33), rank=3, d_in=7, d_out=4), FactorPair((33, 45), (45, 63), rank=3, d_in=4,
                                                                             d_out=6)),
        ((63, 68),),
    )

    # Execute: in float64 (exact comparison) and float32 (the payload's precision)
    gram = function_gram(deltas, base, factors)
    gram32 = function_gram(deltas.astype(np.float32), base.astype(np.float32), factors)

    # Assert
    def flat_change(i: int) -> np.ndarray:
        def start(f: tuple[np.ndarray, ...], k: int) -> np.ndarray:
            return f[k][i] if own_base else f[k]
        return np.concatenate([_delta_w(start(first, 0), start(first, 1), first[2][i], first[3][i]).ravel(),
                               _delta_w(start(second, 0), start(second, 1), second[2][i], second[3][i]).ravel(),
                               plain_delta[i]])
    changes = np.stack([flat_change(i) for i in range(n)])
    want = changes @ changes.T
    np.testing.assert_allclose(gram, want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(gram32, want, rtol=1e-4, atol=1e-3 * np.abs(want).max())


@pytest.mark.parametrize("own_base", [False, True], ids=["shared-base", "own-base"])
def test_the_gram_does_not_change_under_the_lora_reparametrisation_and_the_factor_gram_does(own_base: bool) -> None:
    # Prepare: A → G·A, B → B·G⁻¹ for the start and the moved factors alike (ΔW unchanged);
    # a shared start takes one G, personal starts one G per client
    rng = np.random.default_rng(1)
    n, r, d_in, d_out = 4, 2, 6, 5
    a0, b0, da, db = _random_factors(rng, n, r, d_in, d_out)
    if own_base:
        a0, b0 = a0 + rng.normal(size=(n, r, d_in)), b0 + rng.normal(size=(n, d_out, r))
    gs = rng.normal(size=(n if own_base else 1, r, r)) + 2 * np.eye(r)
    g = gs if own_base else np.broadcast_to(gs, (n, r, r))
    g_inv = np.linalg.inv(g)
    a1, b1 = a0 + da, b0 + db
    a0g = g @ a0 if own_base else gs[0] @ a0
    b0g = b0 @ g_inv if own_base else b0 @ g_inv[0]
    da_g, db_g = g @ a1 - a0g, b1 @ g_inv - b0g  # the moved factors, reparametrised, minus the new start
    factors = ExpertFactors((FactorPair((0, r * d_in), (r * d_in, r * (d_in + d_out)), rank=r, d_in=d_in,
                                        d_out=d_out),), ())

    # Execute
    before = function_gram(_pack(da, db), _pack(a0, b0), factors)
    after = function_gram(_pack(da_g, db_g), _pack(a0g, b0g), factors)

    # Assert: the same expert change, the same Gram; the factor deltas' Gram moved
    np.testing.assert_allclose(after, before, rtol=1e-9, atol=1e-9)
    assert not np.allclose(slice_gram(_pack(da_g, db_g)), slice_gram(_pack(da, db)), rtol=1e-2)


def test_expert_factors_pairs_a_and_b_by_name_and_keeps_other_entries_plain() -> None:
    # Prepare: one expert with two adapted matrices (B stored before A for one of them) and a full-trained bias
    p = "m.layers.0.experts"
    layout = PayloadLayout.build([
        EntrySpec("router", "router", 0, None, (2, 3)),
        EntrySpec(f"{p}.w1.lora_A.default.weight", "expert", 0, 0, (2, 3)),
        EntrySpec(f"{p}.w1.lora_B.default.weight", "expert", 0, 0, (4, 2)),
        EntrySpec(f"{p}.w2.lora_B.default.weight", "expert", 0, 0, (3, 2)),
        EntrySpec(f"{p}.w2.lora_A.default.weight", "expert", 0, 0, (2, 4)),
        EntrySpec(f"{p}.bias", "expert", 0, 0, (3,)),
    ])

    # Execute
    factors = expert_factors(layout.select(role="expert", layer=0, expert=0))

    # Assert: offsets relative to the expert's slice
    assert factors.pairs == (FactorPair((0, 6), (6, 14), rank=2, d_in=3, d_out=4),
                             FactorPair((20, 28), (14, 20), rank=2, d_in=4, d_out=3))
    assert factors.plain == ((28, 31),)


def test_expert_factors_refuses_factors_whose_ranks_disagree() -> None:
    layout = PayloadLayout.build([
        EntrySpec("e.lora_A.w", "expert", 0, 0, (2, 3)),
        EntrySpec("e.lora_B.w", "expert", 0, 0, (4, 3)),
    ])
    with pytest.raises(LayoutMismatch, match="not LoRA factors"):
        expert_factors(layout.select(role="expert"))
