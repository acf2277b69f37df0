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
    sends every token to expert e alone with weight 1: top-k indices [tokens, 1]
    for fused experts, Switch's one-hot dispatch [tokens, 1, E] otherwise.
    """
    x = torch.randn(5, hidden, generator=torch.Generator().manual_seed(0))
    weights = torch.ones(5, 1)
    fused = family_of(model).fused_experts

    def to_expert(e: int) -> torch.Tensor:
        index = torch.full((5, 1), e)
        return index if fused else torch.nn.functional.one_hot(index, num_experts)

    return torch.stack(
        [
            torch.stack([experts(x, to_expert(e), weights) for e in range(num_experts)])
            for experts in family_of(model).experts_modules(model)
        ]
    )


def test_build_layout_gives_each_trainable_tensor_a_role(tiny: TinyMoE, family_name: str) -> None:
    # Execute
    layout = build_layout(tiny.lora(family_name))

    # Assert
    router = (tiny.experts, tiny.hidden)
    moe_layers = tiny.moe_layers(family_name)  # 2; Switch: 2 encoder + 2 decoder
    assert [(e.layer, e.shape) for e in layout.select(role="router")] == [(ll, router) for ll in range(moe_layers)]
    shared_experts = len(family_spec(family_name).shared_projections)  # Qwen2-MoE's always-on expert: 3 projections
    attention = ("SelfAttention", "EncDecAttention") if tiny.encoder_decoder(family_name) else ("self_attn",)
    assert all((any(a in e.param for a in attention) or "shared_expert" in e.param) and "lora_" in e.param
               for e in layout.select(role="shared"))
    attention_adapters = tiny.attention_adapters(family_name)  # 4 per layer; Switch: 4 per encoder, 8 per decoder layer
    assert len(layout.select(role="shared")) == (attention_adapters + tiny.layers * shared_experts) * 2
    assert len(layout.select(role="expert")) == moe_layers * tiny.experts * 4
    pieces = sorted((e.shape, e.axis) for e in layout.select(role="expert", layer=1, expert=2))
    r, h, i, up = tiny.rank, tiny.hidden, tiny.inter, tiny.up_width(family_name)
    if family_spec(family_name).fused_experts:
        # A slices: expert axis 0 of [E, r, d_in]; B slices: expert axis 2 of [d_out, r, E]
        assert pieces == sorted([((r, h), 0), ((up, r), 2), ((r, i), 0), ((h, r), 2)])
    else:  # Switch: each factor of expert e's own wi [I, H] and wo [H, I], whole
        assert pieces == sorted([((r, h), None), ((up, r), None), ((r, i), None), ((h, r), None)])


def test_build_layout_gives_contiguous_expert_spans(tiny: TinyMoE, family_name: str) -> None:
    # Execute
    layout = build_layout(tiny.lora(family_name))

    # Assert: experts by (layer, expert), each one block of values, back to back after the routers;
    # one expert of one layer: gate_up A r·H + B 2I·r, down A r·I + B H·r (Switch: wi A r·H + B I·r, wo likewise)
    expert_size = tiny.rank * (tiny.hidden + tiny.up_width(family_name) + tiny.inter + tiny.hidden)
    moe_layers = tiny.moe_layers(family_name)
    keys = layout.expert_keys()
    assert keys == [(layer, e) for layer in range(moe_layers) for e in range(tiny.experts)]
    first = layout.expert_span(0, 0)[0]
    assert first == layout.router_span(moe_layers - 1)[1]
    for i, (layer, e) in enumerate(keys):
        lo, hi = layout.expert_span(layer, e)
        assert (lo, hi) == (first + i * expert_size, first + (i + 1) * expert_size)
        entries = layout.select(role="expert", layer=layer, expert=e)
        assert (entries[0].offset, entries[-1].offset + entries[-1].size) == (lo, hi)
    assert layout.total == first + moe_layers * tiny.experts * expert_size


def test_build_layout_gives_each_switch_expert_entry_exactly_that_experts_factors(tiny: TinyMoE) -> None:
    # Prepare: random LoRA factors, set on the model (not through the payload)
    model = tiny.lora("switch_transformers")
    names = {id(p): n for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p))

    # Execute
    layout = build_layout(model)
    payload = read_payload(model, layout)

    # Assert: MoE layer ℓ < L is encoder block ℓ, ℓ ≥ L decoder block ℓ − L; each (ℓ, e) entry is one whole
    # factor of that block's expert_e, and its span of the payload holds that factor's values
    for layer in range(tiny.moe_layers("switch_transformers")):
        stack, block = ("encoder", layer) if layer < tiny.layers else ("decoder", layer - tiny.layers)
        for e in range(tiny.experts):
            experts = family_of(model).experts_modules(model)[layer]
            assert isinstance(experts, torch.nn.ModuleDict)
            expert = experts[f"expert_{e}"]
            factors = {names[id(p)]: p for p in expert.parameters() if p.requires_grad}
            entries = layout.select(role="expert", layer=layer, expert=e)
            assert sorted(entry.param for entry in entries) == sorted(factors)
            assert len(factors) == 4 and all(f".{stack}.block.{block}." in n for n in factors)
            for entry in entries:
                assert entry.axis is None and entry.shape == tuple(factors[entry.param].shape)
                values = payload[entry.offset : entry.offset + entry.size]
                np.testing.assert_array_equal(values, factors[entry.param].detach().numpy().reshape(-1))


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


@pytest.mark.parametrize(("layer", "expert"), [(0, 0), (0, 3), (1, 1), (-1, 2)])  # -1: the last MoE layer
def test_write_payload_perturbing_one_expert_changes_only_that_expert(
    tiny: TinyMoE, family_name: str, layer: int, expert: int
) -> None:
    # Prepare: random LoRA factors everywhere (B starts at zero, which would hide a wrong A slice)
    layer %= tiny.moe_layers(family_name)
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
    assert after.shape[0] == tiny.moe_layers(family_name)
    for ll in range(tiny.moe_layers(family_name)):
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
