"""benchmarks/aggregate.py: the O(N²) terms are timed inside the round without changing it."""

from __future__ import annotations

import os

import numpy as np
import pytest

_environ = dict(os.environ)
from benchmarks import aggregate  # noqa: E402  (it pins one BLAS thread for its own process at import)

os.environ.clear()
os.environ.update(_environ)  # not for the Ray workers later tests start

from aggregation import ArrayReader, FedAlignMoE, FedAvg  # noqa: E402
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
    align_s, align_pairwise_s = aggregate.one_round(FedAlignMoE(layout), base, updates)
    avg_s, avg_pairwise_s = aggregate.one_round(FedAvg(layout), base, updates)

    # Assert
    assert 0 < align_pairwise_s < align_s
    assert avg_pairwise_s == 0.0 and avg_s > 0


def test_timing_leaves_the_round_bit_identical_and_restores_the_functions(cohort):
    # Prepare
    layout, updates = cohort
    originals = {name: getattr(sa, name) for name in aggregate.PAIRWISE_TERMS}
    plain = _payload(FedAlignMoE(layout), layout, updates)

    # Execute
    with aggregate.timing_pairwise() as spent:
        timed = _payload(FedAlignMoE(layout), layout, updates)

    # Assert
    np.testing.assert_array_equal(timed, plain)
    assert spent[0] > 0
    assert all(getattr(sa, name) is fn for name, fn in originals.items())

