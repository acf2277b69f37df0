"""Model families: building, locating MoE parts, loading and saving."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from torch import nn
from transformers import (
    DeepseekV2ForCausalLM,
    DeepseekV3ForCausalLM,
    LlamaConfig,
    MixtralForCausalLM,
    OlmoeForCausalLM,
    Qwen2MoeForCausalLM,
    Qwen3MoeForCausalLM,
    SwitchTransformersForConditionalGeneration,
)

from aggregation.errors import ConfigError
from fedsim.models import build_model, family_of, family_spec, load_pretrained, save_base
from fedsim.models.registry import FAMILIES

if TYPE_CHECKING:
    from tests.fedsim.models.conftest import TinyMoE

CLASSES = {"mixtral": MixtralForCausalLM, "qwen3_moe": Qwen3MoeForCausalLM, "olmoe": OlmoeForCausalLM,
           "qwen2_moe": Qwen2MoeForCausalLM, "deepseek_v2": DeepseekV2ForCausalLM, "deepseek_v3": DeepseekV3ForCausalLM,
           "switch_transformers": SwitchTransformersForConditionalGeneration}
KNOWN = ", ".join(FAMILIES)  # every registered family, in registry order


def test_build_model_gives_family_class_in_float32_eval_mode(tiny: TinyMoE, family_name: str) -> None:
    # Execute
    model = tiny.model(family_name)

    # Assert
    assert type(model) is CLASSES[family_name]
    assert model.dtype == torch.float32 and not model.training
    assert len(family_of(model).moe_blocks(model)) == tiny.moe_layers(family_name)


def test_build_model_gives_fused_experts_and_routers_for_each_family(tiny: TinyMoE, fused_family_name: str) -> None:
    # Execute
    model = tiny.model(fused_family_name)
    spec = family_of(model)

    # Assert
    assert type(model) is CLASSES[fused_family_name]
    assert model.dtype == torch.float32 and not model.training
    assert len(spec.moe_blocks(model)) == tiny.layers
    assert spec.moe_stacks(model) == [0] * tiny.layers
    for router, experts in zip(spec.routers(model), spec.experts_modules(model), strict=True):
        assert router.weight.shape == (tiny.experts, tiny.hidden)
        assert experts.gate_up_proj.shape == (tiny.experts, 2 * tiny.inter, tiny.hidden)
        assert experts.down_proj.shape == (tiny.experts, tiny.hidden, tiny.inter)
    assert model.config._experts_implementation == "grouped_mm"  # transformers' default, left alone


def test_build_model_gives_switch_encoder_then_decoder_blocks_with_one_module_per_expert(tiny: TinyMoE) -> None:
    # Execute
    model = tiny.model("switch_transformers")
    spec = family_of(model)

    # Assert: every block of both stacks is sparse, its MoE block the last sub-layer's mlp (after the encoder's
    # self-attention; after the decoder's self- and cross-attention)
    encoder = [model.get_submodule(f"encoder.block.{i}.layer.1.mlp") for i in range(tiny.layers)]
    decoder = [model.get_submodule(f"decoder.block.{i}.layer.2.mlp") for i in range(tiny.layers)]
    assert spec.moe_blocks(model) == encoder + decoder
    assert spec.moe_stacks(model) == [0] * tiny.layers + [1] * tiny.layers
    assert spec.top_k(model.config) == 1 and spec.num_experts(model.config) == tiny.experts
    for block, router, experts in zip(encoder + decoder, spec.routers(model), spec.experts_modules(model), strict=True):
        assert router is block.router and experts is block.experts
        classifier = router.get_submodule("classifier")
        assert isinstance(classifier, nn.Linear) and classifier.weight.shape == (tiny.experts, tiny.hidden)
        assert isinstance(experts, nn.ModuleDict)
        assert list(experts.keys()) == [f"expert_{e}" for e in range(tiny.experts)]
        for expert in experts.values():
            wi, wo = expert.get_submodule("wi"), expert.get_submodule("wo")
            assert isinstance(wi, nn.Linear) and wi.weight.shape == (tiny.inter, tiny.hidden)
            assert isinstance(wo, nn.Linear) and wo.weight.shape == (tiny.hidden, tiny.inter)
        assert not any(p.ndim == 3 for p in experts.parameters())  # nothing fused
    # no jitter or dropout, and capacity for a whole sequence: routing ignores mode and batch
    assert model.config.router_jitter_noise == 0.0 and model.config.dropout_rate == 0.0
    assert model.config.expert_capacity >= 64


def test_build_model_same_seed_gives_same_weights_and_keeps_global_rng(tiny: TinyMoE, family_name: str) -> None:
    # Prepare
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)

    # Execute
    a, b, c = tiny.model(family_name, seed=7), tiny.model(family_name, seed=7), tiny.model(family_name, seed=8)
    draw = torch.rand(3)

    # Assert
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(*(m.get_input_embeddings().state_dict()["weight"] for m in (a, c)))
    assert torch.equal(draw, expected_draw)


def test_build_model_outputs_do_not_depend_on_train_mode(tiny: TinyMoE, family_name: str) -> None:
    # Prepare
    model = tiny.model(family_name)
    ids = torch.arange(12).reshape(2, 6)

    # Execute
    with torch.no_grad():
        eval_logits = tiny.forward(model, ids).logits
        train_logits = tiny.forward(model.train(), ids).logits

    # Assert
    assert torch.equal(eval_logits, train_logits)


def test_build_model_raises_config_error_for_unknown_family(tiny: TinyMoE) -> None:
    with pytest.raises(ConfigError) as info:
        tiny.model("x")
    assert str(info.value) == f"model.family: unknown family 'x' (known: {KNOWN})"
    assert set(CLASSES) <= set(FAMILIES)  # so the list names at least every family tested here


def test_build_model_raises_config_error_when_top_k_exceeds_experts(tiny: TinyMoE) -> None:
    with pytest.raises(ConfigError, match=r"^model\.top_k: 5 is outside 1\.\.num_experts=4$"):
        tiny.model("mixtral", top_k=5)


def test_build_model_raises_config_error_when_top_1_family_gets_top_k_above_1(tiny: TinyMoE) -> None:
    expected = r"^model\.top_k: switch_transformers routes each token to one expert \(top-1\), got 2$"
    with pytest.raises(ConfigError, match=expected):
        tiny.model("switch_transformers", top_k=2)


def test_family_of_sees_through_peft_wrapper(tiny: TinyMoE, family_name: str) -> None:
    # Execute
    peft_model = tiny.lora(family_name)

    # Assert
    assert family_of(peft_model) is family_spec(family_name)
    assert len(family_of(peft_model).routers(peft_model)) == tiny.moe_layers(family_name)


def test_moe_blocks_skip_dense_layers_when_qwen3_has_mlp_only_layers() -> None:
    # Prepare: layer 0 dense, layer 1 MoE
    spec = family_spec("qwen3_moe")
    config = spec.config_class(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=24, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0],
    )  # fmt: skip
    model = Qwen3MoeForCausalLM(config)

    # Execute
    blocks = spec.moe_blocks(model)

    # Assert
    assert blocks == [model.model.layers[1].mlp]


def _file_backed(model: nn.Module) -> list[bool]:
    """Whether each parameter's storage lies in a mapping of a ``.safetensors`` file."""
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith(".safetensors"):
            spans.append([int(x, 16) for x in fields[0].split("-")])
    return [any(lo <= p.untyped_storage().data_ptr() < hi for lo, hi in spans) for p in model.parameters()]


