"""MoE model families: where each keeps its routers, experts and attention.

Everything in fedsim that touches a model's MoE structure (LoRA targets, the
payload layout, the routing hooks) asks a :class:`FamilySpec` instead of
matching parameter names, so supporting a new family is one entry in
``FAMILIES``. Families are keyed by transformers' ``config.model_type``.

Every decoder-only family here (transformers 5.17–5.22) keeps, in every MoE
decoder layer ``model.layers[i].mlp``:

- ``gate``: a top-k router module holding ``weight`` [E, H] and returning
  ``(logits [tokens, E], top-k weights, top-k indices)``;
- ``experts``: one module holding the fused expert weights
  ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I], run by
  transformers' default experts implementation (``grouped_mm``).

SwitchTransformers (encoder-decoder, top-1) differs in every one of these:
its sparse blocks sit in two stacks, ``encoder.block`` and ``decoder.block``,
each at ``layer[-1].mlp``; the router ``router`` wraps an ``nn.Linear``
``classifier`` and returns ``(dispatch one-hot, top-1 probability, logits)``;
``experts`` is a ``ModuleDict`` of separate FFNs whose ``wi``/``wo`` are one
``nn.Linear`` each. The spec fields below describe both layouts.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from peft import PeftModel
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    DeepseekV2Config,
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
    SwitchTransformersConfig,
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
    layers : tuple of str
        Dotted paths from the model to its lists of layers (one per stack:
        the decoder; or the encoder, then the decoder). MoE layers are
        numbered across the stacks in this order.
    moe_block : str
        Dotted path from a layer to its MoE block; an integer part indexes a
        module list (``layer.-1.mlp``). A dense layer's MLP at the same path has
        no router and is skipped.
    router : str
        Attribute of the MoE block holding the router module.
    experts : str
        Attribute of the MoE block holding the fused experts module.
    expert_parameters : tuple of str
        Parameters of the experts module stacked over experts on axis 0.
    expert_linears : tuple of str
        Names of each expert's own ``nn.Linear`` projections, for families
        that keep experts as separate modules (``experts[i].<name>``); LoRA
        targets them as modules.
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
    top_k_key : str or None
        Config key of k; None for a family that always routes top-1.
    router_returns : {"logits_weights_indices", "dispatch_probs_logits"}
        What the router module returns: ``(logits, top-k weights, top-k
        indices)``, or Switch's ``(dispatch one-hot, top-1 probability, logits)``.
    router_scores : {"softmax", "sigmoid"}
        How the router turns logits into expert scores: the routing
        distribution p(x) is the softmax, or the sigmoid scores normalised to
        sum to one (DeepSeek-V3 routes on sigmoid scores).
    """

    model_type: str
    config_class: type[PretrainedConfig]
    layers: tuple[str, ...]
    moe_block: str
    router: str
    experts: str
    expert_parameters: tuple[str, ...]
    attention_projections: tuple[str, ...]
    num_experts_key: str
    expert_intermediate_key: str
    expert_linears: tuple[str, ...] = ()
    top_k_key: str | None = "num_experts_per_tok"
    router_returns: Literal["logits_weights_indices", "dispatch_probs_logits"] = "logits_weights_indices"
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
        return [block for _, block in self._blocks(model)]

    def moe_stacks(self, model: nn.Module) -> list[int]:
        """For each MoE layer ℓ, the index of its stack in ``layers`` (0 for every layer of a decoder-only model)."""
        return [stack for stack, _ in self._blocks(model)]

    def _blocks(self, model: nn.Module) -> list[tuple[int, nn.Module]]:
        found = []
        for stack, path in enumerate(self.layers):
            for layer in _resolve(_unwrap(model), path):
                try:
                    block = _resolve(layer, self.moe_block)
                except (AttributeError, IndexError):
                    continue
                if hasattr(block, self.router) and hasattr(block, self.experts):
                    found.append((stack, block))
        return found

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
        """The k of the top-k routing: experts per token (1 for a top-1 family)."""
        return 1 if self.top_k_key is None else int(getattr(config, self.top_k_key))

    @property
    def fused_experts(self) -> bool:
        """Whether the experts are stacked tensors (peft ``target_parameters``) rather than modules."""
        return bool(self.expert_parameters)


