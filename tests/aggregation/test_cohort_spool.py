"""The cohort spool: a kept update read back bit for bit, holding nothing of the original; FedAlign-MoE unchanged."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest

from aggregation import (
    ArrayReader,
    ClientUpdate,
    EntrySpec,
    FedAlignMoE,
    FedAvg,
    PayloadLayout,
    RoutingStats,
    cohort_spool,
)
from aggregation.cohort_spool import CohortSpool
from aggregation.round_fold import RoundFold

E, D = 2, 2  # experts, hidden size (the router's width and the routing statistics')


def _stats(rng: np.random.Generator) -> RoutingStats:
    counts = rng.integers(1, 9, size=E).astype(np.float64)
    return RoutingStats(n_tokens=20, p_sum=rng.random(E) * 20, counts=counts, margin_sum=rng.random(E) * counts,
                        x_sum=rng.normal(size=(E, D)) * counts[:, None])


def _update(client: int, size: int, rng: np.random.Generator, layers: int = 1) -> ClientUpdate:
    return ClientUpdate(client_id=client, round_idx=1, n_examples=5 + client,
                        delta=rng.normal(size=size).astype(np.float32),
                        routing=tuple(_stats(rng) for _ in range(layers)), metrics={"train_loss": (3.0, 5.0)},
                        compute_seconds=1.5, bytes_down={"shared": 4}, bytes_up={"shared": 4},
                        residual=np.ones(size, dtype=np.float32))


def test_a_kept_update_reads_back_bit_for_bit_in_any_slice(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: copies go in pieces of 7 values, so a 50-value delta takes 8 writes; two updates share the file
    monkeypatch.setattr(cohort_spool, "_CHUNK", 7)
    rng = np.random.default_rng(0)
    first, second = _update(0, 50, rng), _update(1, 50, rng)
    spool = CohortSpool()
    # Execute
    kept = [spool.keep(ArrayReader(u)) for u in (first, second)]
    # Assert: every slice equal to the original's bits, the map too; the small fields as sent; the residual dropped
    for reader, original in zip(kept, (first, second), strict=True):
        for start, stop in ((0, 50), (0, 1), (13, 29), (49, 50), (20, 20)):
            assert reader.read(start, stop).tobytes() == original.delta[start:stop].tobytes()
        assert reader.update.delta.tobytes() == original.delta.tobytes() and not reader.update.delta.flags.writeable
        assert (reader.update.client_id, reader.update.n_examples, reader.update.metrics) == \
            (original.client_id, original.n_examples, original.metrics)
        assert reader.update.residual is None
        got, sent = reader.update.routing[0], original.routing[0]
        assert got.n_tokens == sent.n_tokens and np.array_equal(got.x_sum, sent.x_sum)
        assert not np.shares_memory(got.x_sum, sent.x_sum) and not np.shares_memory(got.p_sum, sent.p_sum)
    assert spool.nbytes == 2 * 50 * 4
    with pytest.raises(IndexError, match="client 1: read \\[40, 51\\) of a delta of 50"):
        kept[1].read(40, 51)
    spool.close()


def test_the_spooled_reader_holds_no_reference_to_the_original_arrays() -> None:
    # Prepare: an update whose arrays stand for object-store views (held, they would pin the object)
    rng = np.random.default_rng(1)
    update = _update(0, 10, rng)
    watched = [weakref.ref(update.delta), weakref.ref(update.routing[0].x_sum), weakref.ref(update.residual)]
    spool = CohortSpool()
    # Execute: keep it, then drop every other reference
    kept = spool.keep(ArrayReader(update))
    del update
    gc.collect()
    # Assert: the originals are gone while the kept reader still reads the values
    assert all(ref() is None for ref in watched)
    assert kept.read(0, 10).shape == (10,)
    spool.close()


def _layout() -> PayloadLayout:
    """Shared (3,); a router [E, D]; per expert a LoRA A (2,) and B (3,)."""
    specs = [EntrySpec("attn", "shared", None, None, (3,)), EntrySpec("gate", "router", 0, None, (E, D))]
    for e in range(E):
        specs += [EntrySpec("lora_A", "expert", 0, e, (2,), axis=0, start=e, stop=e + 1),
                  EntrySpec("lora_B", "expert", 0, e, (3,), axis=0, start=e, stop=e + 1)]
    return PayloadLayout.build(specs)


def test_fedalign_moe_through_the_round_gets_spooled_readers_and_merges_as_over_the_originals() -> None:
    # Prepare: five clients of a one-layer MoE layout, fed straight to one FedAlign-MoE and through a round to another
    layout, rng = _layout(), np.random.default_rng(2)
    cohort = [_update(c, layout.total, rng) for c in range(5)]
    start = rng.normal(size=layout.total).astype(np.float32)
    direct = FedAlignMoE(layout)
    direct.begin(start, round_idx=1)
    for u in cohort:
        direct.add(ArrayReader(u))
    expected = direct.finish()
    # Execute
    fold = RoundFold(FedAlignMoE(layout), layout, start, round_idx=1, cohort_size=5, residuals={})
    for i, u in enumerate(cohort):
        fold.arrive(i, u)
    payload, summary = fold.finish()
    # Assert: the same bits and report; every update was copied; FedAvg, which keeps no reader, copies nothing
    assert not summary.rejected and expected.report["n_aggregated"] == 5
    assert payload.tobytes() == expected.payload.tobytes()
    assert summary.report == expected.report
    assert summary.spooled_bytes == 5 * layout.total * 4
    fedavg = RoundFold(FedAvg(layout), layout, start, round_idx=1, cohort_size=5, residuals={})
    for i, u in enumerate(cohort):
        fedavg.arrive(i, u)
    assert fedavg.finish()[1].spooled_bytes == 0
