"""Each process's peak host memory (RSS), estimated before a run: ``fedsim plan``'s worker, aggregator and driver.

The run itself checks only a worker's GPU memory (``fedsim.memory``, its
packing check); these figures are what ``fedsim plan`` reports and holds a
machine or a cluster to, so they live beside it rather than in the run's path.
Each is a sum of named parts, read off the model's shapes on the meta device
with ``fedsim.memory``'s counts and activation formulas, or measured once
(the runtime constants below). docs/scale.md describes the model term by
term, with the measurements behind it.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft import PeftModel

from aggregation.payload import PayloadLayout
from aggregation.semantic_alignment import sigma_batch
from fedsim.config import RunConfig
from fedsim.memory import (
    _QUANTIZED_WIDTH,
    GIB,
    _counts,
    _half,
    _layer_values,
    _layers,
    forward_activations,
    step_activations,
)

# Resident memory of each process before it holds any data: peak RSS measured on x86-64 Linux, CPython 3.11,
# torch 2.13 (CPU), transformers 5.22, peft 0.21, ray 2.60 (2026-12-06). For reference, a bare
# `python -c 'import torch, transformers, peft, ray'` peaks at 0.41 GiB.
WORKER_RUNTIME = 0.572 * GIB  # a Ray actor that imported actors.worker and fedsim.engine.torch_engine
AGGREGATOR_RUNTIME = 0.300 * GIB  # a Ray actor that imported actors.aggregator and the strategies (no transformers)
DRIVER_RUNTIME = 0.558 * GIB  # `import fedsim.driver`
DRIVER_DATA = 0.08 * GIB  # the gensim topics corpus, its tokenizer and partitions, held by the driver (measured)


@dataclass(frozen=True)
class HostMemory:
    """One process's estimated peak resident memory (RSS), in bytes, by part.

    ``shared`` names the parts whose pages other processes of the node map
    too (the base's file in the page cache, the object store): each process's
    RSS counts them, a node holds them once.
    """

    parts: tuple[tuple[str, float], ...]
    shared: tuple[str, ...] = ()

    @property
    def total(self) -> float:
        """The peak RSS, in bytes: every part."""
        return float(sum(v for _, v in self.parts))

    @property
    def private(self) -> float:
        """Bytes only this process holds: the parts not in ``shared``."""
        return float(sum(v for k, v in self.parts if k not in self.shared))

    def part(self, name: str) -> float:
        """One part's bytes (0 when absent)."""
        return float(sum(v for k, v in self.parts if k == name))


def touched_base_values(model: PeftModel, *, tokenizer_vocab: int | None) -> int:
    """Base values a worker's passes read: all but the input embedding's rows no token id reaches.

    A base built here has a tokenizer of ``tokenizer_vocab`` ids and may have a larger ``vocab_size`` (a real
    configuration's): the rows past the tokenizer's are never looked up, so their pages of the mapped file are
    never read. The output layer computes every vocabulary logit, so a tied embedding is read whole.
    None (a pretrained base, with its own tokenizer): every row may be read.
    """
    c = _counts(model)
    embedding = model.get_input_embeddings().weight
    if tokenizer_vocab is None or embedding is model.get_output_embeddings().weight:
        return c.base
    rows, width = (int(n) for n in embedding.shape)
    return c.base - max(0, rows - tokenizer_vocab) * width


def worker_host(cfg: RunConfig, model: PeftModel, *, tokenizer_vocab: int | None, payload: int, update_object: int,
                instructions_object: int, updates_per_round: int, num_options: int = 1) -> HostMemory:
    """A worker's peak RSS: runtime, base, trainable state, buffers, a step and a forward pass, store pages.

    ``payload``: bytes of the global payload; ``update_object``: bytes of one ``ClientUpdate`` in the object store
    (delta, residual, routing statistics); ``instructions_object``: bytes of one client's instructions there (a
    residual or a start, else 0); ``updates_per_round``: clients this worker trains in a round.
    """
    c = _counts(model)
    on_gpu = cfg.workers.gpus_per_worker > 0
    quantized = cfg.model.quantization != "none"
    half = _half(cfg)
    group = cfg.engine.group_size if cfg.engine.backend == "deepspeed" else 1
    touched = touched_base_values(model, tokenizer_vocab=tokenizer_vocab) - c.experts * (1 - 1 / group)
    parts: list[tuple[str, float]] = [("runtime", WORKER_RUNTIME)]
    shared: list[str] = []
    if on_gpu:  # the base passes through the host on its way to the GPU, converted first when it is cast
        width = _QUANTIZED_WIDTH.get(cfg.model.quantization, 2.0 if half else 4.0)
        parts.append(("base, loading (host copy before the GPU)", touched * width))
    elif quantized or half:  # converted while loading: a private copy at its width
        resident = (c.linear * _QUANTIZED_WIDTH[cfg.model.quantization] + (touched - c.linear) * 2 if quantized
                    else touched * 2)
        parts.append(("base, converted (private)", resident))
    else:  # fp32 on the CPU: the saved file's pages, mapped, read when touched, shared by the node's workers
        parts.append(("base, mapped file", touched * 4.0))
        shared.append("base, mapped file")
    buffers = 2 + (3 if cfg.compression.uplink != "none" else 0) + (1 if instructions_object else 0)
    parts += [("trainable state (16 B/value)", 16.0 * c.trainable),
              (f"payload buffers ({buffers} × payload)", buffers * payload)]
    if not on_gpu:
        width = 2.0 if half or quantized else 4.0
        rows = -(-cfg.train.batch_size // group)
        stats_rows = 2 * cfg.train.batch_size if cfg.train.routing_stats == "after" else 0
        parts += [
            ("training step activations", step_activations(cfg, c.config, mlp=c.mlp, rows=rows,
                                                           num_options=num_options, width=width)),
            ("forward pass (evaluation / statistics)",
             forward_activations(cfg, c.config, dense=c.dense, rows=max(cfg.eval.batch_size, stats_rows),
                                 num_options=num_options, width=width)),
        ]
    # One round's objects: the store reuses a round's freed space in the next (a 2-round run at OLMoE's widths:
    # a worker's peak grew by 53 MiB in round 2 after writing 10 × 32 MiB updates in each round).
    written = updates_per_round * update_object
    read = payload + updates_per_round * instructions_object
    parts.append(("object store pages", float(written + read)))
    shared.append("object store pages")
    return HostMemory(tuple(parts), tuple(shared))


def aggregator_host(cfg: RunConfig, layout: PayloadLayout, *, cohort: int, update_object: int, routing_client: int,
                    moe_layers: int, num_experts: int, hidden_size: int) -> HostMemory:
    """The aggregator's peak RSS: runtime, the cohort's updates read zero-copy, the payloads, the strategy's state.

    ``cohort``: updates in a round; ``routing_client``: bytes of one client's routing statistics.
    """
    # The strategies' own arrays, their peak measured with tracemalloc at OLMoE's widths and 20 clients: FedAvg and
    # FedMoE 24 B a payload value, FedAdam 56, PFL-MoE 165 in round 1 (modelled 169), FedAlign-MoE 12.9 (its
    # terms below: 11.9; at DeepSeek-V2-Lite's and Switch-base-16's widths 11.8 and 7.1, modelled 11.1 and 6.7).
    values, name = layout.total, cfg.strategy.name
    clients_seen = min(cfg.data.num_clients, cfg.rounds * cohort)
    parts: list[tuple[str, float]] = [
        ("runtime", AGGREGATOR_RUNTIME),
        (f"{cohort} updates read zero-copy (object store)", float(cohort * update_object)),
        ("global payload in and new payload out (object store)", 2.0 * values * 4),
    ]
    block = layout.expert_block[1] - layout.expert_block[0]
    if name == "fedalign_moe":
        opts = cfg.strategy.fedalign
        shared_values = sum(e.size for e in layout.select(role="shared"))
        spans = [layout.expert_span(*key) for key in layout.expert_keys()]
        width = max((b - a for a, b in spans), default=0)
        batch = sigma_batch(cohort, hidden_size)  # experts whose σ terms are computed together
        parts += [
            ("float64 sums of the shared entries and the new payload", 8.0 * shared_values + 4.0 * values),
            # the deltas go to the aggregator's temporary file (aggregation/cohort_spool.py), not to memory
            ("the cohort's routing statistics, copied out of the object store", float(cohort * routing_client)),
            ("one expert slice × cohort (float32, and float64 in the merge)", 12.0 * cohort * width),
            ("one layer's routing statistics stacked, and its signatures μ",
             float(cohort * routing_client // max(moe_layers, 1)) + 8.0 * cohort * num_experts * hidden_size),
            ("σ terms of a batch of experts (float64 [k, N, d] and [k, N, N])",
             8.0 * batch * cohort * (hidden_size + 5 * cohort)),
            ("p_g and every client's α (float64)", 8.0 * (1 + clients_seen) * moe_layers * num_experts),
        ]
        if opts.expert_agg == "personalized":
            parts.append(("personal expert views (the cohort's and every client's)",
                          4.0 * block * (cohort + clients_seen)))
    elif name == "fedadam":
        parts.append(("float64 sum, moments m and v, and the step's float64 temporaries", 56.0 * values))
    elif name == "pfl_moe":
        parts += [("float64 sum and the new payload in float64", 20.0 * values),
                  ("the cohort's trained experts and every client's own", 4.0 * block * (cohort + clients_seen))]
    else:  # fedavg, fedprox, fedmoe, and a strategy named by import path (counted as FedAvg)
        parts.append(("float64 running sum, then θ and the mean in float64", 24.0 * values))
    if cfg.compression.uplink != "none" and cfg.compression.error_feedback:
        parts.append(("every sampled client's error-feedback residual", 4.0 * values * clients_seen))
    return HostMemory(tuple(parts), ("global payload in and new payload out (object store)",
                                     f"{cohort} updates read zero-copy (object store)"))


def driver_host(cfg: RunConfig, model: PeftModel, *, builds_base: bool, payload: int) -> HostMemory:
    """The driver's peak RSS: runtime and data, plus the base it builds in float32 when none is cached.

    Pretraining (``model.pretrain.steps`` > 0) adds the gradients and AdamW's moments of every parameter and the
    activations of a pretraining step. While the rounds run the driver holds no model, only a view of the payload.
    """
    parts: list[tuple[str, float]] = [("runtime", DRIVER_RUNTIME), ("data and tokenizer", DRIVER_DATA)]
    if builds_base:
        c = _counts(model)
        parts.append(("base being built (float32)", 4.0 * c.base))
        if cfg.model.pretrain.steps > 0:
            p = cfg.model.pretrain
            tokens = p.batch_size * p.block_size
            per_layer = _layer_values(tokens, int(c.config.hidden_size), c.mlp)
            logits = 2 * tokens * int(c.config.vocab_size)  # the logits over the vocabulary and their gradient
            parts += [("pretraining: gradients and AdamW moments (12 B/value)", 12.0 * c.base),
                      ("pretraining step activations and logits", 4.0 * (per_layer * _layers(c.config) + logits))]
    else:
        parts.append(("initial payload (object store view)", float(payload)))
    return HostMemory(tuple(parts), ())
