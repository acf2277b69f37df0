"""GPU memory of one worker, estimated before any actor starts, so a packing that cannot fit fails at once.

Flower's Ray engine leaves the packing of clients onto GPUs to the user and
reports an out-of-memory error minutes into a run. Here each worker's need is
the sum of:

- the frozen base model, resident (its parameters at the engine's precision,
  2 bytes in bf16; with ``model.quantization``, bitsandbytes' linear weights
  at 1 or ½ byte; with the deepspeed engine, only 1/G of the routed experts);
- the trainable state: LoRA factors and routers in fp32, their gradients and
  AdamW's two moments (16 bytes a value);
- activations of one training step at the configured batch size and the
  longest sequence, from the transformer activation count of Korthikanti et
  al. (2022) per layer, s·b·h·(10 + 24·(k·I)/(4h)) values with fused
  attention (no s² scores), the MoE block counted for its k routed experts
  of width I; with ``train.gradient_checkpointing``, each layer's input plus
  one layer's activations. A multiple-choice example is N rows (one per
  option) of its context and option.

The estimate is analytic; ``measure_worker_memory`` replaces it, for the torch
engine, by the peak measured over one training step where the driver has a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, PreTrainedModel

from aggregation.errors import ConfigError
from aggregation.payload import PAYLOAD_DTYPE
from fedsim.config import RunConfig
from fedsim.data.choice import ChoiceSplit
from fedsim.data.encoded import EncodedSplit
from fedsim.models import apply_lora, family_of
from fedsim.models.registry import model_class
from fedsim.prepare import PreparedRun

GIB = 2**30


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


def _trainable_values(cfg: RunConfig, model: PreTrainedModel) -> int:
    """Values of the LoRA factors and routers ``cfg`` trains on ``model``: the payload's length."""
    peft_model = apply_lora(model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=0.0,
                            lora_attention=cfg.lora.attention, lora_experts=cfg.lora.experts)
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def payload_nbytes(cfg: RunConfig, base_path: str) -> int:
    """Bytes of the global payload (and of one client's update) for ``cfg`` on the base at ``base_path``.

    Read on the meta device, before any worker builds the model.
    """
    config: Any = AutoConfig.from_pretrained(base_path)
    with torch.device("meta"):
        # transformers leaves the auto classes' from_config unannotated
        base: PreTrainedModel = model_class(config).from_config(config)  # type: ignore[no-untyped-call]
        values = _trainable_values(cfg, base)
    return int(values) * np.dtype(PAYLOAD_DTYPE).itemsize


def estimate_worker_memory(cfg: RunConfig, base_path: str, *, num_options: int = 1) -> WorkerMemory:
    """The analytic estimate for ``cfg``'s engine on the base saved at ``base_path`` (read on the meta device).

    ``num_options``: rows a training example takes (its options, for a multiple-choice task).
    """
    config: Any = AutoConfig.from_pretrained(base_path)
    with torch.device("meta"):
        # transformers leaves the auto classes' from_config unannotated
        model = model_class(config).from_config(config)  # type: ignore[no-untyped-call]
        base_values = sum(p.numel() for p in model.parameters())
        spec = family_of(model)
        expert_values = sum(p.numel() for m in spec.experts_modules(model) for p in m.parameters())
        skip = {id(p) for r in spec.routers(model) for p in r.parameters()}
        skip |= {id(model.get_output_embeddings().weight)}
        linear_values = sum(
            m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and id(m.weight) not in skip
        )
        trainable_values = _trainable_values(cfg, model)
    deepspeed = cfg.engine.backend == "deepspeed"
    group = cfg.engine.group_size if deepspeed else 1
    half = cfg.engine.precision == "bf16" or (cfg.engine.precision == "auto" and cfg.workers.gpus_per_worker > 0)
    width = 2 if half else 4
    if cfg.model.quantization != "none":  # linear weights quantized, everything else in bf16
        resident = linear_values * _QUANTIZED_WIDTH[cfg.model.quantization] + (base_values - linear_values) * 2
        width = 2
    else:
        resident = (base_values - expert_values + expert_values / group) * width
    per_rank_batch = -(-cfg.train.batch_size // group) * num_options  # a group splits each batch's rows over its ranks
    s = cfg.data.max_length + (cfg.data.max_option_length if num_options > 1 else 0)
    b, h = per_rank_batch, int(config.hidden_size)
    k, inner = spec.top_k(config), int(getattr(config, spec.expert_intermediate_key))
    per_layer = s * b * h * (10 + 24 * (k * inner) / (4 * h))
    decoder_layers = getattr(config, "num_decoder_layers", 0) if config.is_encoder_decoder else 0
    layers = int(config.num_hidden_layers) + int(decoder_layers)
    if cfg.train.gradient_checkpointing:  # each layer keeps its input; one layer's activations exist at a time
        activations = (layers * s * b * h + per_layer) * width
    else:
        activations = per_layer * layers * width
    return WorkerMemory(base=resident, trainable=16.0 * trainable_values, activations=activations)


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
