"""PayloadLayout: canonical order, offsets, contiguous spans, and the checks at the boundary."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregation import PAYLOAD_DTYPE, EntrySpec, LayoutMismatch, PayloadLayout
from aggregation.payload import payload_class

# Given out of order on purpose. Sizes: a 3, b 6, c 4, d 3, e 6, f 3, e2 2, g 3, h 1 (scalar).
A = EntrySpec("l1.experts.lora_A", "expert", 1, 0, (1, 3), axis=0, start=0, stop=1)
B = EntrySpec("l1.gate.weight", "router", 1, None, (2, 3))
C = EntrySpec("attn.lora_A", "shared", None, None, (4,))
D = EntrySpec("l0.experts.lora_A", "expert", 0, 1, (1, 3), axis=0, start=1, stop=2)
E = EntrySpec("l0.gate.weight", "router", 0, None, (2, 3))
F = EntrySpec("l0.experts.lora_A", "expert", 0, 0, (1, 3), axis=0, start=0, stop=1)
E2 = EntrySpec("l0.gate.bias", "router", 0, None, (2,))
G = EntrySpec("l0.experts.lora_B", "expert", 0, 0, (3, 1), axis=1, start=0, stop=1)
H = EntrySpec("lm_head.scale", "shared", None, None, ())
SPECS = [A, B, C, D, E, F, E2, G, H]


@pytest.fixture(scope="module")
def layout() -> PayloadLayout:
    return PayloadLayout.build(SPECS)


class TestPayloadLayoutBuildSuccess:
    def test_build_orders_shared_then_routers_by_layer_then_experts_by_layer_and_expert(self, layout):
        # Prepare
        expected = [
            "attn.lora_A",
            "lm_head.scale",
            "l0.gate.weight",
            "l0.gate.bias",
            "l1.gate.weight",
            "l0.experts.lora_A[expert=0]",
            "l0.experts.lora_B[expert=0]",
            "l0.experts.lora_A[expert=1]",
            "l1.experts.lora_A[expert=0]",
        ]

        # Execute
        keys = [e.key for e in layout]

        # Assert
        assert keys == expected

    def test_build_assigns_consecutive_offsets_and_sizes_when_shapes_differ(self, layout):
        # Execute
        placed = [(e.key, e.offset, e.size) for e in layout]

        # Assert
        assert placed == [
            ("attn.lora_A", 0, 4),
            ("lm_head.scale", 4, 1),
            ("l0.gate.weight", 5, 6),
            ("l0.gate.bias", 11, 2),
            ("l1.gate.weight", 13, 6),
            ("l0.experts.lora_A[expert=0]", 19, 3),
            ("l0.experts.lora_B[expert=0]", 22, 3),
            ("l0.experts.lora_A[expert=1]", 25, 3),
            ("l1.experts.lora_A[expert=0]", 28, 3),
        ]
        assert layout.total == 31
        assert len(layout) == 9
        assert layout.nbytes == 124

    def test_build_gives_contiguous_expert_spans_when_an_expert_has_several_tensors(self, layout):
        # Execute
        spans = {k: layout.expert_span(*k) for k in layout.expert_keys()}

        # Assert
        assert layout.expert_keys() == [(0, 0), (0, 1), (1, 0)]
        assert spans == {(0, 0): (19, 25), (0, 1): (25, 28), (1, 0): (28, 31)}

    def test_build_gives_contiguous_router_spans_when_a_router_has_several_tensors(self, layout):
        # Execute
        spans = {layer: layout.router_span(layer) for layer in layout.router_layers()}

        # Assert
        assert layout.router_layers() == [0, 1]
        assert spans == {0: (5, 13), 1: (13, 19)}
        assert layout.num_layers == 2

    def test_build_keeps_the_model_order_when_entries_share_a_group(self):
        # Prepare: B-before-A inside expert (0, 0)
        first = EntrySpec("l0.experts.lora_B", "expert", 0, 0, (3, 1), axis=1, start=0, stop=1)
        second = EntrySpec("l0.experts.lora_A", "expert", 0, 0, (1, 3), axis=0, start=0, stop=1)

        # Execute
        layout = PayloadLayout.build([first, second])

        # Assert
        assert [e.param for e in layout] == ["l0.experts.lora_B", "l0.experts.lora_A"]
        assert layout.expert_span(0, 0) == (0, 6)

    def test_build_keeps_slice_fields_when_an_entry_is_an_expert_slice(self, layout):
        # Execute
        (entry,) = layout.select(role="expert", layer=0, expert=1)

        # Assert
        assert (entry.param, entry.shape, entry.axis, entry.start, entry.stop) == ("l0.experts.lora_A", (1, 3), 0, 1, 2)
        assert entry.key == "l0.experts.lora_A[expert=1]"

    def test_build_returns_an_empty_layout_when_there_are_no_specs(self):
        # Execute
        layout = PayloadLayout.build([])

        # Assert
        assert (layout.total, len(layout), layout.num_layers, layout.expert_keys()) == (0, 0, 0, [])

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["shared", "router", "expert"]),
                st.integers(0, 3),
                st.integers(0, 3),
                st.lists(st.integers(1, 3), min_size=0, max_size=2),
            ),
            max_size=12,
        )
    )
    def test_build_places_every_entry_once_with_contiguous_spans_when_specs_are_random(self, raw):
        # Prepare
        specs = [
            EntrySpec(
                f"p{i}",
                role,
                None if role == "shared" else layer,
                expert if role == "expert" else None,
                tuple(shape),
            )
            for i, (role, layer, expert, shape) in enumerate(raw)
        ]

        # Execute
        layout = PayloadLayout.build(specs)

        # Assert: offsets tile [0, total) in canonical order
        sizes = [int(np.prod(s.shape)) for s in specs]
        assert layout.total == sum(sizes)
        ends = [e.offset + e.size for e in layout]
        assert [e.offset for e in layout] == [0, *ends][:-1]
        rank = {"shared": 0, "router": 1, "expert": 2}
        order = [(rank[e.role], e.layer or 0, e.expert or 0) for e in layout]
        assert order == sorted(order)
        # Assert: each expert's and each router's entries form one span of their summed size
        for layer, expert in layout.expert_keys():
            mine = layout.select(role="expert", layer=layer, expert=expert)
            lo, hi = layout.expert_span(layer, expert)
            assert (lo, hi) == (mine[0].offset, mine[0].offset + sum(e.size for e in mine))
            assert hi == mine[-1].offset + mine[-1].size
        for layer in layout.router_layers():
            mine = layout.select(role="router", layer=layer)
            lo, hi = layout.router_span(layer)
            assert (lo, hi) == (mine[0].offset, mine[0].offset + sum(e.size for e in mine))


class TestPayloadLayoutBuildFailure:
    def test_build_raises_layout_mismatch_when_a_tensor_appears_twice(self):
        # Prepare
        specs = [C, E, C]

        # Execute / Assert
        with pytest.raises(LayoutMismatch, match="duplicate"):
            PayloadLayout.build(specs)

    def test_build_raises_layout_mismatch_when_an_expert_slice_appears_twice(self):
        # Prepare
        twin = EntrySpec("l0.experts.lora_A", "expert", 0, 0, (1, 3), axis=0, start=1, stop=2)

        # Execute / Assert
        with pytest.raises(LayoutMismatch, match="duplicate"):
            PayloadLayout.build([F, twin])

    @pytest.mark.parametrize(
        ("spec", "message"),
        [
            (EntrySpec("l0.gate.w", "router", None, None, (2, 3)), "l0.gate.w: role router needs a layer index"),
            (EntrySpec("l0.experts.w", "expert", None, 0, (3,)), "l0.experts.w: role expert needs a layer index"),
            (EntrySpec("l0.experts.w", "expert", 0, None, (3,)), "l0.experts.w: role expert needs an expert index"),
        ],
        ids=["router-without-layer", "expert-without-layer", "expert-without-expert"],
    )
    def test_build_raises_layout_mismatch_when_an_index_is_missing(self, spec, message):
        # Execute / Assert
        with pytest.raises(LayoutMismatch, match=message):
            PayloadLayout.build([C, spec])


class TestPayloadLayoutQueries:
    def test_select_returns_matching_entries_in_buffer_order_when_filtering_by_role_and_layer(self, layout):
        # Execute
        keys = [e.key for e in layout.select(role="expert", layer=0)]

        # Assert
        assert keys == ["l0.experts.lora_A[expert=0]", "l0.experts.lora_B[expert=0]", "l0.experts.lora_A[expert=1]"]
        assert [e.key for e in layout.select(layer=1)] == ["l1.gate.weight", "l1.experts.lora_A[expert=0]"]
        assert len(layout.select()) == 9

    def test_zeros_returns_a_float32_buffer_of_the_layout_size(self, layout):
        # Execute
        buf = layout.zeros()

        # Assert
        assert buf.dtype == PAYLOAD_DTYPE
        assert buf.shape == (31,)
        assert not buf.any()


class TestPayloadLayoutCheck:
    def test_check_accepts_a_buffer_when_size_and_dtype_match(self, layout):
        # Execute / Assert (no raise)
        layout.check(np.ones(31, dtype=np.float32), what="client 2 round 1 delta")

    def test_check_raises_naming_what_was_checked_when_size_is_wrong(self, layout):
        # Prepare
        buf = np.zeros(30, dtype=np.float32)

        # Execute / Assert
        with pytest.raises(LayoutMismatch, match=r"^client 2 round 1 delta: has 30 values, layout expects 31$"):
            layout.check(buf, what="client 2 round 1 delta")

    def test_check_raises_naming_what_was_checked_when_buffer_is_not_flat(self, layout):
        # Prepare: right number of values, wrong shape
        buf = np.zeros((1, 31), dtype=np.float32)

        # Execute / Assert
        with pytest.raises(LayoutMismatch, match=r"^round 3 global payload: "):
            layout.check(buf, what="round 3 global payload")

    def test_check_raises_naming_what_was_checked_when_dtype_is_wrong(self, layout):
        # Prepare
        buf = np.zeros(31, dtype=np.float64)

        # Execute / Assert
        with pytest.raises(LayoutMismatch, match=r"^client 2 round 1 delta: dtype float64, layout expects float32$"):
            layout.check(buf, what="client 2 round 1 delta")


def test_expert_block_is_the_one_span_holding_every_expert_entry():
    # Prepare: specs given out of canonical order
    layout = PayloadLayout.build([
        EntrySpec("e1", "expert", 0, 1, (3,)),
        EntrySpec("attn", "shared", None, None, (2,)),
        EntrySpec("e0", "expert", 0, 0, (3,)),
        EntrySpec("gate", "router", 0, None, (2, 1)),
    ])

    # Execute / Assert: shared 0:2, router 2:4, experts 4:10
    assert layout.expert_block == (4, 10)
    assert PayloadLayout.build([EntrySpec("w", "shared", None, None, (2,))]).expert_block == (2, 2)


def test_class_bytes_split_routers_by_layer_and_experts_by_layer_and_expert():
    # Prepare
    layout = PayloadLayout.build([
        EntrySpec("attn", "shared", None, None, (2,)),
        EntrySpec("gate", "router", 0, None, (2, 1)),
        EntrySpec("e0", "expert", 0, 0, (3,)),
        EntrySpec("e1", "expert", 0, 1, (3,)),
    ])

    # Execute
    by_class = layout.class_bytes()

    # Assert
    assert by_class == {"shared": 8, "router/L0": 8, "expert/L0/E0": 12, "expert/L0/E1": 12}
    assert sum(by_class.values()) == layout.nbytes
    assert [payload_class(k) for k in (*by_class, "routing_stats")] == [
        ("shared", -1, -1), ("router", 0, -1), ("expert", 0, 0), ("expert", 0, 1), ("routing_stats", -1, -1)]
