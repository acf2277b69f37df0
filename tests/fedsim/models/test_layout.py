"""The payload layout of a peft model, and in-place reads and writes of the payload."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from peft import PeftModel

from aggregation.errors import LayoutMismatch
from fedsim.models import build_layout, family_of, read_payload, write_payload
from fedsim.models.registry import family_spec

if TYPE_CHECKING:
    from tests.fedsim.models.conftest import TinyMoE

def _random_payload(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 0.1, size).astype(np.float32)


@torch.no_grad()
def _expert_outputs(model: PeftModel, hidden: int, num_experts: int) -> torch.Tensor:
    """Each expert's FFN output on fixed hidden states, [MoE layer, expert, token, H].

    The experts module (with its LoRA wrappers) is called with a routing that
    sends every token to expert e alone with weight 1.
    """
    x = torch.randn(5, hidden, generator=torch.Generator().manual_seed(0))
    weights = torch.ones(5, 1)
    return torch.stack(
        [
            torch.stack([experts(x, torch.full((5, 1), e), weights) for e in range(num_experts)])
            for experts in family_of(model).experts_modules(model)
        ]
    )


def test_build_layout_gives_each_trainable_tensor_a_role(tiny: TinyMoE, family_name: str) -> None:
    # Execute
    layout = build_layout(tiny.lora(family_name))

    # Assert
    router = (tiny.experts, tiny.hidden)
    assert [(e.layer, e.shape) for e in layout.select(role="router")] == [(0, router), (1, router)]
    shared_experts = len(family_spec(family_name).shared_projections)  # Qwen2-MoE's always-on expert: 3 projections
    assert all(("self_attn" in e.param or "shared_expert" in e.param) and "lora_" in e.param
               for e in layout.select(role="shared"))
    assert len(layout.select(role="shared")) == tiny.layers * (4 + shared_experts) * 2
    assert len(layout.select(role="expert")) == tiny.layers * tiny.experts * 4
    pieces = sorted((e.shape, e.axis) for e in layout.select(role="expert", layer=1, expert=2))
    r, h, i = tiny.rank, tiny.hidden, tiny.inter
    # A slices: expert axis 0 of [E, r, d_in]; B slices: expert axis 2 of [d_out, r, E]
    assert pieces == sorted([((r, h), 0), ((2 * i, r), 2), ((r, i), 0), ((h, r), 2)])


def test_build_layout_gives_contiguous_expert_spans(tiny: TinyMoE, family_name: str) -> None:
    # Execute
    layout = build_layout(tiny.lora(family_name))

    # Assert: experts by (layer, expert), each one block of values, back to back after the routers;
    # one expert of one layer: gate_up A r·H + B 2I·r, down A r·I + B H·r
    expert_size = tiny.rank * (2 * tiny.hidden + 3 * tiny.inter)
    keys = layout.expert_keys()
    assert keys == [(layer, e) for layer in range(tiny.layers) for e in range(tiny.experts)]
    first = layout.expert_span(0, 0)[0]
    assert first == layout.router_span(tiny.layers - 1)[1]
    for i, (layer, e) in enumerate(keys):
        lo, hi = layout.expert_span(layer, e)
        assert (lo, hi) == (first + i * expert_size, first + (i + 1) * expert_size)
        entries = layout.select(role="expert", layer=layer, expert=e)
        assert (entries[0].offset, entries[-1].offset + entries[-1].size) == (lo, hi)
    assert layout.total == first + tiny.layers * tiny.experts * expert_size


def test_read_payload_after_write_payload_is_exact(tiny: TinyMoE, family_name: str) -> None:
    # Prepare
    model = tiny.lora(family_name)
    layout = build_layout(model)
    payload = _random_payload(layout.total, seed=1)

    # Execute
    write_payload(model, layout, payload)
    back = read_payload(model, layout)

    # Assert
    assert back.dtype == np.float32 and np.array_equal(back, payload)
    write_payload(model, layout, back)
    assert np.array_equal(read_payload(model, layout), payload)


@pytest.mark.parametrize(("layer", "expert"), [(0, 0), (0, 3), (1, 1)])
def test_write_payload_perturbing_one_expert_changes_only_that_expert(
    tiny: TinyMoE, family_name: str, layer: int, expert: int
) -> None:
    # Prepare: random LoRA factors everywhere (B starts at zero, which would hide a wrong A slice)
    model = tiny.lora(family_name)
    layout = build_layout(model)
    payload = _random_payload(layout.total, seed=2)
    write_payload(model, layout, payload)
    before = _expert_outputs(model, tiny.hidden, tiny.experts)
    lo, hi = layout.expert_span(layer, expert)
    payload[lo:hi] += 0.5

    # Execute
    write_payload(model, layout, payload)
    after = _expert_outputs(model, tiny.hidden, tiny.experts)

    # Assert
    for ll in range(tiny.layers):
        for e in range(tiny.experts):
            if (ll, e) == (layer, expert):
                assert (after[ll, e] - before[ll, e]).abs().max() > 1e-3
            else:
                assert torch.equal(after[ll, e], before[ll, e]), (ll, e)


def test_write_payload_updates_parameters_in_place(tiny: TinyMoE) -> None:
    # Prepare
    model = tiny.lora("mixtral")
    layout = build_layout(model)
    before = {n: (id(p), p.data_ptr()) for n, p in model.named_parameters()}

    # Execute
    write_payload(model, layout, _random_payload(layout.total, seed=3))

    # Assert
    assert {n: (id(p), p.data_ptr()) for n, p in model.named_parameters()} == before


def test_write_payload_accepts_read_only_buffer_without_warning(tiny: TinyMoE) -> None:
    # Prepare: object-store buffers arrive read-only
    model = tiny.lora("qwen3_moe")
    layout = build_layout(model)
    payload = _random_payload(layout.total, seed=4)
    payload.flags.writeable = False

    # Execute
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_payload(model, layout, payload)

    # Assert
    assert np.array_equal(read_payload(model, layout), payload)


def test_write_payload_raises_layout_mismatch_for_wrong_size(tiny: TinyMoE) -> None:
    model = tiny.lora("mixtral")
    layout = build_layout(model)
    expected = rf"^payload: has {layout.total - 1} values, layout expects {layout.total}$"
    with pytest.raises(LayoutMismatch, match=expected):
        write_payload(model, layout, np.zeros(layout.total - 1, dtype=np.float32))


def test_write_payload_raises_layout_mismatch_for_model_without_the_tensors(tiny: TinyMoE) -> None:
    layout = build_layout(tiny.lora("mixtral"))
    other = tiny.lora("mixtral", lora_experts=False)
    with pytest.raises(LayoutMismatch, match=r"^model has no parameter '.*mlp\.experts\..*lora_A"):
        write_payload(other, layout, layout.zeros())


def test_build_layout_splits_fully_trained_fused_experts_by_expert(tiny: TinyMoE) -> None:
    # Prepare: attention LoRA only, plus layer 1's gate_up_proj trained in full
    model = tiny.lora("mixtral", lora_experts=False)
    fused = family_of(model).experts_modules(model)[1].gate_up_proj
    fused.requires_grad_(True)
    layout = build_layout(model)
    payload = read_payload(model, layout)
    original = fused.detach().clone()

    # Execute
    lo, hi = layout.expert_span(1, 2)
    payload[lo:hi] = 7.0
    write_payload(model, layout, payload)

    # Assert
    assert [(e.shape, e.axis, e.start, e.stop) for e in layout.select(role="expert", layer=1, expert=2)] == [
        ((2 * tiny.inter, tiny.hidden), 0, 2, 3)
    ]
    assert hi - lo == 2 * tiny.inter * tiny.hidden
    assert torch.all(fused[2] == 7.0)
    assert torch.equal(fused[[0, 1, 3]], original[[0, 1, 3]])