_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_FUSED = ("gate_up_proj", "down_proj")

def _fused_family(
    model_type: str, config_class: type[PretrainedConfig], num_experts_key: str, expert_intermediate_key: str,
    *, attention: tuple[str, ...] = _ATTENTION, **extra: Any,
) -> FamilySpec:
    """A family laid out as the module docstring describes (every family here)."""
    return FamilySpec(
        model_type=model_type, config_class=config_class, layers=("model.layers",), moe_block="mlp", router="gate",
        experts="experts", expert_parameters=_FUSED, attention_projections=attention,
        num_experts_key=num_experts_key, expert_intermediate_key=expert_intermediate_key, **extra,
    )


def _shared_expert_width(options: dict[str, Any]) -> dict[str, Any]:
    """Qwen2-MoE: the always-on shared expert as wide as a routed one."""
    return {"shared_expert_intermediate_size": options["intermediate_size"]}


def _deepseek_small(options: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-V2/V3's config options derived from the generic ones.

    Multi-head latent attention sized from the head width (its keys and values have one head per query head,
    so ``num_kv_heads`` does not apply), one shared expert as wide as a routed one, every layer MoE, one
    routing group.
    """
    head = options["hidden_size"] // options["num_attention_heads"]
    rope = max(2, (head // 2) // 2 * 2)  # even, for the rotary embedding
    return {
        "q_lora_rank": None, "kv_lora_rank": max(4, options["hidden_size"] // 2), "qk_rope_head_dim": rope,
        "qk_nope_head_dim": max(2, head - rope), "v_head_dim": head, "n_shared_experts": 1,
        "first_k_dense_replace": 0, "n_group": 1, "topk_group": 1,
        "num_key_value_heads": options["num_attention_heads"],
    }


def _switch_small(options: dict[str, Any]) -> dict[str, Any]:
    """SwitchTransformers' config options derived from the generic ones.

    As many decoder layers as encoder layers, every block sparse, key/value width from the head width, no
    jitter, dropout or token dropping (capacity covers a whole sequence), so a built model's outputs do not
    depend on train/eval mode or batch composition.
    """
    layers = options["num_hidden_layers"]
    return {  # the sparse steps are derived in __init__, before the attribute map applies the generic names
        "num_layers": layers, "d_model": options["hidden_size"], "num_heads": options["num_attention_heads"],
        "num_decoder_layers": layers, "num_sparse_encoder_layers": layers, "num_sparse_decoder_layers": layers,
        "d_kv": options["hidden_size"] // options["num_attention_heads"],
        "expert_capacity": options["max_position_embeddings"], "router_jitter_noise": 0.0, "dropout_rate": 0.0,
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
    "deepseek_v2": _fused_family(
        "deepseek_v2", DeepseekV2Config, "n_routed_experts", "moe_intermediate_size", attention=_MLA,
        shared_projections=("shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj"),
        fixed_config=(("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", None), ("topk_method", "greedy")),
        derived_config=_deepseek_small,  # DeepSeekMoE's softmax router, greedy top-k
    ),
    "deepseek_v3": _fused_family(
        "deepseek_v3", DeepseekV3Config, "n_routed_experts", "moe_intermediate_size", attention=_MLA,
        shared_projections=("shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj"),
        fixed_config=(("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", None)),
        derived_config=_deepseek_small, router_scores="sigmoid",
    ),
    "switch_transformers": FamilySpec(
        model_type="switch_transformers", config_class=SwitchTransformersConfig,
        layers=("encoder.block", "decoder.block"), moe_block="layer.-1.mlp", router="router", experts="experts",
        expert_parameters=(), expert_linears=("wi", "wo"),
        attention_projections=("q", "k", "v", "o"),  # self- and cross-attention
        num_experts_key="num_experts", expert_intermediate_key="d_ff", top_k_key=None,
        router_returns="dispatch_probs_logits",
        # T5's ids: pad 0 starts the decoder; fedsim's tokenizer has </s> at 2
        fixed_config=(("pad_token_id", 0), ("eos_token_id", 2), ("decoder_start_token_id", 0), ("bos_token_id", None)),
        derived_config=_switch_small,
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
    config = cast(PretrainedConfig, _unwrap(model).config)  # nn.Module types its attributes as Tensor | Module
    return family_spec(config.model_type)


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
    overrides: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> PreTrainedModel:
    """A randomly initialised model of one family (a causal LM; Switch: a seq2seq LM), in float32 and eval mode.

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
    overrides : mapping or None
        transformers config values set last (``model.hf_overrides``): what a
        real configuration has beyond the generic shape, e.g. OLMoE's
        ``vocab_size`` or DeepSeek-V2's ``kv_lora_rank``. ConfigError for a key
        the family's config does not have, for one of the generic options
        (set it through its own argument), and for a ``vocab_size`` smaller
        than ``vocab_size`` (the tokenizer's ids must fit).
    device : str, torch.device or None
        ``"meta"`` builds the model's shapes without memory (a full-depth
        layout, a plan); None builds on the CPU.
    """
    spec = family_spec(family)
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"model.top_k: {top_k} is outside 1..num_experts={num_experts}")
    if spec.top_k_key is None and top_k != 1:
        raise ConfigError(f"model.top_k: {family} routes each token to one expert (top-1), got {top_k}")
    options: dict[str, Any] = {
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
    options.update(_checked_overrides(spec, dict(overrides or {}), tokenizer_vocab=vocab_size))
    config = spec.config_class(**options)
    with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
        torch.manual_seed(seed)
        # transformers leaves the auto classes' from_config unannotated
        model: PreTrainedModel = model_class(config).from_config(  # type: ignore[no-untyped-call]
            config, dtype=torch.float32
        )
    model.eval()  # type: ignore[no-untyped-call]  # transformers leaves PreTrainedModel.eval unannotated
    return model


# The transformers keys build_model sets from fedsim's own model options, and the option that sets each.
_GENERIC_KEYS = {
    "hidden_size": "hidden_size", "d_model": "hidden_size", "num_hidden_layers": "num_layers",
    "num_layers": "num_layers", "num_decoder_layers": "num_layers", "num_attention_heads": "num_heads",
    "num_heads": "num_heads", "num_key_value_heads": "num_kv_heads", "max_position_embeddings": "max_position",
    "num_experts_per_tok": "top_k",
}


def _checked_overrides(spec: FamilySpec, overrides: dict[str, Any], *, tokenizer_vocab: int) -> dict[str, Any]:
    """``overrides`` after checking each key is the family's and not one fedsim sets from its own options."""
    own = dict(_GENERIC_KEYS)
    own |= {spec.num_experts_key: "num_experts", spec.expert_intermediate_key: "intermediate_size"}
    known = set(spec.config_class().to_dict()) | set(spec.config_class.attribute_map)
    for key, value in overrides.items():
        if key in own:
            raise ConfigError(f"model.hf_overrides.{key}: fedsim sets it from model.{own[key]}; set that instead")
        if key not in known:
            raise ConfigError(f"model.hf_overrides.{key}: {spec.config_class.__name__} has no such field")
        if key == "vocab_size" and (not isinstance(value, int) or value < tokenizer_vocab):
            raise ConfigError(
                f"model.hf_overrides.vocab_size: {value!r} is smaller than the tokenizer's {tokenizer_vocab} ids"
            )
    return overrides


def model_class(config: PretrainedConfig) -> type[AutoModelForCausalLM] | type[AutoModelForSeq2SeqLM]:
    """The auto class that builds or loads ``config``'s model: seq2seq for an encoder-decoder, else causal LM."""
    return AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM


Quantization = Literal["none", "8bit", "4bit"]


def load_pretrained(
    path_or_id: str, *, dtype: torch.dtype | None = None, quantization: Quantization = "none", device: str = "cpu",
) -> PreTrainedModel:
    """Load a model of a known family (a causal LM, or a seq2seq LM) from a local directory or a hub id.

    The config is read first, so an unknown family fails before any weights
    are read. A string that looks like a path (absolute, ``./``, ``../``,
    ``~``) must exist locally; anything else is treated as a hub id (offline,
    it must already be in the cache). Errors are ConfigError on ``model.pretrained``.

    Parameters
    ----------
    dtype : torch.dtype or None
        Type of the loaded weights; None keeps the checkpoint's float32 default.
    quantization : {"none", "8bit", "4bit"}
        Load the base's ``nn.Linear`` weights quantized by bitsandbytes (int8,
        or NF4 computing in bf16), placed on ``device`` as they load. Routers
        and the output layer stay unquantized: routers are trained in full.
        bitsandbytes must be installed (the ``quantization`` extra; its 0.47
        wheel carries CPU kernels besides CUDA's); ConfigError on
        ``model.quantization`` otherwise.
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
    options: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    if config.model_type == "switch_transformers":
        # Switch's router jitter scales the hidden states in place (transformers 5.22), so the experts and the
        # routing statistics would see noised inputs in training only; fedsim routes without it.
        config.router_jitter_noise = 0.0
    if quantization != "none":
        options.update(_quantized(FAMILIES[config.model_type], quantization, device))
    model = model_class(config).from_pretrained(source, config=config, **options)
    _release_converted_checkpoint(model)
    return model


def save_base(model: PreTrainedModel, directory: Path) -> None:
    """Save a base in its own tensor layout: the fused ``[E, out, in]`` expert tensors as the model holds them.

    transformers' default save splits fused experts into the hub's per-expert
    tensors (a copy of the experts: +2.0 GiB at OLMoE widths, 2 layers) and
    its load fuses them again (another copy). Saved as laid out, a load maps
    the file in place: a worker's frozen weights are page-cache pages, read
    when first touched and shared by the workers of a node.
    """
    model.save_pretrained(directory, save_original_format=False)


def _release_converted_checkpoint(model: nn.Module) -> None:
    """Copy out the parameters that still point into a checkpoint file whose other tensors were converted.

    A checkpoint in the hub's layout is converted as it loads (per-expert
    tensors fused into new ones); the parameters loaded as they are stay views
    of the file's mapping, which keeps every page the conversion read resident
    (3.1 GiB at OLMoE widths, 2 layers). Copying those few out lets the
    mapping go. A checkpoint in the model's own layout (``save_base``) is left
    mapped: every parameter is a view of it. Linux only (``/proc/self/maps``).
    """
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return
    spans = []
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and (fields[5].endswith(".safetensors") or "/blobs/" in fields[5]):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            spans.append((lo, hi))
    params = list(model.parameters())
    mapped = [p for p in params if any(lo <= p.untyped_storage().data_ptr() < hi for lo, hi in spans)]
    if mapped and len(mapped) < len(params):
        with torch.no_grad():
            for param in mapped:
                param.data = param.data.clone()


def _quantized(spec: FamilySpec, quantization: Quantization, device: str) -> dict[str, Any]:
    """from_pretrained options that quantize the base with bitsandbytes, after checking it can run here."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"model.quantization: {quantization!r} needs bitsandbytes: pip install -e '.[quantization]'")
    from transformers import BitsAndBytesConfig

    skip = ["lm_head", spec.router]  # bitsandbytes leaves modules whose names contain these in full precision
    config = BitsAndBytesConfig(  # type: ignore[no-untyped-call]  # transformers leaves its __init__ unannotated
        load_in_8bit=quantization == "8bit", load_in_4bit=quantization == "4bit", bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=skip,
    )
    return {"quantization_config": config, "device_map": {"": device}, "dtype": torch.bfloat16}


def _resolve(root: nn.Module, path: str) -> Any:
    """The module at dotted ``path`` under ``root``; an integer part indexes a module list."""
    node: Any = root
    for part in path.split("."):
        node = node[int(part)] if part.lstrip("-").isdigit() else getattr(node, part)
    return node


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if isinstance(model, PeftModel) else model
