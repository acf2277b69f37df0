"""FedAlign-MoE's streaming strategy on hand-built layouts, readers and routing statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from aggregation import (
    ArrayReader,
    ClientInstructions,
    ClientUpdate,
    EntrySpec,
    FedAlignMoE,
    FedAlignOptions,
    FedAvg,
    LayoutMismatch,
    PayloadLayout,
    RoutingRegulariserTerm,
    RoutingStats,
)

E, H, D = 2, 2, 2  # experts, router width, hidden size of μ


def _layout(num_layers: int = 1) -> PayloadLayout:
    """Shared (3,); per layer a router weight [E, H] and bias [E]; per expert A (2,) and B (3,)."""
    specs = [EntrySpec("attn", "shared", None, None, (3,))]
    for layer in range(num_layers):
        specs += [
            EntrySpec(f"l{layer}.gate.weight", "router", layer, None, (E, H)),
            EntrySpec(f"l{layer}.gate.bias", "router", layer, None, (E,)),
        ]
        for e in range(E):
            specs += [
                EntrySpec(f"l{layer}.lora_A", "expert", layer, e, (2,), axis=0, start=e, stop=e + 1),
                EntrySpec(f"l{layer}.lora_B", "expert", layer, e, (3,), axis=0, start=e, stop=e + 1),
            ]
    return PayloadLayout.build(specs)


def _stats(mu, counts=None, p_bar=(0.6, 0.4), margin=(0.3, 0.2)) -> RoutingStats:
    """RoutingStats of 10 tokens whose derived p̄, margin and μ are the given values."""
    c = np.array(counts if counts is not None else [5.0] * E)
    return RoutingStats(
        n_tokens=10,
        p_sum=np.array(p_bar) * 10,
        counts=c,
        margin_sum=np.array(margin) * c,
        x_sum=np.array(mu, dtype=np.float64) * c[:, None],
    )


def _reader(cid: int, n: int, delta, routing, round_idx: int = 1) -> ArrayReader:
    return ArrayReader(ClientUpdate(cid, round_idx, n, np.asarray(delta, dtype=np.float32), tuple(routing)))


def _run(strategy, global_payload, readers, round_idx: int = 1):
    strategy.begin(np.asarray(global_payload, dtype=np.float32), round_idx=round_idx)
    for r in readers:
        strategy.add(r)
    return strategy.finish()


SAME_MU = [[1.0, 0.0], [0.0, 1.0]]
WITH_D = FedAlignOptions(direction_consensus=True)  # the spec's γ = 1[σ ≥ τ]·max(D, 0); the default drops D


def _term(ins: ClientInstructions) -> RoutingRegulariserTerm:
    """The one client-side term FedAlign-MoE sends: its routing regulariser."""
    assert len(ins.terms) == 1
    term = ins.terms[0]
    assert isinstance(term, RoutingRegulariserTerm)
    return term


def _own(ins: ClientInstructions, layout: PayloadLayout) -> np.ndarray:
    """The client's own experts it is told to start from, checked to sit at the layout's expert block."""
    assert ins.start is not None
    assert ins.start.offset == layout.expert_block[0]
    assert ins.start.stop == layout.expert_block[1]
    return ins.start.values


class TestConfigure:
    def test_round_one_sends_no_regulariser_before_a_p_g_target_exists(self):
        # Execute
        ins = FedAlignMoE(_layout(2)).configure(3, 1, seed=7)

        # Assert: plain local training (no term, no start)
        assert ins == ClientInstructions(client_id=3, round_idx=1, seed=7)

    def test_later_round_sends_lambda_new_p_g_and_alpha_of_seen_clients_only(self):
        # Prepare: client 1 routes confidently to expert 0 only
        strategy = FedAlignMoE(_layout())
        layout = strategy.layout
        r1 = _reader(1, 1, layout.zeros(), [_stats(SAME_MU, p_bar=(0.8, 0.2), margin=(0.4, 0.0))])
        _run(strategy, layout.zeros(), [r1])

        # Execute
        seen, unseen = strategy.configure(1, 2, seed=0), strategy.configure(2, 2, seed=0)

        # Assert: o = [.8, .2] (p_g was uniform), s = [.32, 0], α = [1, 0]; p_g = p̄ of the only client
        assert _term(seen).weight == _term(unseen).weight == 0.1
        assert _term(seen).form == _term(unseen).form == "token"
        np.testing.assert_allclose(_term(seen).p_g, [[0.8, 0.2]])
        np.testing.assert_allclose(_term(unseen).p_g, [[0.8, 0.2]])
        np.testing.assert_allclose(_term(seen).alpha, [[1.0, 0.0]])
        np.testing.assert_array_equal(_term(unseen).alpha, [[1.0, 1.0]])
        assert seen.start is None and unseen.start is None

    @pytest.mark.parametrize(
        ("options", "weight", "alpha", "form"),
        [
            (FedAlignOptions(adaptive_alpha=False), 0.1, [[1.0, 1.0]], "token"),
            (FedAlignOptions(reg_lambda=0.5, reg_form="batch"), 0.5, [[1.0, 0.0]], "batch"),
            (FedAlignOptions(reg_lambda=0.0), None, None, None),
        ],
    )
    def test_options_shape_the_regulariser_sent_after_a_round(self, options, weight, alpha, form):
        # Prepare: the same client as above
        strategy = FedAlignMoE(_layout(), options)
        layout = strategy.layout
        _run(strategy, layout.zeros(),
             [_reader(1, 1, layout.zeros(), [_stats(SAME_MU, p_bar=(0.8, 0.2), margin=(0.4, 0.0))])])

        # Execute
        ins = strategy.configure(1, 2, seed=0)

        # Assert: α = 1 without adaptive α, λ and the form from the options, no term when λ = 0
        if weight is None:
            assert ins.terms == ()
            return
        assert (_term(ins).weight, _term(ins).form) == (weight, form)
        np.testing.assert_allclose(_term(ins).alpha, alpha)

    def test_gating_off_sends_neither_p_g_nor_alpha_nor_lambda(self):
        # Execute
        ins = FedAlignMoE(_layout(), FedAlignOptions(gating="off")).configure(3, 4, seed=7)

        # Assert
        assert ins.terms == ()
        assert ins == ClientInstructions(client_id=3, round_idx=4, seed=7)

    @pytest.mark.parametrize(
        ("options", "reads"),
        [
            (FedAlignOptions(), True),
            (FedAlignOptions(gating="off"), True),
            (FedAlignOptions(semantic=False), True),
            (FedAlignOptions(gating="off", semantic=False), False),
        ],
    )
    def test_reads_routing_stats_unless_both_modules_are_off(self, options, reads):
        # Execute / Assert
        assert FedAlignMoE.reads_routing_stats(options) is reads


class TestFinish:
    def test_identical_clients_give_the_fedavg_payload(self):
        # Prepare
        layout = _layout(2)
        rng = np.random.default_rng(0)
        g, delta = rng.normal(size=layout.total), rng.normal(size=layout.total)
        routing = [_stats(SAME_MU), _stats([[0.5, 0.5], [-1.0, 2.0]], p_bar=(0.3, 0.7))]
        clients = [(cid, n) for cid, n in [(0, 1), (1, 3), (2, 6)]]

        # Execute
        ours = _run(FedAlignMoE(layout), g, [_reader(c, n, delta, routing) for c, n in clients])
        fedavg = _run(FedAvg(layout), g, [_reader(c, n, delta, routing) for c, n in clients])

        # Assert
        np.testing.assert_allclose(ours.payload, fedavg.payload, rtol=0, atol=1e-6)
        assert ours.client_weights == pytest.approx(fedavg.client_weights)

    def test_opposite_client_is_left_out_of_that_expert_and_only_that_expert(self):
        # Prepare: 5 clients, client 4's signature of expert 0 points the other way; deltas all along +1
        layout = _layout()
        ra, rb = layout.router_span(0)
        (a0, b0), (a1, b1) = layout.expert_span(0, 0), layout.expert_span(0, 1)
        readers = []
        for cid in range(5):
            scale = 100.0 if cid == 4 else cid + 1.0
            delta = layout.zeros()
            delta[:3] = cid  # shared
            delta[ra:rb] = scale
            delta[a0:b0] = delta[a1:b1] = scale
            mu = [[-1.0, 0.0], [0.0, 1.0]] if cid == 4 else SAME_MU
            readers.append(_reader(cid, 1, delta, [_stats(mu)]))

        # Execute
        result = _run(FedAlignMoE(layout, WITH_D), layout.zeros(), readers)

        # Assert: expert 0 = mean(1, 2, 3, 4); expert 1 and routers = mean(1, 2, 3, 4, 100); shared = mean(0..4)
        np.testing.assert_array_equal(result.payload[a0:b0], np.full(b0 - a0, 2.5, dtype=np.float32))
        np.testing.assert_allclose(result.payload[a1:b1], 22.0, rtol=1e-6)
        np.testing.assert_allclose(result.payload[ra:rb], 22.0, rtol=1e-6)
        np.testing.assert_allclose(result.payload[:3], 2.0, rtol=1e-6)
        assert result.report["excluded_pair_frac"] == pytest.approx(4 / 20)
        assert result.report["experts_kept_frac"] == 0.0
        assert result.report["consensus_mean"] == pytest.approx(1.0)  # every delta along +1: D = 1 for all pairs
        assert result.report["consensus_negative_frac"] == 0.0
        assert result.client_weights == pytest.approx({0: 0.225, 1: 0.225, 2: 0.225, 3: 0.225, 4: 0.1})

    def test_router_rows_follow_each_clients_consistency_score(self):
        # Prepare: client 0 scores only on expert 0, client 1 only on expert 1 (margins)
        layout = _layout()
        ra, rb = layout.router_span(0)
        d0, d1 = layout.zeros(), layout.zeros()
        d0[ra:rb], d1[ra:rb] = 1.0, -1.0

        # Execute
        result = _run(
            FedAlignMoE(layout),
            layout.zeros(),
            [
                _reader(0, 1, d0, [_stats(SAME_MU, margin=(0.5, 0.0))]),
                _reader(1, 9, d1, [_stats(SAME_MU, margin=(0.0, 0.5))]),
            ],
        )

        # Assert: weight rows [1, 1], [-1, -1], bias [1, -1]: row e is client e's
        np.testing.assert_array_equal(result.payload[ra:rb], [1.0, 1.0, -1.0, -1.0, 1.0, -1.0])

    def test_uniform_gating_merges_routers_by_n_but_still_sets_a_p_g_target(self):
        # Prepare: the same two clients as above, n = 1 and 9
        layout = _layout()
        ra, rb = layout.router_span(0)
        d0, d1 = layout.zeros(), layout.zeros()
        d0[ra:rb], d1[ra:rb] = 1.0, -1.0
        strategy = FedAlignMoE(layout, FedAlignOptions(gating="uniform"))

        # Execute
        result = _run(
            strategy,
            layout.zeros(),
            [
                _reader(0, 1, d0, [_stats(SAME_MU, p_bar=(1.0, 0.0), margin=(0.5, 0.0))]),
                _reader(1, 9, d1, [_stats(SAME_MU, p_bar=(0.0, 1.0), margin=(0.0, 0.5))]),
            ],
        )

        # Assert: rows .1·1 + .9·(−1) = −.8; p_g = [.1, .9]
        np.testing.assert_allclose(result.payload[ra:rb], -0.8, rtol=1e-6)
        np.testing.assert_allclose(_term(strategy.configure(0, 2, seed=0)).p_g, [[0.1, 0.9]])
        assert _term(strategy.configure(0, 2, seed=0)).weight == 0.1

    def test_expert_used_by_one_client_only_keeps_its_value(self):
        # Prepare: only client 0 routed tokens to expert 1
        layout = _layout()
        a1, b1 = layout.expert_span(0, 1)
        delta = np.ones(layout.total, dtype=np.float32)
        readers = [
            _reader(0, 1, delta, [_stats(SAME_MU, counts=[5, 5])]),
            _reader(1, 1, delta, [_stats(SAME_MU, counts=[5, 0])]),
        ]

        # Execute
        result = _run(FedAlignMoE(layout), layout.zeros(), readers)

        # Assert
        np.testing.assert_array_equal(result.payload[a1:b1], 0.0)
        np.testing.assert_array_equal(result.payload[layout.expert_span(0, 0)[0]], 1.0)
        assert result.report["experts_kept_frac"] == 0.5

    def test_no_client_returns_a_copy_of_the_global_payload(self):
        # Prepare
        layout = _layout()
        g = np.arange(layout.total, dtype=np.float32)

        # Execute
        result = _run(FedAlignMoE(layout), g, [])

        # Assert
        np.testing.assert_array_equal(result.payload, g)
        assert not np.shares_memory(result.payload, g)

    def test_everything_off_equals_fedavg(self):
        # Prepare
        layout = _layout()
        rng = np.random.default_rng(1)
        g = rng.normal(size=layout.total)
        clients = [
            (c, c + 1, rng.normal(size=layout.total), [_stats(rng.normal(size=(E, D)).tolist())]) for c in range(3)
        ]
        opts = FedAlignOptions(gating="off", semantic=False)

        # Execute
        ours = _run(FedAlignMoE(layout, opts), g, [_reader(*c) for c in clients])
        fedavg = _run(FedAvg(layout), g, [_reader(*c) for c in clients])

        # Assert
        np.testing.assert_allclose(ours.payload, fedavg.payload, rtol=0, atol=1e-6)


def _cohorts():
    case = st.tuples(
        st.integers(1, 20),
        st.lists(st.floats(-2, 2, width=32), min_size=2 * (E * D), max_size=2 * (E * D)),
        st.lists(st.sampled_from([0.0, 1.0, 4.0]), min_size=E, max_size=E),
    )
    return st.integers(2, 5).flatmap(
        lambda k: st.tuples(st.lists(case, min_size=k, max_size=k), st.permutations(range(k)), st.integers(0, 2**16))
    )


class TestProperties:
    @settings(max_examples=15, deadline=None)
    @given(_cohorts())
    def test_arrival_order_changes_nothing_and_weights_are_a_distribution(self, cohort):
        # Prepare
        members, perm, seed = cohort
        layout = _layout()
        rng = np.random.default_rng(seed)
        g = rng.normal(size=layout.total)
        clients = []
        for cid, (n, values, counts) in enumerate(members):
            v = np.array(values).reshape(2, E, D)
            p = np.abs(v[0, :, 0]) + 0.1
            routing = [_stats(v[1].tolist(), counts=counts, p_bar=p / p.sum(), margin=np.abs(v[0, :, 1]))]
            clients.append((cid, n, rng.normal(size=layout.total), routing))
        s1, s2 = FedAlignMoE(layout), FedAlignMoE(layout)

        # Execute
        in_order = _run(s1, g, [_reader(*c) for c in clients])
        shuffled = _run(s2, g, [_reader(*clients[i]) for i in perm])

        # Assert
        np.testing.assert_allclose(in_order.payload, shuffled.payload, rtol=1e-6, atol=1e-6)
        assert in_order.client_weights == pytest.approx(shuffled.client_weights)
        np.testing.assert_allclose(s1.state_dict()["p_g"], s2.state_dict()["p_g"])
        assert s1.state_dict()["alpha"].keys() == s2.state_dict()["alpha"].keys()
        assert all(w >= 0 for w in in_order.client_weights.values())
        assert sum(in_order.client_weights.values()) == pytest.approx(1.0)

    def test_finish_reads_at_most_one_expert_span_per_read_call(self):
        # Prepare
        layout = _layout(num_layers=2)
        reads: list[tuple[int, int]] = []

        class Recording(ArrayReader):
            def read(self, start, stop):
                reads.append((start, stop))
                return super().read(start, stop)

        strategy = FedAlignMoE(layout)
        strategy.begin(layout.zeros(), round_idx=1)
        rng = np.random.default_rng(2)
        for cid in range(3):
            routing = [_stats(rng.normal(size=(E, D)).tolist()) for _ in range(2)]
            upd = ClientUpdate(cid, 1, 2, rng.normal(size=layout.total).astype(np.float32), tuple(routing))
            strategy.add(Recording(upd))
        reads.clear()

        # Execute
        strategy.finish()

        # Assert: every read lies inside one router span or one expert span; each expert span read once per client
        spans = [layout.expert_span(*k) for k in layout.expert_keys()]
        routers = [layout.router_span(layer) for layer in layout.router_layers()]
        for start, stop in reads:
            assert any(a <= start and stop <= b for a, b in spans + routers), (start, stop)
        in_routers = [r for r in reads if any(a <= r[0] and r[1] <= b for a, b in routers)]
        assert sorted(r for r in reads if r not in in_routers) == sorted(spans * 3)


def _cos64(u: np.ndarray, v: np.ndarray) -> float:
    """cos(u, v) in float64, 0 when either is the zero vector."""
    nu, nv = float(np.linalg.norm(u)), float(np.linalg.norm(v))
    return float(np.dot(u, v)) / (nu * nv) if nu > 0 and nv > 0 else 0.0


def _reference_experts(layout: PayloadLayout, base: np.ndarray, clients, *, beta: float = 1.0) -> np.ndarray:
    """Eqs. 7–12 in float64 with plain loops, written from the spec: the expected payload of every expert slice."""
    out = base.astype(np.float64)
    n = np.array([c[1] for c in clients], dtype=np.float64)
    deltas = np.array([c[2] for c in clients], dtype=np.float64)
    num = len(clients)
    for layer, e in layout.expert_keys():
        a, b = layout.expert_span(layer, e)
        stats = [c[3][layer] for c in clients]
        used = [st.counts[e] > 0 for st in stats]
        mu = [st.x_sum[e] / st.counts[e] if st.counts[e] > 0 else np.zeros_like(st.x_sum[e]) for st in stats]
        pairs = [(i, j) for i in range(num) for j in range(i + 1, num) if used[i] and used[j]]
        sigma = {(i, j): _cos64(mu[i], mu[j]) for i, j in pairs}
        values = np.array(list(sigma.values()))
        tau = values.mean() - beta * values.std() if len(values) else np.nan
        gamma = np.eye(num)
        for (i, j), s in sigma.items():
            gamma[i, j] = gamma[j, i] = float(s >= tau - 1e-9) * max(_cos64(deltas[i, a:b], deltas[j, a:b]), 0.0)
        raw = n * (gamma.sum(axis=1) - 1.0)
        if raw.sum() > 0:
            out[a:b] += (raw / raw.sum()) @ deltas[:, a:b]
    return out


def _wide_layout() -> PayloadLayout:
    """Shared (3,); 2 MoE layers of 4 experts, each A (6,) and B (5,); routers [4, 2]."""
    specs = [EntrySpec("attn", "shared", None, None, (3,))]
    for layer in range(2):
        specs.append(EntrySpec(f"l{layer}.gate.weight", "router", layer, None, (4, 2)))
        for e in range(4):
            specs += [EntrySpec(f"l{layer}.lora_A", "expert", layer, e, (6,), axis=0, start=e, stop=e + 1),
                      EntrySpec(f"l{layer}.lora_B", "expert", layer, e, (5,), axis=0, start=e, stop=e + 1)]
    return PayloadLayout.build(specs)


def _wide_cohort(num_clients: int = 7, seed: int = 11):
    """(cid, n, delta, routing) of clients whose signatures and updates spread in direction; some skip experts."""
    layout = _wide_layout()
    rng = np.random.default_rng(seed)
    clients = []
    for cid in range(num_clients):
        routing = []
        for _ in range(2):
            counts = rng.integers(0, 4, size=4).astype(np.float64)
            mu = rng.normal(size=(4, 3)) + [[2.0, 0.0, 0.0]] * 4
            routing.append(RoutingStats(10, np.full(4, 2.5), counts, 0.2 * counts, mu * counts[:, None]))
        delta = (rng.normal(size=layout.total) * 1e-2).astype(np.float32)
        clients.append((cid, int(rng.integers(1, 50)), delta, routing))
    return layout, clients


class TestAgainstFloat64Reference:
    def test_experts_match_an_independent_float64_implementation_within_float32_rounding(self):
        # Prepare
        layout, clients = _wide_cohort()
        g = np.random.default_rng(1).normal(size=layout.total).astype(np.float32)
        lo, hi = layout.expert_block

        # Execute
        result = _run(FedAlignMoE(layout, WITH_D), g, [_reader(*c) for c in clients])

        # Assert: the float32 Gram moves D by ~1e-7 and π with it; the payload rounds θ to float32
        expected = _reference_experts(layout, g, clients)
        np.testing.assert_allclose(result.payload[lo:hi], expected[lo:hi], rtol=2**-23, atol=1e-6 * 1e-2)
        assert result.report["excluded_pair_frac"] > 0

    @pytest.mark.parametrize("batch_bytes", [1, 8 * 7 * 7 * 2, 2**30])
    def test_sigma_batches_of_any_size_give_the_same_round(self, monkeypatch, batch_bytes):
        # Prepare: batches of 1, 2 and all 4 experts of a layer
        from aggregation import semantic_alignment

        layout, clients = _wide_cohort()
        g = layout.zeros()
        whole = _run(FedAlignMoE(layout), g, [_reader(*c) for c in clients])
        monkeypatch.setattr(semantic_alignment, "SIGMA_BATCH_BYTES", batch_bytes)

        # Execute
        batched = _run(FedAlignMoE(layout), g, [_reader(*c) for c in clients])

        # Assert
        np.testing.assert_array_equal(batched.payload, whole.payload)
        assert batched.report == whole.report and batched.client_weights == whole.client_weights


class TestState:
    def test_state_dict_round_trips_through_json(self):
        # Prepare
        layout = _layout(2)
        strategy = FedAlignMoE(layout)
        routing = [_stats(SAME_MU, p_bar=(0.9, 0.1)), _stats(SAME_MU, margin=(0.1, 0.4))]
        _run(strategy, layout.zeros(), [_reader(5, 1, layout.zeros(), routing), _reader(8, 2, layout.zeros(), routing)])
        state = strategy.state_dict()

        # Execute
        restored = FedAlignMoE(layout)
        restored.load_state_dict(json.loads(json.dumps(state)))

        # Assert
        assert restored.state_dict() == state
        a, b = strategy.configure(5, 2, seed=1), restored.configure(5, 2, seed=1)
        np.testing.assert_array_equal(_term(a).p_g, _term(b).p_g)
        np.testing.assert_array_equal(_term(a).alpha, _term(b).alpha)
        assert _term(a).weight == _term(b).weight == 0.1

    def test_load_state_dict_raises_naming_the_field_when_p_g_has_the_wrong_shape(self):
        # Prepare
        strategy = FedAlignMoE(_layout(2))

        # Execute / Assert
        with pytest.raises(ValueError, match=r"p_g has shape \(1, 2\), layout needs \(2, 2\)"):
            strategy.load_state_dict({"p_g": [[0.5, 0.5]], "alpha": {}, "has_target": True})


class TestFailure:
    def test_add_raises_naming_the_client_when_routing_has_the_wrong_number_of_layers(self):
        # Prepare
        layout = _layout(2)
        strategy = FedAlignMoE(layout)
        strategy.begin(layout.zeros(), round_idx=1)

        # Execute / Assert
        with pytest.raises(LayoutMismatch, match=r"^client 4 round 1: routing has 1 layers, layout has 2$"):
            strategy.add(_reader(4, 1, layout.zeros(), [_stats(SAME_MU)]))

    def test_add_raises_when_the_same_client_is_added_twice(self):
        # Prepare
        layout = _layout()
        strategy = FedAlignMoE(layout)
        strategy.begin(layout.zeros(), round_idx=1)
        strategy.add(_reader(4, 1, layout.zeros(), [_stats(SAME_MU)]))

        # Execute / Assert
        with pytest.raises(ValueError, match="client 4: update added twice"):
            strategy.add(_reader(4, 1, layout.zeros(), [_stats(SAME_MU)]))

    def test_finish_raises_when_called_twice_because_the_round_released_its_readers(self):
        # Prepare
        layout = _layout()
        strategy = FedAlignMoE(layout)
        _run(strategy, layout.zeros(), [_reader(4, 1, layout.zeros(), [_stats(SAME_MU)])])

        # Execute / Assert
        with pytest.raises(RuntimeError, match=r"before begin\(\)"):
            strategy.finish()

    def test_by_default_gamma_is_the_sigma_gate_alone_and_direction_consensus_restores_d(self):
        # Prepare: same signatures, opposite expert-1 updates (D = −1 would zero γ_01)
        layout = _layout()
        (a1, b1) = layout.expert_span(0, 1)
        d0, d1 = layout.zeros(), layout.zeros()
        d0[a1:b1], d1[a1:b1] = 1.0, -3.0
        readers = [_reader(0, 1, d0, [_stats(SAME_MU)]), _reader(1, 3, d1, [_stats(SAME_MU)])]

        # Execute
        with_d = _run(FedAlignMoE(layout, WITH_D), layout.zeros(), readers)
        without_d = _run(FedAlignMoE(layout), layout.zeros(), readers)

        # Assert: with D the expert keeps its value; without, π = n-share [1, 3]/4 merges it. D over the
        # experts' pairs: expert 0's updates are both zero (D = 0), expert 1's opposite (D = −1); none without D
        np.testing.assert_array_equal(with_d.payload[a1:b1], 0.0)
        assert with_d.report["consensus_mean"] == pytest.approx(-0.5)
        assert with_d.report["consensus_negative_frac"] == 0.5
        assert "consensus_mean" not in without_d.report
        np.testing.assert_allclose(without_d.payload[a1:b1], 0.25 * 1 + 0.75 * -3.0)

    @pytest.mark.parametrize("expert_agg", ["global", "personalized"])
    def test_function_space_consensus_merges_updates_whose_factor_deltas_disagree(self, expert_agg):
        # Prepare: per expert a LoRA pair A [1, 2], B [2, 1]; start A = [3, 0], B = 0 (LoRA's init).
        # Both clients move B by [0.1, 0]ᵀ and A by ±[0, 1]: the factor deltas' cosine is −0.99/1.01,
        # the effective-weight changes ΔW_i = ΔB_i·(A + ΔA_i) have cosine 8/10.
        specs = [EntrySpec("l0.gate.weight", "router", 0, None, (E, H))]
        for e in range(E):
            specs += [EntrySpec(f"l0.e{e}.lora_A.w", "expert", 0, e, (1, 2)),
                      EntrySpec(f"l0.e{e}.lora_B.w", "expert", 0, e, (2, 1))]
        layout = PayloadLayout.build(specs)
        a, b = layout.expert_span(0, 1)
        start = layout.zeros()
        start[a : a + 2] = [3.0, 0.0]
        d0, d1 = layout.zeros(), layout.zeros()
        d0[a:b], d1[a:b] = [0.0, 1.0, 0.1, 0.0], [0.0, -1.0, 0.1, 0.0]
        readers = [_reader(0, 1, d0, [_stats(SAME_MU)]), _reader(1, 3, d1, [_stats(SAME_MU)])]

        def merged(space: str) -> np.ndarray:
            options = FedAlignOptions(direction_consensus=True, consensus_space=space, expert_agg=expert_agg)
            return _run(FedAlignMoE(layout, options), start, readers).payload[a:b]

        # Execute
        factors, function = merged("factors"), merged("function")

        # Assert: in factor space D < 0 and the expert keeps its start; in function space π = [1, 3]/4 merges it
        np.testing.assert_array_equal(factors, start[a:b])
        np.testing.assert_allclose(function, start[a:b] + 0.25 * d0[a:b] + 0.75 * d1[a:b], rtol=1e-6)

    def test_function_space_needs_the_direction_consensus_it_measures(self):
        # Execute / Assert
        with pytest.raises(ValidationError, match="consensus_space='function' measures D"):
            FedAlignOptions(consensus_space="function")

    def test_personalized_needs_semantic_aggregation(self):
        # Execute / Assert
        with pytest.raises(ValidationError, match="expert_agg='personalized' needs semantic=true"):
            FedAlignOptions(expert_agg="personalized", semantic=False)

    def test_personalized_clients_keep_their_gamma_weighted_view_and_train_from_it(self):
        # Prepare: same signatures; expert 0 updates agree (D = 1), expert 1 updates are opposite (D = −1)
        layout = _layout()
        (a0, b0), (a1, b1) = layout.expert_span(0, 0), layout.expert_span(0, 1)
        d0, d1 = layout.zeros(), layout.zeros()
        d0[a0:b0], d1[a0:b0] = 1.0, 3.0
        d0[a1:b1], d1[a1:b1] = 1.0, -1.0
        strategy = FedAlignMoE(layout, FedAlignOptions(direction_consensus=True, expert_agg="personalized"))

        # Execute
        result = _run(strategy, layout.zeros(),
                      [_reader(0, 1, d0, [_stats(SAME_MU)]), _reader(1, 3, d1, [_stats(SAME_MU)])])

        # Assert: views — expert 0: (1 + 3)/2 for both; expert 1: γ_01 = 0, each keeps its own θ
        block = layout.expert_block[0]
        own0, own1 = _own(strategy.configure(0, 2, seed=0), layout), _own(strategy.configure(1, 2, seed=0), layout)
        np.testing.assert_allclose(own0[a0 - block : b0 - block], 2.0)
        np.testing.assert_allclose(own1[a0 - block : b0 - block], 2.0)
        np.testing.assert_allclose(own0[a1 - block : b1 - block], 1.0)
        np.testing.assert_allclose(own1[a1 - block : b1 - block], -1.0)
        assert strategy.configure(2, 2, seed=0).start is None
        # the global merge is eq. 12 as without the option: π = [1, 3]/4 on expert 0, expert 1 kept
        np.testing.assert_allclose(result.payload[a0:b0], 0.25 * 1 + 0.75 * 3)
        np.testing.assert_array_equal(result.payload[a1:b1], 0.0)

        # Execute: round 2, client 0 returns with no change; its θ is its own view, not the global expert
        g = result.payload
        _run(strategy, g, [_reader(0, 1, layout.zeros(), [_stats(SAME_MU)], round_idx=2)], round_idx=2)

        # Assert
        np.testing.assert_allclose(_own(strategy.configure(0, 3, seed=0), layout), own0)
        restored = FedAlignMoE(layout, FedAlignOptions(direction_consensus=True, expert_agg="personalized"))
        restored.load_state_dict(strategy.state_dict())
        np.testing.assert_allclose(_own(restored.configure(0, 3, seed=0), layout), own0)

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("gating", "maybe"),
            ("score_mode", "x"),
            ("reg_lambda", -1.0),
            ("soft_temperature", 0.0),
            ("beta", float("inf")),
        ],
    )
    def test_options_raise_naming_the_field_when_a_value_is_invalid(self, field, value):
        # Execute / Assert
        with pytest.raises(ValidationError) as err:
            FedAlignOptions(**{field: value})
        assert [e["loc"] for e in err.value.errors()] == [(field,)]
