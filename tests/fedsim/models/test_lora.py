"""LoRA on attention and fused experts; routers trainable in full."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest
import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import ParamWrapper
from torch import nn

from aggregation.errors import ConfigError
from fedsim.models import apply_lora, family_of
from fedsim.models.registry import family_spec

if TYPE_CHECKING:
    from tests.fedsim.models.conftest import TinyMoE


def _expert_wrappers(model: nn.Module, layer: int) -> dict[str, ParamWrapper]:
    """The peft wrappers of one MoE layer's experts, by the fused tensor they adapt."""
    module = family_of(model).experts_modules(model)[layer]
    out = {}
    while isinstance(module, ParamWrapper):
        out[module.parameter_name] = module
        module = module.base_layer
    return out


def test_apply_lora_trains_only_lora_factors_and_routers(tiny: TinyMoE, family_name: str) -> None:
    # Execute
    model = apply_lora(tiny.model(family_name), rank=tiny.rank, alpha=tiny.alpha, dropout=0.0)

    # Assert
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    routers = [n for n in trainable if "lora_" not in n]
    assert routers == [f"base_model.model.model.layers.{i}.mlp.gate.weight" for i in range(tiny.layers)]
    # per layer: 4 attention projections × (A, B) + 2 fused tensors × (A, B) + shared-expert projections × (A, B)
    shared_experts = len(family_spec(family_name).shared_projections)
    assert len(trainable) - len(routers) == tiny.layers * (4 * 2 + 2 * 2 + shared_experts * 2)


def test_apply_lora_stacks_expert_factors_along_rank_axis(tiny: TinyMoE, family_name: str) -> None:
    # Execute
    model = apply_lora(tiny.model(family_name), rank=tiny.rank, alpha=tiny.alpha, dropout=0.0)
    wrappers = _expert_wrappers(model, layer=0)

    # Assert: A [r·E, d_in], B [d_out, r·E] for a fused tensor [E, d_out, d_in]
    gate_up, down = wrappers["gate_up_proj"], wrappers["down_proj"]
    assert gate_up.lora_A["default"].weight.shape == (tiny.rank * tiny.experts, tiny.hidden)
    assert gate_up.lora_B["default"].weight.shape == (2 * tiny.inter, tiny.rank * tiny.experts)
    assert down.lora_A["default"].weight.shape == (tiny.rank * tiny.experts, tiny.inter)
    assert down.lora_B["default"].weight.shape == (tiny.hidden, tiny.rank * tiny.experts)


def test_apply_lora_expert_delta_uses_expert_major_a_and_expert_minor_b(tiny: TinyMoE, family_name: str) -> None:
    # Prepare
    model = apply_lora(tiny.model(family_name), rank=tiny.rank, alpha=tiny.alpha, dropout=0.0)
    wrapper = _expert_wrappers(model, layer=1)["gate_up_proj"]
    a, b = wrapper.lora_A["default"].weight, wrapper.lora_B["default"].weight
    with torch.no_grad():
        a.copy_(torch.randn_like(a))
        b.copy_(torch.randn_like(b))

    # Execute
    delta = wrapper.get_delta_weight("default")  # [E, 2I, H]

    # Assert: expert e's A = rows e·r..(e+1)·r−1, its B = columns e, e+E, …
    for e in range(tiny.experts):
        a_e = a[e * tiny.rank : (e + 1) * tiny.rank]
        b_e = b[:, e::tiny.experts]
        torch.testing.assert_close(delta[e], (tiny.alpha / tiny.rank) * b_e @ a_e)


def test_apply_lora_leaves_outputs_unchanged_at_init(tiny: TinyMoE, family_name: str) -> None:
    # Prepare
    base = tiny.model(family_name)
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    with torch.no_grad():
        expected = base(input_ids=ids).logits

    # Execute
    model = apply_lora(base, rank=tiny.rank, alpha=tiny.alpha, dropout=0.0)

    # Assert
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected)


def test_apply_lora_gradients_reach_routers_and_expert_factors(tiny: TinyMoE, family_name: str) -> None:
    # Prepare
    model = apply_lora(tiny.model(family_name), rank=tiny.rank, alpha=tiny.alpha, dropout=0.0)
    ids = torch.tensor([[4, 8, 15, 16, 23, 42], [1, 2, 3, 5, 8, 13]])

    # Execute
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()

    # Assert (B starts at zero, so A's first gradient is zero: check B)
    router = family_of(model).routers(model)[0]
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    b = _expert_wrappers(model, layer=0)["down_proj"].lora_B["default"].weight
    assert b.grad is not None and b.grad.abs().sum() > 0


def test_apply_lora_same_seed_gives_same_factors(tiny: TinyMoE) -> None:
    # Execute
    a = apply_lora(tiny.model("mixtral"), rank=tiny.rank, alpha=tiny.alpha, dropout=0.0, seed=5)
    b = apply_lora(tiny.model("mixtral"), rank=tiny.rank, alpha=tiny.alpha, dropout=0.0, seed=5)
    c = apply_lora(tiny.model("mixtral"), rank=tiny.rank, alpha=tiny.alpha, dropout=0.0, seed=6)

    # Assert
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    name = "base_model.model.model.layers.0.mlp.experts.lora_A.default.weight"
    assert torch.equal(pa[name], pb[name]) and not torch.equal(pa[name], pc[name])


def test_apply_lora_without_experts_adapts_attention_only(tiny: TinyMoE) -> None:
    # Execute
    model = apply_lora(tiny.model("qwen3_moe"), rank=tiny.rank, alpha=tiny.alpha, dropout=0.0, lora_experts=False)

    # Assert
    lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert len(lora) == tiny.layers * 4 * 2 and all("self_attn" in n for n in lora)


def test_apply_lora_without_attention_adapts_experts_only(tiny: TinyMoE) -> None:
    # Execute
    model = apply_lora(tiny.model("mixtral"), rank=tiny.rank, alpha=tiny.alpha, dropout=0.1, lora_attention=False)

    # Assert
    lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert len(lora) == tiny.layers * 2 * 2 and all("mlp.experts" in n for n in lora)


def test_apply_lora_puts_dropout_on_attention_adapters_only(tiny: TinyMoE) -> None:
    # Execute
    model = apply_lora(tiny.model("mixtral"), rank=tiny.rank, alpha=tiny.alpha, dropout=0.25)

    # Assert
    attention = [m for m in model.modules() if isinstance(m, LoraLinear)]
    experts = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    assert len(attention) == tiny.layers * 4 and len(experts) == tiny.layers * 2
    assert all(isinstance(m.lora_dropout["default"], nn.Dropout) for m in attention)
    assert all(m.lora_dropout["default"].p == 0.25 for m in attention)
    assert all(isinstance(m.lora_dropout["default"], nn.Identity) for m in experts)


def test_apply_lora_raises_config_error_when_nothing_is_adapted(tiny: TinyMoE) -> None:
    with pytest.raises(ConfigError, match=r"^model\.lora: lora_attention and lora_experts are both off"):
        apply_lora(tiny.model("mixtral"), rank=2, alpha=1.0, dropout=0.0, lora_attention=False, lora_experts=False)
