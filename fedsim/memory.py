"""A worker's GPU memory, estimated before any actor starts, so a packing that cannot fit fails at once.

Flower's Ray engine leaves the packing of clients onto GPUs to the user and
reports an out-of-memory error minutes into a run. Here each worker's device
need is the sum of:

- the frozen base model, resident (its parameters at the engine's precision,
  2 bytes in bf16; with ``model.quantization``, bitsandbytes' linear weights
  at 1 or ½ byte; with the deepspeed engine, only 1/G of the routed experts);
- the trainable state: LoRA factors and routers in fp32, their gradients and
  AdamW's two moments (16 bytes a value);
- activations of one training step at the configured batch size and the
  longest sequence, from the transformer activation count of Korthikanti et
  al. (2022) per layer, s·b·h·(10 + 24·F/(4h)) values with fused attention
  (no s² scores), the MoE block counted for its k routed experts of width I
  and its shared experts (F = k·I + their width); with
  ``train.gradient_checkpointing``, each layer's input plus one layer's
  activations. A multiple-choice example is N rows (one per option) of its
  context and option; an encoder-decoder's decoder reads one token per
  example (or an option's tokens) and the encoded prompt's keys and values.

The estimate is analytic, from the base's shapes on the meta device (no
memory, well under a second at full depth); ``measure_worker_memory``
replaces it, for the torch engine, by the peak measured over one training step
where the driver has a GPU. The counts read off the model and the activation
formulas here are also the terms of ``fedsim.host_memory``'s host model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from aggregation.errors import ConfigError
from aggregation.payload import PAYLOAD_DTYPE
from fedsim.config import RunConfig
from fedsim.data.choice import ChoiceSplit
from fedsim.data.encoded import EncodedSplit
from fedsim.models import apply_lora, family_of
from fedsim.models.registry import FamilySpec, model_class
from fedsim.prepare import PreparedRun

GIB = 2**30

# Values of a forward pass without gradients held at its peak, per token and hidden unit: one layer's hidden
# states, normed input, q, k, v and their rotated copies, the attention output and the residual sum (the
# routed experts run one at a time, so their rows add little). Measured: evaluating 64 × 64 tokens at OLMoE's
# widths added 0.26 GiB to a worker's peak, 8.2 values a token and hidden unit.
FORWARD_VALUES_PER_TOKEN_UNIT = 10


@dataclass(frozen=True)
class WorkerMemory:
    """One worker's estimated GPU memory, in bytes, by part."""

    base: float
    trainable: float
    activations: float
    source: str = "analytic"

    @property
    def total(self) -> float:
        """All parts together, in bytes."""
        return self.base + self.trainable + self.activations

    def describe(self) -> str:
        """The total and its parts in GiB (MiB under 1 GiB), naming where the numbers come from."""
        unit, scale = ("GiB", GIB) if self.total >= GIB else ("MiB", 2**20)
        return (f"{self.total / scale:.2f} {unit} ({self.source}: base {self.base / scale:.2f} + trainable and "
                f"optimiser {self.trainable / scale:.2f} + activations {self.activations / scale:.2f})")


# bytes a bitsandbytes-quantized linear weight takes
_QUANTIZED_WIDTH = {"8bit": 1.0, "4bit": 0.5}


def meta_base(base_path: str) -> PreTrainedModel:
    """The base saved at ``base_path``, built from its config on the meta device: its shapes, no memory."""
    config: Any = AutoConfig.from_pretrained(base_path)
    with torch.device("meta"):
        # transformers leaves the auto classes' from_config unannotated
        model: PreTrainedModel = model_class(config).from_config(config)  # type: ignore[no-untyped-call]
    return model


def adapted(cfg: RunConfig, model: PreTrainedModel) -> PeftModel:
    """``cfg``'s LoRA on ``model`` with its routers trainable: what every worker trains.

    A model on the meta device gets its LoRA factors there too (peft would otherwise create and initialise
    them in memory: 0.4 GB and seconds at Qwen1.5-MoE's full depth).
    """
    on_meta = next(model.parameters()).is_meta
    with torch.device("meta") if on_meta else contextlib.nullcontext():
        return apply_lora(model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=0.0,
                          lora_attention=cfg.lora.attention, lora_experts=cfg.lora.experts,
                          routed_experts=cfg.lora.routed_experts)


def trainable_values(model: nn.Module) -> int:
    """Values of the parameters that train (LoRA factors and routers): the payload's length."""
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def payload_nbytes(cfg: RunConfig, base_path: str) -> int:
    """Bytes of the global payload (and of one client's update) for ``cfg`` on the base at ``base_path``.

    Read on the meta device, before any worker builds the model.
    """
    return trainable_values(adapted(cfg, meta_base(base_path))) * np.dtype(PAYLOAD_DTYPE).itemsize


def estimate_worker_memory(cfg: RunConfig, base_path: str, *, num_options: int = 1) -> WorkerMemory:
    """The analytic estimate for ``cfg``'s engine on the base saved at ``base_path`` (read on the meta device).

    ``num_options``: rows a training example takes (its options, for a multiple-choice task).
    """
    return worker_memory(cfg, adapted(cfg, meta_base(base_path)), num_options=num_options)


