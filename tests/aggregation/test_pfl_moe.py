"""PFL-MoE-style personalised experts: state per client id, shared parts averaged."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from aggregation import ArrayReader, ClientUpdate, EntrySpec, FedAvg, PayloadLayout
from aggregation.pfl_moe import PFLMoE, PFLMoEOptions


def _layout() -> PayloadLayout:
    """Buffer: shared (2,) at 0:2 | router [2, 1] at 2:4 | expert 0 at 4:6 | expert 1 at 6:8."""
    return PayloadLayout.build([
        EntrySpec("attn", "shared", None, None, (2,)),
        EntrySpec("gate", "router", 0, None, (2, 1)),
        EntrySpec("w0", "expert", 0, 0, (2,), axis=0, start=0, stop=1),
        EntrySpec("w1", "expert", 0, 1, (2,), axis=0, start=1, stop=2),
    ])


def _reader(cid: int, n: int, delta, round_idx: int = 1) -> ArrayReader:
    return ArrayReader(ClientUpdate(cid, round_idx, n, np.asarray(delta, dtype=np.float32), ()))


def _start(strategy, cid: int, round_idx: int = 2) -> np.ndarray:
    """The experts ``cid`` is told to start from: its own, at the layout's expert block (4 on)."""
    start = strategy.configure(cid, round_idx, seed=0).start
    assert start is not None
    assert start.offset == strategy.layout.expert_block[0] == 4
    return start.values


def _run(strategy, base, readers, round_idx: int = 1):
    strategy.begin(np.asarray(base, dtype=np.float32), round_idx=round_idx)
    for r in readers:
        strategy.add(r)
    return strategy.finish()


def test_round_one_equals_fedavg_and_stores_each_clients_trained_experts():
    # Prepare
    layout, base = _layout(), np.arange(8, dtype=np.float32)
    d1, d2 = np.full(8, 1.0), np.full(8, 5.0)
    strategy = PFLMoE(layout)

    # Execute
    ours = _run(strategy, base, [_reader(1, 1, d1), _reader(2, 3, d2)])
    fedavg = _run(FedAvg(layout), base, [_reader(1, 1, d1), _reader(2, 3, d2)])

    # Assert: θ_i = base experts + Δ_i is what each client gets back next time
    np.testing.assert_allclose(ours.payload, fedavg.payload, atol=1e-6)
    np.testing.assert_array_equal(_start(strategy, 1), base[4:] + 1)
    np.testing.assert_array_equal(_start(strategy, 2), base[4:] + 5)
    assert strategy.configure(7, 2, seed=0).start is None
    assert ours.report["personal_clients"] == 2.0


def test_a_returning_client_trains_from_its_own_experts():
    # Prepare: round 1 gives client 1 experts base+1 and client 2 base+5
    layout, base = _layout(), np.zeros(8, dtype=np.float32)
    strategy = PFLMoE(layout)
    g1 = _run(strategy, base, [_reader(1, 1, np.ones(8)), _reader(2, 3, np.full(8, 5.0))]).payload

    # Execute: round 2, client 1 returns (Δ = 1 from its own experts), client 3 is new (Δ = 0 from global)
    result = _run(strategy, g1, [_reader(1, 1, np.ones(8), 2), _reader(3, 1, np.zeros(8), 2)], round_idx=2)

    # Assert: client 1's experts 1 + 1 = 2; client 3's are the global experts g1 = 4; the new global mean is 3
    np.testing.assert_array_equal(_start(strategy, 1, 3), np.full(4, 2.0))
    np.testing.assert_array_equal(_start(strategy, 3, 3), g1[4:])
    np.testing.assert_allclose(result.payload[4:], 3.0)
    np.testing.assert_allclose(result.payload[:4], g1[:4] + 0.5)  # shared and routers: FedAvg of Δ


def test_frozen_global_experts_never_move():
    # Execute
    strategy = PFLMoE(_layout(), PFLMoEOptions(global_experts="frozen"))
    result = _run(strategy, np.zeros(8), [_reader(1, 2, np.ones(8))])

    # Assert
    assert strategy.options.global_experts == "frozen"
    np.testing.assert_array_equal(result.payload, [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(_start(strategy, 1), np.ones(4))


def test_state_round_trips_and_is_validated():
    # Prepare
    strategy = PFLMoE(_layout())
    _run(strategy, np.zeros(8), [_reader(4, 1, np.ones(8))])

    # Execute
    restored = PFLMoE(_layout())
    restored.load_state_dict({"personal": {str(k): v.tolist() for k, v in strategy.state_dict()["personal"].items()}})

    # Assert
    np.testing.assert_array_equal(_start(restored, 4), np.ones(4))
    with pytest.raises(ValueError, match="client 4"):
        restored.load_state_dict({"personal": {4: [1.0]}})
    with pytest.raises(ValidationError) as err:
        PFLMoEOptions(global_experts="mean")
    assert [e["loc"] for e in err.value.errors()] == [("global_experts",)]


def test_a_round_that_never_finishes_stores_nothing():
    # Prepare
    strategy = PFLMoE(_layout())
    strategy.begin(np.zeros(8, dtype=np.float32), round_idx=1)
    strategy.add(_reader(1, 1, np.ones(8)))

    # Execute: the next round begins without finish (the round failed)
    strategy.begin(np.zeros(8, dtype=np.float32), round_idx=1)

    # Assert
    assert strategy.configure(1, 2, seed=0).start is None