@pytest.mark.parametrize("layout", ["hub", "own"])
def test_load_pretrained_after_save_gives_identical_logits(
    tiny: TinyMoE, family_name: str, layout: str, tmp_path: Path
) -> None:
    """Either checkpoint layout: the hub's or the model's own.

    The hub's is transformers' default save, what a downloaded model has; the model's own is ``save_base``'s, what
    fedsim's bases are.
    """
    # Prepare
    model = tiny.model(family_name, seed=3)
    if layout == "hub":
        model.save_pretrained(tmp_path)
    else:
        save_base(model, tmp_path)
    ids = torch.tensor([[1, 5, 9, 2, 7], [3, 3, 8, 0, 4]])

    # Execute
    loaded = load_pretrained(str(tmp_path))

    # Assert
    assert type(loaded) is CLASSES[family_name]
    assert all(torch.equal(a, b)
               for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True))
    with torch.no_grad():  # same weights; Qwen2-MoE's reload computes ~1e-8 apart (the kernels' summation order)
        torch.testing.assert_close(tiny.forward(model, ids).logits, tiny.forward(loaded, ids).logits, rtol=0, atol=1e-6)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings (Linux)")
def test_a_base_in_its_own_layout_is_read_in_place_and_a_converted_one_leaves_no_mapping(
    tiny: TinyMoE, fused_family_name: str, tmp_path: Path
) -> None:
    """A base in its own layout is read in place from the mapped file; one converted from the hub's keeps no mapping.

    Own layout: every parameter is a view of the mapped file (no copy; pages shared by a node's workers).
    Hub layout, fused on load: no parameter keeps the file mapped (its pages would stay resident).
    """
    # Prepare
    model = tiny.model(fused_family_name)
    save_base(model, tmp_path / "own")
    model.save_pretrained(tmp_path / "hub")
    # Execute
    own, hub = load_pretrained(str(tmp_path / "own")), load_pretrained(str(tmp_path / "hub"))
    # Assert
    assert all(_file_backed(own))
    assert not any(_file_backed(hub))