@dataclass(frozen=True)
class _Counts:
    """What the estimates read off an adapted model: values by kind, its config and family."""

    config: Any
    spec: FamilySpec
    base: int  # every parameter of the base model (frozen weights and routers)
    experts: int  # the frozen routed-expert weights
    linear: int  # frozen nn.Linear weights but the routers and the output layer (what bitsandbytes quantizes)
    trainable: int
    mlp: int  # FFN width a token passes through in a MoE block: k routed experts of width I, and shared experts
    dense: int  # the widest FFN run on every token at once (a dense layer's, a shared expert's); 0: none


def _shared_width(model: PeftModel, spec: FamilySpec) -> int:
    """The width of a MoE block's always-on shared experts together (their up projection's outputs; 0: none)."""
    blocks = spec.moe_blocks(model)
    up = [path for path in spec.shared_projections if path.endswith("up_proj")]
    if not blocks or not up:
        return 0
    module: Any = blocks[0]
    for part in up[0].split("."):
        module = getattr(module, part)
    linear = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return int(linear.weight.shape[0])


def _counts(model: PeftModel) -> _Counts:
    spec = family_of(model)
    config: Any = model.get_base_model().config
    routers = {id(p): p.numel() for r in spec.routers(model) for p in r.parameters()}
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    experts = sum(p.numel() for m in spec.experts_modules(model) for p in m.parameters() if not p.requires_grad)
    skip = set(routers) | {id(model.get_output_embeddings().weight)}
    linear = sum(m.weight.numel() for m in model.modules()
                 if isinstance(m, nn.Linear) and not m.weight.requires_grad and id(m.weight) not in skip)
    mlp = spec.top_k(config) * int(getattr(config, spec.expert_intermediate_key)) + _shared_width(model, spec)
    return _Counts(config, spec, frozen + sum(routers.values()), experts, linear, trainable_values(model), mlp,
                   _dense_width(model, spec, skip, hidden=int(config.hidden_size)))


def _dense_width(model: PeftModel, spec: FamilySpec, skip: set[int], *, hidden: int) -> int:
    """The widest FFN projection from the hidden states outside attention, routers, routed experts, output layer."""
    routed = {id(m) for experts in spec.experts_modules(model) for m in experts.modules()}
    widths = [m.out_features for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and m.in_features == hidden and id(m) not in routed
              and id(m.weight) not in skip and not m.weight.requires_grad
              and not any(part in spec.attention_projections for part in name.split("."))]
    return max(widths, default=0)


def _layers(config: PretrainedConfig) -> int:
    """Transformer layers a token passes through (an encoder-decoder's encoder and decoder layers)."""
    decoder = getattr(config, "num_decoder_layers", 0) if config.is_encoder_decoder else 0
    return int(config.num_hidden_layers) + int(decoder)


@dataclass(frozen=True)
class _Stack:
    """One stack of layers in a pass: how many, the tokens each holds, the tokens its cross-attention reads."""

    layers: int
    tokens: int
    attended: int = 0


def _stacks(cfg: RunConfig, config: PretrainedConfig, *, rows: int, num_options: int) -> list[_Stack]:
    """The layers a pass over ``rows`` examples runs, stack by stack (fedsim.engine.torch_engine's passes).

    A decoder-only model reads every row in full (an example, or one row per option: the prompt and the
    option). An encoder-decoder encodes each prompt once; its decoder reads one token per example (the label
    word's step) or each option's tokens, and attends to the encoded prompt.
    """
    prompt = cfg.data.max_length
    if not config.is_encoder_decoder:
        row = prompt + (cfg.data.max_option_length if num_options > 1 else 0)
        return [_Stack(int(config.num_hidden_layers), rows * num_options * row)]
    decoded = rows * num_options
    step = cfg.data.max_option_length if num_options > 1 else 1
    return [_Stack(int(config.num_hidden_layers), rows * prompt),
            _Stack(int(config.num_decoder_layers), decoded * step, decoded * prompt)]


def _layer_values(tokens: int, hidden: int, mlp: int) -> float:
    """Korthikanti et al. (2022): values one layer keeps for backward, t·h·(10 + 24·F/(4h)) for t tokens.

    Fused attention (no s² scores); F is the FFN width a token passes through (``_Counts.mlp``).
    """
    return tokens * hidden * (10 + 24 * mlp / (4 * hidden))


def step_activations(cfg: RunConfig, config: PretrainedConfig, *, mlp: int, rows: int, num_options: int = 1,
                     width: float = 4.0) -> float:
    """Bytes of the activations one training step of ``rows`` examples keeps for its backward pass.

    Per layer ``_layer_values`` for its tokens, with F = ``mlp``: the MoE block counted for its k routed experts
    of width I and its shared experts; a decoder layer adds the keys and values of the encoded prompt its
    cross-attention reads. With gradient checkpointing: each layer's input plus one layer's activations.
    """
    h = int(config.hidden_size)

    def per_layer(stack: _Stack) -> float:
        return _layer_values(stack.tokens, h, mlp) + 2 * stack.attended * h

    stacks = _stacks(cfg, config, rows=rows, num_options=num_options)
    if cfg.train.gradient_checkpointing:  # each layer keeps its input; one layer's activations exist at a time
        return (sum(st.layers * st.tokens * h for st in stacks) + max(per_layer(st) for st in stacks)) * width
    return sum(st.layers * per_layer(st) for st in stacks) * width


