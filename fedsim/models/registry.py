"""MoE model families: where each keeps its routers, experts and attention.

Everything in fedsim that touches a model's MoE structure (LoRA targets, the
payload layout, the routing hooks) asks a :class:`FamilySpec` instead of
matching parameter names, so supporting a new family is one entry in
``FAMILIES``. Families are keyed by transformers' ``config.model_type``.

Every family here (transformers 5.17–5.22) keeps, in every MoE decoder layer
``model.layers[i].mlp``:

- ``gate``: a top-k router module holding ``weight`` [E, H] and returning
  ``(logits [tokens, E], top-k weights, top-k indices)``;
- ``experts``: one module holding the fused expert weights
  ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I], run by
  transformers' default experts implementation (``grouped_mm``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Any, Literal

import torch
from peft import PeftModel
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from aggregation.errors import ConfigError


@dataclass(frozen=True, slots=True)
class FamilySpec:
    """Where one MoE family keeps the parts fedsim adapts and observes.

    Attributes
    ----------
    model_type : str
        transformers' ``config.model_type``, the registry key.
    config_class : type of PretrainedConfig
        Config used to build a model from scratch.
    layers : str
        Dotted path from the causal LM to its list of decoder layers.
    moe_block : str
        Attribute of a decoder layer holding its MoE block (a dense layer's
        MLP at the same attribute has no router and is skipped).
    router : str
        Attribute of the MoE block holding the router module.
    experts : str
        Attribute of the MoE block holding the fused experts module.
    expert_parameters : tuple of str
        Parameters of the experts module stacked over experts on axis 0.
    attention_projections : tuple of str
        Module names of the attention projections LoRA adapts.
    num_experts_key, expert_intermediate_key : str
        Config keys of the number of experts E and of an expert's FFN width I.
    shared_projections : tuple of str
        Module paths (from the MoE block) of an always-on shared expert's
        projections: LoRA adapts them too, and the payload layout files them
        under ``shared`` (averaged by n, never merged per expert).
    fixed_config : tuple of (str, object)
        Config values every model of the family is built with, e.g. token
        ids that must fit a small vocabulary.
    derived_config : callable or None
        Config values a built model derives from the generic options (e.g.
        a shared expert as wide as a routed one, attention head dimensions).
    router_scores : {"softmax", "sigmoid"}
        How the router turns logits into expert scores: the routing
        distribution p(x) is the softmax, or the sigmoid scores normalised to
        sum to one (DeepSeek-V3 routes on sigmoid scores).
    """

    model_type: str
    config_class: type[PretrainedConfig]
    layers: str
    moe_block: str
    router: str
    experts: str
    expert_parameters: tuple[str, ...]
    attention_projections: tuple[str, ...]
    num_experts_key: str
    expert_intermediate_key: str
    shared_projections: tuple[str, ...] = ()
    fixed_config: tuple[tuple[str, object], ...] = ()
    derived_config: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    router_scores: Literal["softmax", "sigmoid"] = "softmax"

    @property
    def target_parameters(self) -> tuple[str, ...]:
        """Parameter-name suffixes of the fused expert tensors, for peft's ``target_parameters``."""
        return tuple(f"{self.moe_block}.{self.experts}.{p}" for p in self.expert_parameters)

    def moe_blocks(self, model: nn.Module) -> list[nn.Module]:
        """The MoE blocks of ``model`` (plain or peft-wrapped), in layer order.

        The position in this list is the MoE layer index ℓ used by the payload
        layout and the routing statistics; dense layers do not count.
        """
        layers = reduce(getattr, self.layers.split("."), _unwrap(model))
        blocks = (getattr(layer, self.moe_block, None) for layer in layers)
        return [b for b in blocks if b is not None and hasattr(b, self.router) and hasattr(b, self.experts)]

    def routers(self, model: nn.Module) -> list[nn.Module]:
        """The router module of each MoE layer, in layer order."""
        return [getattr(b, self.router) for b in self.moe_blocks(model)]

    def experts_modules(self, model: nn.Module) -> list[nn.Module]:
        """The module at each MoE layer's experts attribute (a peft wrapper once LoRA is applied)."""
        return [getattr(b, self.experts) for b in self.moe_blocks(model)]

    def num_experts(self, config: PretrainedConfig) -> int:
        """E, the number of routed experts per MoE layer."""
        return int(getattr(config, self.num_experts_key))

    def top_k(self, config: PretrainedConfig) -> int:
        """k of the top-k routing; ``num_experts_per_tok`` in both families."""
        return int(config.num_experts_per_tok)


_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_FUSED = ("gate_up_proj", "down_proj")

def _fused_family(model_type: str, config_class: type[PretrainedConfig], num_experts_key: str, expert_intermediate_key: str,
                  *, attention: tuple[str, ...] = _ATTENTION, **extra: Any) -> FamilySpec:
    """A family laid out as the module docstring describes (every family here)."""
    return FamilySpec(
        model_type=model_type, config_class=config_class, layers="model.layers", moe_block="mlp", router="gate",
        experts="experts", expert_parameters=_FUSED, attention_projections=attention,
        num_experts_key=num_experts_key, expert_intermediate_key=expert_intermediate_key, **extra,
    )