def test_load_pretrained_raises_config_error_naming_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as info:
        load_pretrained(str(missing))
    assert str(info.value) == f"model.pretrained: no such directory '{missing}'"


def test_load_pretrained_raises_config_error_for_unknown_model_type(tmp_path: Path) -> None:
    # Prepare: a config alone is enough, the family is checked before any weight is read
    LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4).save_pretrained(tmp_path)

    # Execute / Assert
    with pytest.raises(ConfigError, match=rf"^model\.pretrained: .* is a 'llama' model \(known: {KNOWN}\)$"):
        load_pretrained(str(tmp_path))


def test_build_model_accepts_family_by_keyword() -> None:
    model = build_model(
        family="qwen3_moe", vocab_size=16, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
        intermediate_size=8, num_experts=2, top_k=1, max_position=16, seed=0,
    )  # fmt: skip
    assert model.config.moe_intermediate_size == 8 and model.config.num_experts == 2


def _small(family: str, **kwargs: object) -> torch.nn.Module:
    return build_model(
        family, vocab_size=16, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=8,
        num_experts=2, top_k=1, max_position=16, seed=0, **kwargs,  # type: ignore[arg-type]
    )  # fmt: skip


def test_build_model_sets_hf_overrides_last() -> None:
    # Execute: a real configuration's values beyond the generic shape
    model = _small("deepseek_v2", overrides={"vocab_size": 40, "first_k_dense_replace": 1, "n_shared_experts": 2})

    # Assert: the first layer is dense, the shared experts twice an expert's width, 40 embedding rows
    assert model.config.first_k_dense_replace == 1 and model.config.n_shared_experts == 2
    assert model.get_input_embeddings().weight.shape[0] == 40
    assert len(family_spec("deepseek_v2").moe_blocks(model)) == 1


@pytest.mark.parametrize(
    ("family", "overrides", "message"),
    [
        ("olmoe", {"hidden_size": 32}, r"^model\.hf_overrides\.hidden_size: fedsim sets it from model\.hidden_size"),
        ("olmoe", {"num_experts": 8}, r"^model\.hf_overrides\.num_experts: fedsim sets it from model\.num_experts"),
        ("olmoe", {"intermediate_size": 8}, r"from model\.intermediate_size; set that instead$"),
        ("switch_transformers", {"d_model": 32}, r"^model\.hf_overrides\.d_model: fedsim sets it from model\.hidden"),
        ("olmoe", {"kv_lora_rank": 4}, r"^model\.hf_overrides\.kv_lora_rank: OlmoeConfig has no such field$"),
        ("olmoe", {"vocab_size": 8}, r"^model\.hf_overrides\.vocab_size: 8 is smaller than the tokenizer's 16 ids$"),
    ],
)
def test_build_model_refuses_hf_overrides_it_cannot_honour(
    family: str, overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _small(family, overrides=overrides)


def test_build_model_on_meta_device_allocates_nothing() -> None:
    model = _small("olmoe", device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