def forward_activations(cfg: RunConfig, config: PretrainedConfig, *, dense: int, rows: int, num_options: int = 1,
                        width: float = 4.0) -> float:
    """Bytes a forward pass without gradients over ``rows`` examples holds at its peak (one layer at a time).

    Per token, the larger of the attention's working set (``FORWARD_VALUES_PER_TOKEN_UNIT`` values a hidden
    unit) and an FFN run on every token at once (``dense`` wide: its gate, up and gated outputs, and the hidden
    states in and out).
    """
    h = int(config.hidden_size)
    per_token = max(FORWARD_VALUES_PER_TOKEN_UNIT * h, 3 * h + 3 * dense)
    stacks = _stacks(cfg, config, rows=rows, num_options=num_options)
    return max(per_token * st.tokens + 2 * st.attended * h for st in stacks) * width


def _half(cfg: RunConfig) -> bool:
    """Whether the frozen base is held in bf16 (on GPUs by default)."""
    return cfg.engine.precision == "bf16" or (cfg.engine.precision == "auto" and cfg.workers.gpus_per_worker > 0)


def worker_memory(cfg: RunConfig, model: PeftModel, *, num_options: int = 1) -> WorkerMemory:
    """The analytic device estimate for ``cfg``'s engine on ``model`` (``cfg``'s LoRA applied, usually on meta)."""
    c = _counts(model)
    group = cfg.engine.group_size if cfg.engine.backend == "deepspeed" else 1
    width = 2 if _half(cfg) else 4
    if cfg.model.quantization != "none":  # linear weights quantized, everything else in bf16
        resident = c.linear * _QUANTIZED_WIDTH[cfg.model.quantization] + (c.base - c.linear) * 2
        width = 2
    else:
        resident = (c.base - c.experts + c.experts / group) * width
    rows = -(-cfg.train.batch_size // group)  # a group splits each batch's rows over its ranks
    activations = step_activations(cfg, c.config, mlp=c.mlp, rows=rows, num_options=num_options, width=width)
    return WorkerMemory(base=resident, trainable=16.0 * c.trainable, activations=activations)


def check_gpu_packing(cfg: RunConfig, need: WorkerMemory, gpu_bytes: float, *, headroom: float = 0.9) -> None:
    """ConfigError naming the numbers when the workers packed onto one GPU do not fit ``headroom`` of it."""
    share = cfg.workers.gpus_per_worker
    if share <= 0:
        return
    per_gpu = max(1, round(1 / share)) if share < 1 else 1
    if per_gpu * need.total > headroom * gpu_bytes:
        fits = int(headroom * gpu_bytes // need.total)
        hint = f"at most {fits} per GPU (workers.gpus_per_worker >= {1 / fits:.3g})" if fits else "none fits one GPU"
        raise ConfigError(
            f"workers.gpus_per_worker: {share:g} packs {per_gpu} worker(s) on a GPU of {gpu_bytes / GIB:.1f} GiB, "
            f"each needing ~{need.describe()}: {per_gpu * need.total / GIB:.2f} GiB > {headroom:.0%} of the GPU; {hint}"
        )


def measure_worker_memory(cfg: RunConfig, prepared: PreparedRun) -> WorkerMemory:
    """The torch engine's peak GPU memory, measured on this process's GPU.

    The engine is built, then trains one step on the ``train.batch_size`` longest training examples.
    """
    from aggregation.messages import ClientInstructions
    from fedsim.engine.torch_engine import TorchEngineSpec

    if prepared.task == "choice":  # each example is N rows of context + option
        choices = ChoiceSplit.load(prepared.train_path)
        every = choices.take(np.arange(len(choices)))
        lengths = every.context_len + every.option_len.max(axis=1)
    else:
        split = EncodedSplit.load(prepared.train_path)
        lengths = split.take(np.arange(len(split))).attention_mask.sum(axis=1)
    rows = np.argsort(-lengths, kind="stable")[: cfg.train.batch_size]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    one_step = cfg.train.model_copy(update={"local_steps": 1, "routing_stats": "off"})
    engine = TorchEngineSpec(base_path=prepared.base_path, train_path=prepared.train_path, test_path=prepared.test_path,
                             label_token_ids=prepared.label_token_ids, lora=cfg.lora, train=one_step, device="cuda",
                             task=prepared.task, option_score=cfg.data.scoring, quantization=cfg.model.quantization,
                             precision="bf16" if cfg.engine.precision in ("auto", "bf16") else "fp32")()
    resident = torch.cuda.memory_allocated() - start
    engine.train(rows, engine.initial_payload, ClientInstructions(client_id=-1, round_idx=0, seed=0))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    del engine
    torch.cuda.empty_cache()
    return WorkerMemory(base=float(resident), trainable=0.0, activations=float(peak - resident), source="measured")
