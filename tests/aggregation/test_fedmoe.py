"""FedMoE-style per-expert averaging by usage counts, on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from aggregation import ArrayReader, ClientUpdate, EntrySpec, FedAvg, LayoutMismatch, PayloadLayout, RoutingStats
from aggregation.fedmoe import FedMoE, FedMoEOptions

E = 2


def _layout() -> PayloadLayout:
    """Buffer: shared (2,) at 0:2 | router [E, 1] at 2:4 | expert 0 (2,) at 4:6 | expert 1 (2,) at 6:8."""
    return PayloadLayout.build([
        EntrySpec("attn", "shared", None, None, (2,)),
        EntrySpec("gate", "router", 0, None, (E, 1)),
        EntrySpec("w0", "expert", 0, 0, (2,), axis=0, start=0, stop=1),
        EntrySpec("w1", "expert", 0, 1, (2,), axis=0, start=1, stop=2),
    ])


def _reader(cid: int, n: int, delta, counts) -> ArrayReader:
    c = np.asarray(counts, dtype=np.float64)
    stats = RoutingStats(n_tokens=int(c.sum()), p_sum=c.copy(), counts=c, margin_sum=np.zeros(E),
                         x_sum=np.zeros((E, 1)))
    return ArrayReader(ClientUpdate(cid, 1, n, np.asarray(delta, dtype=np.float32), (stats,)))


def _run(strategy, readers, base=None):
    strategy.begin(np.zeros(strategy.layout.total, np.float32) if base is None else np.asarray(base, np.float32),
                   round_idx=1)
    for r in readers:
        strategy.add(r)
    return strategy.finish()


D1 = [1, 1, 4, 8, 4, 4, 8, 8]
D2 = [5, 5, 8, 0, 8, 8, 0, 0]


def test_experts_and_router_rows_weighted_by_usage_shared_by_n():
    # Prepare: client 1 (n=1) used expert 0 three times and expert 1 once; client 2 (n=3) only expert 0, once
    readers = [_reader(1, 1, D1, [3, 1]), _reader(2, 3, D2, [1, 0])]

    # Execute
    result = _run(FedMoE(_layout()), readers)

    # Assert: shared 1/4·1 + 3/4·5 = 4; row/expert 0: 3/4·4 + 1/4·8 = 5; row/expert 1: client 1 alone
    np.testing.assert_allclose(result.payload, [4, 4, 5, 8, 5, 5, 8, 8])
    # client weight: mean over merged experts of its usage share: (3/4 + 1)/2 and (1/4 + 0)/2
    assert result.client_weights == pytest.approx({1: 0.875, 2: 0.125})
    assert result.report == {"n_aggregated": 2.0, "experts_kept_frac": 0.0}


def test_expert_nobody_used_keeps_its_value_and_router_row_too():
    # Prepare
    base = np.arange(8, dtype=np.float32)
    readers = [_reader(1, 1, D1, [2, 0]), _reader(2, 1, D2, [2, 0])]

    # Execute
    result = _run(FedMoE(_layout()), readers, base=base)

    # Assert: expert 1 (6:8) and router row 1 (index 3) keep the base value
    np.testing.assert_allclose(result.payload[[3, 6, 7]], base[[3, 6, 7]])
    np.testing.assert_allclose(result.payload[[0, 2, 4]], base[[0, 2, 4]] + [3, 6, 6])
    assert result.report["experts_kept_frac"] == 0.5


def test_router_weighting_n_averages_router_rows_by_examples():
    # Execute
    strategy = FedMoE(_layout(), FedMoEOptions(router_weighting="n"))
    result = _run(strategy, [_reader(1, 1, D1, [3, 1]), _reader(2, 3, D2, [1, 0])])

    # Assert: router rows 1/4·[4, 8] + 3/4·[8, 0]
    np.testing.assert_allclose(result.payload[2:4], [7, 2])


def test_missing_routing_statistics_name_the_config_field():
    # Prepare
    reader = ArrayReader(ClientUpdate(1, 1, 1, np.zeros(8, np.float32), ()))
    strategy = FedMoE(_layout())
    strategy.begin(np.zeros(8, np.float32), round_idx=1)

    # Execute / Assert
    with pytest.raises(LayoutMismatch, match="train.routing_stats"):
        strategy.add(reader)


def test_bad_router_weighting_is_rejected():
    with pytest.raises(ValidationError) as err:
        FedMoEOptions(router_weighting="counts")
    assert [e["loc"] for e in err.value.errors()] == [("router_weighting",)]


def test_empty_round_keeps_global():
    base = np.arange(8, dtype=np.float32)
    result = _run(FedMoE(_layout()), [], base=base)
    np.testing.assert_array_equal(result.payload, base)


_deltas = st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=8, max_size=8)


@settings(max_examples=40, deadline=None)
@given(clients=st.lists(st.tuples(st.integers(1, 9), _deltas), min_size=1, max_size=5), k=st.integers(1, 4))
def test_usage_proportional_to_n_equals_fedavg(clients, k):
    # Prepare: every expert used k·n_i times by client i
    layout = _layout()
    readers = [_reader(i, n, d, [k * n, k * n]) for i, (n, d) in enumerate(clients)]

    # Execute
    ours, fedavg = _run(FedMoE(layout), readers), _run(FedAvg(layout), readers)

    # Assert
    np.testing.assert_allclose(ours.payload, fedavg.payload, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(
    clients=st.lists(st.tuples(st.integers(1, 9), _deltas, st.integers(0, 5), st.integers(0, 5)),
                     min_size=1, max_size=5),
    seed=st.integers(0, 1000),
)
def test_client_order_changes_nothing(clients, seed):
    # Prepare
    readers = [_reader(i, n, d, [c0, c1]) for i, (n, d, c0, c1) in enumerate(clients)]
    shuffled = [readers[j] for j in np.random.default_rng(seed).permutation(len(readers))]

    # Execute
    a, b = _run(FedMoE(_layout()), readers), _run(FedMoE(_layout()), shuffled)

    # Assert
    np.testing.assert_allclose(a.payload, b.payload, rtol=1e-6, atol=1e-5)
    assert a.client_weights == pytest.approx(b.client_weights)
