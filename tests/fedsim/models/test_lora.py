"""LoRA on attention and experts (fused, or one module per expert); routers trainable in full."""

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


def _switch_expert(model: nn.Module, layer: int, expert: int) -> nn.Module:
    """Expert ``expert``'s own FFN module (``wi``, ``wo``) in MoE layer ``layer`` of a Switch model."""
    experts = family_of(model).experts_modules(model)[layer]
    assert isinstance(experts, nn.ModuleDict)
    return experts[f"expert_{expert}"]


def _switch_linear(model: nn.Module, layer: int, expert: int, name: str) -> LoraLinear:
    """Projection ``name`` (``wi`` or ``wo``) of a Switch expert, as peft's LoRA ``Linear``."""
    linear = _switch_expert(model, layer, expert).get_submodule(name)
    assert isinstance(linear, LoraLinear)
    return linear


def _factors(linear: LoraLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """The default adapter's LoRA factors (A [r, d_in], B [d_out, r]) of ``linear``."""
    a, b = linear.lora_A["default"], linear.lora_B["default"]
    assert isinstance(a, nn.Linear) and isinstance(b, nn.Linear)
    return a.weight, b.weight


def _switch_chosen_experts(tiny: TinyMoE, model: nn.Module, ids: torch.Tensor) -> list[set[int]]:
    """Per MoE layer of a Switch model, the experts it routes some token to (top-1 of its logits).

    The encoder reads ``ids``, the decoder the labels ``ids`` shifted.
    """
    with torch.no_grad():
        out = tiny.forward(model, ids, labels=ids, output_router_logits=True)
    return [set(logits.argmax(dim=-1).tolist()) for logits in tiny.router_logits(out)]


def _switch_router_and_expert_names(tiny: TinyMoE) -> tuple[list[str], list[str]]:
    """The parameter names of a LoRA-wrapped tiny Switch model's routers and experts' LoRA factors, in layer order.

    An encoder block's MoE sub-layer is ``layer.1`` (after self-attention), a decoder block's ``layer.2``
    (after self- and cross-attention).
    """
    routers: list[str] = []
    experts: list[str] = []
    for stack, sub_layer in (("encoder", 1), ("decoder", 2)):
        for i in range(tiny.layers):
            mlp = f"base_model.model.{stack}.block.{i}.layer.{sub_layer}.mlp"
            routers.append(f"{mlp}.router.classifier.weight")
            experts.extend(
                f"{mlp}.experts.expert_{e}.{linear}.lora_{factor}.default.weight"
                for e in range(tiny.experts)
                for linear in ("wi", "wo")
                for factor in ("A", "B")
            )
    return routers, experts


def test_apply_lora_trains_only_lora_factors_and_routers(tiny: TinyMoE, fused_family_name: str) -> None:
    # Execute
    model = apply_lora(tiny.model(fused_family_name), rank=tiny.rank, alpha=tiny.alpha, dropout=0.0)

    # Assert
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    routers = [n for n in trainable if "lora_" not in n]
    assert routers == [f"base_model.model.model.layers.{i}.mlp.gate.weight" for i in range(tiny.layers)]
    # per layer: 4 attention projections × (A, B) + 2 fused tensors × (A, B) + shared-expert projections × (A, B)
    shared_experts = len(family_spec(fused_family_name).shared_projections)
    assert len(trainable) - len(routers) == tiny.layers * (4 * 2 + 2 * 2 + shared_experts * 2)


def test_apply_lora_on_switch_trains_only_attention_and_expert_lora_factors_and_routers(tiny: TinyMoE) -> None:
    # Execute
    model = apply_lora(tiny.model("switch_transformers"), rank=tiny.rank, alpha=tiny.alpha, dropout=0.0)

    # Assert
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    routers, experts = _switch_router_and_expert_names(tiny)
    assert [n for n in trainable if "lora_" not in n] == routers
    assert [n for n in trainable if ".mlp.experts." in n] == experts
    attention = [n for n in trainable if "lora_" in n and ".mlp." not in n]
    assert all(("SelfAttention" in n or "EncDecAttention" in n) for n in attention)
    # encoder layer: self-attention q, k, v, o; decoder layer: also cross-attention; each × (A, B)
    assert len(attention) == tiny.attention_adapters("switch_transformers") * 2
    assert len(trainable) == len(routers) + len(experts) + len(attention)


def test_apply_lora_gives_each_switch_expert_its_own_factors(tiny: TinyMoE) -> None:
    # Execute
    model = apply_lora(tiny.model("switch_transformers"), rank=tiny.rank, alpha=tiny.alpha, dropout=0.0)

    # Assert: wi [I, H] gets A [r, H], B [I, r]; wo [H, I] gets A [r, I], B [H, r]; no factor shared
    storage = set()
    for layer in range(tiny.moe_layers("switch_transformers")):
        for e in range(tiny.experts):
            (wi_a, wi_b), (wo_a, wo_b) = (_factors(_switch_linear(model, layer, e, n)) for n in ("wi", "wo"))
            assert wi_a.shape == (tiny.rank, tiny.hidden) and wi_b.shape == (tiny.inter, tiny.rank)
            assert wo_a.shape == (tiny.rank, tiny.inter) and wo_b.shape == (tiny.hidden, tiny.rank)
            storage |= {factor.data_ptr() for factor in (wi_a, wi_b, wo_a, wo_b)}
    assert len(storage) == tiny.moe_layers("switch_transformers") * tiny.experts * 4
    assert not any(isinstance(m, ParamWrapper) for m in model.modules())


def test_apply_lora_switch_expert_output_moves_by_its_own_factors_only(tiny: TinyMoE) -> None:
    # Prepare: random factors on expert 1 of the first decoder MoE layer
    model = apply_lora(tiny.model("switch_transformers"), rank=tiny.rank, alpha=tiny.alpha, dropout=0.0)
    layer = tiny.layers  # first decoder MoE layer
    x = torch.randn(5, tiny.hidden, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = [_switch_expert(model, layer, e)(x) for e in range(tiny.experts)]
        wi = _switch_linear(model, layer, 1, "wi")
        a, b = _factors(wi)
        a.copy_(torch.randn_like(a))
        b.copy_(torch.randn_like(b))

    # Execute
    with torch.no_grad():
        after = [_switch_expert(model, layer, e)(x) for e in range(tiny.experts)]
        hidden = wi(x)

    # Assert: wi(x) = W x + (α / r) B A x for expert 1; every other expert computes what it did
    torch.testing.assert_close(hidden, wi.get_base_layer()(x) + (tiny.alpha / tiny.rank) * x @ a.T @ b.T)
    assert (after[1] - before[1]).abs().max() > 1e-3
    for e in (0, 2, 3):
        assert torch.equal(after[e], before[e]), e


def test_apply_lora_stacks_expert_factors_along_rank_axis(tiny: TinyMoE, fused_family_name: str) -> None:
    # Execute
    model = apply_lora(tiny.model(fused_family_name), rank=tiny.rank, alpha=tiny.alpha, dropout=0.0)
    wrappers = _expert_wrappers(model, layer=0)

    # Assert: A [r·E, d_in], B [d_out, r·E] for a fused tensor [E, d_out, d_in]
    gate_up, down = wrappers["gate_up_proj"], wrappers["down_proj"]
    assert gate_up.lora_A["default"].weight.shape == (tiny.rank * tiny.experts, tiny.hidden)
    assert gate_up.lora_B["default"].weight.shape == (2 * tiny.inter, tiny.rank * tiny.experts)
    assert down.lora_A["default"].weight.shape == (tiny.rank * tiny.experts, tiny.inter)
    assert down.lora_B["default"].weight.shape == (tiny.hidden, tiny.rank * tiny.experts)


def test_apply_lora_expert_delta_uses_expert_major_a_and_expert_minor_b(tiny: TinyMoE, fused_family_name: str) -> None:
    # Prepare
    model = apply_lora(tiny.model(fused_family_name), rank=tiny.rank, alpha=tiny.alpha, dropout=0.0)
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
        expected = tiny.forward(base, ids).logits

    # Execute
    model = apply_lora(base, rank=tiny.rank, alpha=tiny.alpha, dropout=0.0)

    # Assert
    with torch.no_grad():
        torch.testing.assert_close(tiny.forward(model, ids).logits, expected)


def test_apply_lora_gradients_reach_routers_and_expert_factors(tiny: TinyMoE, family_name: str) -> None:
    # Prepare
    model = apply_lora(tiny.model(family_name), rank=tiny.rank, alpha=tiny.alpha, dropout=0.0)
    ids = torch.tensor([[4, 8, 15, 16, 23, 42], [1, 2, 3, 5, 8, 13]])

    # Execute
    model.train()
    tiny.forward(model, ids, labels=ids).loss.backward()  # an encoder-decoder's decoder reads the shifted labels

    # Assert (B starts at zero, so A's first gradient is zero: check B)
    router = tiny.router_weight(family_of(model).routers(model)[0])
    assert router.grad is not None and router.grad.abs().sum() > 0
    if family_spec(family_name).fused_experts:
        b = _expert_wrappers(model, layer=0)["down_proj"].lora_B["default"].weight
        assert b.grad is not None and b.grad.abs().sum() > 0
    else:  # one module per expert: exactly the experts some token was routed to, in every MoE layer
        chosen = _switch_chosen_experts(tiny, model, ids)
        assert len(chosen) == tiny.moe_layers(family_name)
        for layer, experts in enumerate(chosen):
            for e in range(tiny.experts):
                b = _factors(_switch_linear(model, layer, e, "wo"))[1]
                assert (b.grad is not None and b.grad.abs().sum() > 0) == (e in experts), (layer, e)


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


def test_apply_lora_on_switch_without_experts_adapts_self_and_cross_attention_only(tiny: TinyMoE) -> None:
    # Execute
    model = apply_lora(
        tiny.model("switch_transformers"), rank=tiny.rank, alpha=tiny.alpha, dropout=0.0, lora_experts=False
    )

    # Assert
    lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert len(lora) == tiny.attention_adapters("switch_transformers") * 2
    assert all("SelfAttention" in n or "EncDecAttention" in n for n in lora)
    assert any("EncDecAttention" in n for n in lora)


def test_apply_lora_on_switch_without_attention_adapts_each_expert_only(tiny: TinyMoE) -> None:
    # Execute
    model = apply_lora(
        tiny.model("switch_transformers"), rank=tiny.rank, alpha=tiny.alpha, dropout=0.0, lora_attention=False
    )

    # Assert
    lora = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert lora == _switch_router_and_expert_names(tiny)[1]


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


def test_apply_lora_on_switch_puts_dropout_on_attention_adapters_and_none_on_expert_adapters(tiny: TinyMoE) -> None:
    # Execute
    model = apply_lora(tiny.model("switch_transformers"), rank=tiny.rank, alpha=tiny.alpha, dropout=0.25)

    # Assert: the same rule as the fused families, whose expert adapters cannot take dropout
    adapters = {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    experts = [m for n, m in adapters.items() if ".experts." in n]
    attention = [m for n, m in adapters.items() if ".experts." not in n]
    assert len(experts) == tiny.moe_layers("switch_transformers") * tiny.experts * 2 and attention
    assert all(isinstance(m.lora_dropout["default"], nn.Dropout) and m.lora_dropout["default"].p == 0.25
               for m in attention)
    assert all(isinstance(m.lora_dropout["default"], nn.Identity) for m in experts)


def test_apply_lora_raises_config_error_when_nothing_is_adapted(tiny: TinyMoE) -> None:
    with pytest.raises(ConfigError, match=r"^model\.lora: lora_attention and lora_experts are both off"):
        apply_lora(tiny.model("mixtral"), rank=2, alpha=1.0, dropout=0.0, lora_attention=False, lora_experts=False)
