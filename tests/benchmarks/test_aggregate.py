"""benchmarks/aggregate.py: O(N²) terms timed inside the round, unchanged by it; full-depth layouts; spilled cohorts."""

from __future__ import annotations

import os

import numpy as np
import pytest

_environ = dict(os.environ)
from benchmarks import aggregate  # noqa: E402  (it pins one BLAS thread for its own process at import)

os.environ.clear()
os.environ.update(_environ)  # not for the Ray workers later tests start

from aggregation import ArrayReader, FedAvg  # noqa: E402
from aggregation import semantic_alignment as sa  # noqa: E402


@pytest.fixture(scope="module")
def cohort():
    layout, hidden = aggregate.real_layout("tiny")
    return layout, [aggregate.synthetic_update(layout, hidden, c) for c in range(6)]


def _payload(strategy, layout, updates):
    strategy.begin(np.zeros(layout.total, dtype=np.float32), round_idx=1)
    for u in updates:
        strategy.add(ArrayReader(u))
    return strategy.finish().payload


def test_pairwise_part_is_timed_inside_a_fedalign_round_and_is_zero_for_fedavg(cohort):
    # Prepare
    layout, updates = cohort
    base = np.zeros(layout.total, dtype=np.float32)

    # Execute
    align_s, align_pairwise_s = aggregate.one_round(aggregate.FEDALIGN_WITH_D(layout), base, updates)
    avg_s, avg_pairwise_s = aggregate.one_round(FedAvg(layout), base, updates)

    # Assert: the total is the sum of the terms, every term of FedAlign-MoE's pass is timed
    assert 0 < align_pairwise_s["total"] < align_s
    assert align_pairwise_s["total"] == pytest.approx(sum(v for k, v in align_pairwise_s.items() if k != "total"))
    assert all(align_pairwise_s[term] > 0 for term in aggregate.PAIRWISE_TERMS)
    assert avg_pairwise_s["total"] == 0.0 and avg_s > 0


def test_timing_leaves_the_round_bit_identical_and_restores_the_functions(cohort):
    # Prepare
    layout, updates = cohort
    originals = {name: getattr(sa, name) for names in aggregate.PAIRWISE_TERMS.values() for name in names
                 if hasattr(sa, name)}
    plain = _payload(aggregate.FEDALIGN_WITH_D(layout), layout, updates)

    # Execute
    with aggregate.timing_pairwise() as spent:
        timed = _payload(aggregate.FEDALIGN_WITH_D(layout), layout, updates)

    # Assert
    np.testing.assert_array_equal(timed, plain)
    assert spent["total"] > 0
    assert all(getattr(sa, name) is fn for name, fn in originals.items())



def test_a_nested_timed_call_counts_once_in_the_outer_term():
    # Prepare: gate_weights calls sigma_gate and gated_consensus, all three timed
    sigma = np.array([[1.0, 0.5], [0.5, 1.0]])
    counted = ~np.eye(2, dtype=bool)

    # Execute
    with aggregate.timing_pairwise() as spent:
        sa.gate_weights(sigma, counted, np.ones((2, 2)), 0.0)

    # Assert
    assert spent["gamma"] == spent["total"] > 0


def test_full_depth_layout_is_built_on_the_meta_device_at_the_published_depth():
    # Execute: Switch-base-16, the smallest (12 MoE layers of 16 experts: every other of 12 + 12 blocks)
    layout, hidden = aggregate.real_layout("switch-base-16")

    # Assert
    assert hidden == 768
    assert layout.num_layers == 12
    assert len(layout.expert_keys()) == 12 * 16
    assert layout.total == 13_713_408


def test_a_cohort_over_the_budget_is_memmapped_and_holds_the_same_values(tmp_path):
    # Prepare
    layout, hidden = aggregate.real_layout("tiny")

    # Execute
    with aggregate.synthetic_cohort(layout, hidden, 3, budget_bytes=1e12) as (in_memory, where_memory):
        with aggregate.synthetic_cohort(layout, hidden, 3, budget_bytes=0, spill_dir=str(tmp_path)) as (spilled, where):
            files = sorted(p.name for p in tmp_path.glob("*/*"))
            same = all(np.array_equal(a.delta, b.delta) for a, b in zip(in_memory, spilled, strict=True))
            kinds = [type(u.delta) for u in spilled]
            payload = _payload(aggregate.FEDALIGN_WITH_D(layout), layout, spilled)

    # Assert: one file per update, read-only memmaps, as the in-memory cohort; the files are gone afterwards
    assert (where_memory, where) == ("memory", "memmap")
    assert files == ["client0.f32", "client1.f32", "client2.f32"]
    assert same and kinds == [np.memmap] * 3
    assert np.isfinite(payload).all()
    assert list(tmp_path.glob("*/*")) == []


def test_synthetic_deltas_point_in_many_directions():
    # Prepare
    layout, hidden = aggregate.real_layout("tiny")

    # Execute
    with aggregate.synthetic_cohort(layout, hidden, 8, budget_bytes=1e12) as (updates, _):
        d = sa.direction_consensus(sa.slice_gram(np.stack([u.delta for u in updates])))

    # Assert: negative and positive pairs, none parallel
    off = d[~np.eye(8, dtype=bool)]
    assert off.min() < -0.2 and off.max() > 0.2 and np.abs(off).max() < 0.999


def test_rounds_table_has_a_row_per_cohort_size_with_each_term_and_the_ratio():
    # Prepare
    layout, hidden = aggregate.real_layout("tiny")

    # Execute
    table = aggregate.rounds_table("tiny", layout, hidden, [3, 5], 1, budget_bytes=1e12)

    # Assert
    assert list(table["clients"]) == [3, 5]
    assert (table["fedalign_over_fedavg"] == table["fedalign_s"] / table["fedavg_s"]).all()
    assert all(f"{term}_s" in table for term in aggregate.PAIRWISE_TERMS)
    assert (table["pairwise_share"] < 1).all() and (table["fedalign_peak_rss_mib"] > 0).all()