def _shared_expert_width(options: dict[str, Any]) -> dict[str, Any]:
    """Qwen2-MoE: the always-on shared expert as wide as a routed one."""
    return {"shared_expert_intermediate_size": options["intermediate_size"]}


def _deepseek_small(options: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-V3 built from the generic options: multi-head latent attention sized from the head width
    (its keys and values have one head per query head, so ``num_kv_heads`` does not apply), one shared expert
    as wide as a routed one, every layer MoE, one routing group."""
    head = options["hidden_size"] // options["num_attention_heads"]
    rope = max(2, (head // 2) // 2 * 2)  # even, for the rotary embedding
    return {
        "q_lora_rank": None, "kv_lora_rank": max(4, options["hidden_size"] // 2), "qk_rope_head_dim": rope,
        "qk_nope_head_dim": max(2, head - rope), "v_head_dim": head, "n_shared_experts": 1,
        "first_k_dense_replace": 0, "n_group": 1, "topk_group": 1,
        "num_key_value_heads": options["num_attention_heads"],
    }


# DeepSeek-V3's multi-head latent attention: q_proj (or q_a/q_b with a query LoRA rank), kv_a/kv_b, o_proj
_MLA = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")

FAMILIES: dict[str, FamilySpec] = {
    "mixtral": _fused_family("mixtral", MixtralConfig, "num_local_experts", "intermediate_size"),
    "qwen3_moe": _fused_family("qwen3_moe", Qwen3MoeConfig, "num_experts", "moe_intermediate_size"),
    "olmoe": _fused_family(
        "olmoe", OlmoeConfig, "num_experts", "intermediate_size",
        fixed_config=(("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", None)),  # defaults exceed small vocabs
    ),
    "qwen2_moe": _fused_family(
        "qwen2_moe", Qwen2MoeConfig, "num_experts", "moe_intermediate_size",
        shared_projections=("shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj"),
        derived_config=_shared_expert_width,
    ),
    "deepseek_v3": _fused_family(
        "deepseek_v3", DeepseekV3Config, "n_routed_experts", "moe_intermediate_size", attention=_MLA,
        shared_projections=("shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj"),
        fixed_config=(("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", None)),
        derived_config=_deepseek_small, router_scores="sigmoid",
    ),
}


def family_spec(name: str) -> FamilySpec:
    """The spec of family ``name``; ConfigError on ``model.family`` if unknown."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"model.family: unknown family {name!r} (known: {', '.join(FAMILIES)})") from None


def family_of(model: nn.Module) -> FamilySpec:
    """The spec of a built or loaded model (plain or peft-wrapped), from its ``config.model_type``."""
    return family_spec(_unwrap(model).config.model_type)


def build_model(
    family: str,
    *,
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    intermediate_size: int,
    num_experts: int,
    top_k: int,
    max_position: int,
    seed: int,
) -> PreTrainedModel:
    """A randomly initialised causal LM of one family, in float32 and eval mode.

    Initialisation draws from a forked torch RNG seeded with ``seed``, so the
    same seed gives the same weights whatever ran before, and the caller's RNG
    state is untouched. Attention dropout and router jitter are zero, so the
    outputs do not depend on train/eval mode.

    Parameters
    ----------
    family : str
        Registry key, e.g. ``"mixtral"`` or ``"qwen3_moe"``.
    intermediate_size : int
        FFN width I of one expert (Qwen3-MoE: also of any dense layer).
    top_k : int
        Experts per token, 1 ≤ top_k ≤ num_experts.
    """
    spec = family_spec(family)
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"model.top_k: {top_k} is outside 1..num_experts={num_experts}")
    options = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position,
        "num_experts_per_tok": top_k,
        "attention_dropout": 0.0,
        spec.num_experts_key: num_experts,
        spec.expert_intermediate_key: intermediate_size,
        **dict(spec.fixed_config),
    }
    if spec.derived_config is not None:
        options.update(spec.derived_config(options))
    config = spec.config_class(**options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def load_pretrained(path_or_id: str) -> PreTrainedModel:
    """Load a causal LM of a known family from a local directory or a hub id.

    The config is read first, so an unknown family fails before any weights
    are read. A string that looks like a path (absolute, ``./``, ``../``,
    ``~``) must exist locally; anything else is treated as a hub id (offline,
    it must already be in the cache). Errors are ConfigError on ``model.pretrained``.
    """
    path = Path(path_or_id).expanduser()
    looks_local = path.is_absolute() or path_or_id.startswith((".", "~"))
    if looks_local and not path.exists():
        raise ConfigError(f"model.pretrained: no such directory '{path}'")
    source = str(path) if path.exists() else path_or_id
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"model.pretrained: cannot read a config from '{source}': {exc}") from exc
    if config.model_type not in FAMILIES:
        raise ConfigError(
            f"model.pretrained: '{source}' is a {config.model_type!r} model (known: {', '.join(FAMILIES)})"
        )
    return AutoModelForCausalLM.from_pretrained(source, config=config)


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model
