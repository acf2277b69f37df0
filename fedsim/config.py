"""The run configuration: one typed object, validated at load time.

YAML plus dotted ``key.sub=value`` overrides are merged, then validated by
pydantic with unknown keys forbidden, so a typo fails at once with a one-line
``ConfigError`` naming the dotted field instead of being silently ignored.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from aggregation.errors import ConfigError
from aggregation.fedadam import FedAdamOptions
from aggregation.fedalign_moe import FedAlignOptions
from aggregation.fedmoe import FedMoEOptions
from aggregation.fedprox import FedProxOptions
from aggregation.options import Options
from aggregation.pfl_moe import PFLMoEOptions
from aggregation.registry import is_import_path, strategy_class
from aggregation.strategy import Strategy


class PretrainConfig(Options):
    """Causal-LM pretraining of the base when no checkpoint is given (cached by hash)."""

    steps: int = Field(3000, ge=0, description="optimiser steps; 0 keeps the random init")
    batch_size: int = Field(16, ge=1)
    block_size: int = Field(96, ge=8)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    tokenizer_vocab: int = Field(4096, ge=300, description="BPE vocabulary trained on the corpus")
    seed: int = Field(0, ge=0, description="seed of the base's init and pretraining (not the run seed)")


class ModelConfig(Options):
    """The MoE base: a hub or local checkpoint, or a small model built from these shapes and pretrained."""

    family: str = Field(
        "mixtral",
        description="transformers model_type: mixtral | qwen3_moe | olmoe | qwen2_moe | deepseek_v3 | "
        "switch_transformers",
    )
    pretrained: str | None = Field(None, description="hub id or local directory; None builds from this config")
    hidden_size: int = Field(128, ge=8)
    num_layers: int = Field(4, ge=1)
    full_depth: int | None = Field(
        None, ge=1, description="the real model's depth when num_layers is reduced (`fedsim plan` gives its payload "
        "too); None: num_layers is the real depth. Never changes the base"
    )
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(256, ge=4)
    num_experts: int = Field(8, ge=2)
    top_k: int = Field(2, ge=1)
    max_position: int = Field(256, ge=16)
    quantization: Literal["none", "8bit", "4bit"] = Field(
        "none",
        description="load the frozen base quantized by bitsandbytes (the quantization extra; CPU or GPU workers)",
    )
    pretrain: PretrainConfig = PretrainConfig()
    hf_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="transformers config values set last on a built model (a real configuration's widths: "
        "vocab_size, kv_lora_rank, n_shared_experts, ...); not the fields above, which fedsim sets itself",
    )

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds num_experts={self.num_experts}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError("hidden_size must divide by num_heads and num_heads by num_kv_heads")
        if self.full_depth is not None and self.full_depth < self.num_layers:
            raise ConfigError(f"model.full_depth: {self.full_depth} is less than model.num_layers={self.num_layers}")
        return self


class LoraConfig(Options):
    """The LoRA adapters the clients train on the frozen base: rank, scale and which modules get one."""

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    attention: bool = True
    experts: bool = True
    routed_experts: bool = Field(
        True, description="compute the fused experts' LoRA on each expert's routed rows (same numbers as peft's "
        "path, cost follows the tokens); false: peft's own forward, which forms W + B·A for every expert"
    )


class DataConfig(Options):
    """The dataset, its schema and scoring, and its split into a test set and the clients' non-IID shards."""

    source: str = Field(
        "gensim_topics", description="gensim_topics | synthetic | local .json/.jsonl/.csv/.parquet | hub name"
    )
    format: Literal["text", "mmlu", "hellaswag"] = Field(
        "text", description="text: (text, label) classification scored by label word (AGNews); mmlu | hellaswag: "
        "multiple choice in that schema, scored by option log-likelihood"
    )
    hub_config: str | None = Field(None, description="hub dataset configuration, e.g. 'all' for cais/mmlu")
    split: str = Field("train", description="split read from a hub dataset (a local file is read as this split)")
    text_field: str = "text"
    label_field: str = "label"
    label_words: dict[str, str] | None = Field(
        None, description="text format: label name -> the word it is scored by (default: the label names themselves)"
    )
    partition_key: str | None = Field(
        None, description="column the non-IID partition splits by; default label (text), subject (mmlu), "
        "activity_label (hellaswag)"
    )
    max_option_length: int = Field(32, ge=1, description="mmlu/hellaswag: tokens kept of each option")
    option_score: Literal["sum", "mean"] | None = Field(
        None,
        description="mmlu/hellaswag: an option's log-likelihood summed or per token; default sum (mmlu), mean "
        "(hellaswag)",
    )
    num_clients: int = Field(10, ge=1)
    partition: Literal["iid", "dirichlet", "pathological", "natural"] = "dirichlet"
    alpha: float = Field(0.1, gt=0, description="Dirichlet concentration")
    labels_per_client: int = Field(2, ge=1, description="pathological partition: labels per client")
    min_examples: int = Field(8, ge=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = Field(0, ge=0, description="seed of the train/test split by document (not the run seed)")
    max_length: int = Field(96, ge=8, description="tokens per example, prompt and label word included")
    synthetic_docs_per_label: int = Field(60, ge=2)
    min_words: int = Field(40, ge=1, description="gensim_topics: shortest chunk of a document, in words")
    max_words: int = Field(
        64, ge=1, description="gensim_topics: longest chunk (longer chunks: more evidence per example)"
    )
    max_per_class: int = Field(500, ge=1, description="gensim_topics: chunks kept per class")

    @model_validator(mode="after")
    def _format(self) -> DataConfig:
        if self.format != "text" and self.source in ("gensim_topics", "synthetic"):
            raise ValueError(
                f"format {self.format!r} reads a file or hub dataset in that schema, not source={self.source!r}"
            )
        return self

    @property
    def partition_by(self) -> str:
        """The column the non-IID partition splits by."""
        default = {"text": "label", "mmlu": "subject", "hellaswag": "activity_label"}[self.format]
        return self.partition_key or default

    @property
    def scoring(self) -> Literal["sum", "mean"]:
        """How an option's log-likelihood is scored."""
        return self.option_score or ("mean" if self.format == "hellaswag" else "sum")


class TrainConfig(Options):
    """A client's local training in a round: optimiser, steps, loss and how its routing statistics are read."""

    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    local_epochs: int = Field(1, ge=1)
    local_steps: int | None = Field(None, ge=1, description="caps the steps per client when set")
    batch_size: int = Field(16, ge=1)
    grad_clip: float = Field(1.0, ge=0, description="max grad norm; 0 disables clipping")
    loss: Literal["label_words", "vocab"] = Field(
        "label_words", description="cross-entropy over the label words only (verbaliser) or over the whole vocabulary"
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute each decoder layer's activations in the backward pass (less memory, more compute)",
    )
    routing_stats: Literal["after", "during", "off"] = Field(
        "after",
        description="after: one no-grad pass after local training (the spec's); during: read off the training "
        "forward passes (no extra pass); off: none",
    )

    def client_work(self, n_examples: int) -> float:
        """A client's share of a round's compute, in training rows: what the worker pool balances.

        With ``local_steps`` every client big enough trains the same number of
        rows, whatever its size; the ``after`` statistics pass reads each
        example once more, forward only: about half a training row
        (``benchmarks/expert_lora.py``: 0.47–0.55 at real widths on the routed
        path, whose backward skips the frozen weights' gradients).
        """
        rows = self.local_epochs * n_examples
        if self.local_steps is not None:
            rows = min(rows, self.local_steps * self.batch_size)
        return rows + (n_examples / 2 if self.routing_stats == "after" else 0.0)


class StrategyConfig(Options):
    """The server's aggregation strategy (``name``), its options, and the update guard's norm limit.

    Each built-in strategy's options are its own type (``options_type``, next to
    its code), embedded here as one section; a user's strategy, named by import
    path, takes its options under ``options``, validated by its own type.
    """

    name: str = Field("fedavg", description="a built-in's name, or a class as 'package.module:Class'")
    fedprox: FedProxOptions = FedProxOptions()
    fedadam: FedAdamOptions = FedAdamOptions()
    fedmoe: FedMoEOptions = FedMoEOptions()
    pfl_moe: PFLMoEOptions = PFLMoEOptions()
    fedalign: FedAlignOptions = FedAlignOptions()
    options: dict[str, Any] | None = Field(None, description="a strategy named by import path: its options")
    max_update_norm: float | None = Field(
        None, gt=0, allow_inf_nan=False,
        description="reject client updates whose L2 norm exceeds this; NaN/Inf and wrong layouts are always rejected",
    )

    @model_validator(mode="after")
    def _known_strategy(self) -> StrategyConfig:
        """Resolve ``name`` and validate a user strategy's ``options`` now: a bad one fails before Ray starts.

        Raises ConfigError (not ValueError) so its message, which names the dotted field, reaches the user as is.
        """
        cls = strategy_class(self.name)
        if not is_import_path(self.name):
            if self.options is not None:
                section = _SECTIONS.get(self.name)
                where = f"its options are under strategy.{section}" if section else "it takes no options"
                raise ConfigError(f"strategy.options: only for a strategy named by import path; {self.name}: {where}")
            return self
        try:
            cls.options_type.model_validate(self.options or {})
        except ValidationError as err:
            raise ConfigError(_format_error(err, prefix="strategy.options")) from None
        return self

    def strategy_class(self) -> type[Strategy]:
        """The configured strategy's class."""
        return strategy_class(self.name)

    def strategy_options(self) -> Options:
        """The configured strategy's options, of its own ``options_type``."""
        if is_import_path(self.name):
            return self.strategy_class().options_type.model_validate(self.options or {})
        section = _SECTIONS.get(self.name)
        return getattr(self, section) if section else Options()

    def needs_routing_stats(self) -> bool:
        """Whether the server reads the clients' routing statistics."""
        return self.strategy_class().reads_routing_stats(self.strategy_options())


# the section of StrategyConfig that holds each built-in's options
_SECTIONS = {"fedprox": "fedprox", "fedadam": "fedadam", "fedmoe": "fedmoe", "pfl_moe": "pfl_moe",
             "fedalign_moe": "fedalign"}


class WorkersConfig(Options):
    """The Ray worker pool: how many workers, their CPUs and GPUs, placement and failure handling."""

    num_workers: int = Field(0, ge=0, description="0: as many as the CPUs (or GPUs) allow")
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0, description="fractional values pack workers on one GPU")
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="memory of one GPU, for the packing check; None reads it from a GPU of the cluster"
    )
    placement: Literal["pack", "spread"] = Field(
        "pack", description="plain workers: packed onto few nodes, or spread over as many nodes as possible"
    )
    ray_address: str | None = Field(None, description="None starts an embedded local Ray")
    ray_num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded Ray (default: all)")
    aggregator_cpus: int = Field(
        1, ge=1, description="CPUs reserved for the aggregator actor, and its BLAS / torch threads. 1: none reserved, "
        "one thread (it mostly waits on the workers); more only where those cores are free: BLAS threads that share "
        "busy cores spin-wait on each other"
    )
    max_restarts: int = Field(2, ge=0, description="times Ray restarts a worker process that died")
    max_task_retries: int = Field(2, ge=0, description="times a client whose worker died is retried")
    on_client_failure: Literal["drop", "stop"] = Field(
        "drop", description="a client that still fails: dropped from its round (logged, counted) or the run stops"
    )

    @model_validator(mode="after")
    def _aggregator_fits(self) -> WorkersConfig:
        if self.ray_num_cpus is not None and self.aggregator_cpus > self.ray_num_cpus:
            raise ConfigError(
                f"workers.aggregator_cpus: {self.aggregator_cpus} is more than workers.ray_num_cpus={self.ray_num_cpus}"
            )
        return self


class EngineConfig(Options):
    """How a client is trained: one process (torch) or a worker group with experts sharded (deepspeed)."""

    backend: Literal["torch", "deepspeed"] = Field(
        "torch", description="torch: HF + peft in one worker; deepspeed: experts sharded over a group of workers"
    )
    group_size: int = Field(1, ge=1, description="deepspeed: workers per group = expert-parallel size G")
    zero_stage: int = Field(0, ge=0, le=2, description="deepspeed: ZeRO stage 0-2 (3 does not support MoE)")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on GPUs, fp32 on CPU. bf16: frozen base in bf16, LoRA and routers in fp32, "
        "forward passes under autocast (deepspeed: its bf16 mode)"
    )
    profile_alltoall: bool = Field(False, description="deepspeed: time the all-to-all exchanges (synchronises)")

    @model_validator(mode="after")
    def _torch_options(self) -> EngineConfig:
        if self.backend == "torch" and self.group_size != 1:
            raise ValueError("group_size > 1 needs backend 'deepspeed'")
        return self


class EvalConfig(Options):
    """Evaluation of the global model on the test set: every ``every`` rounds, in batches of ``batch_size``."""

    every: int = Field(1, ge=1)
    batch_size: int = Field(64, ge=1)


class FaultsConfig(Options):
    """Fault injection for testing failure handling, in the rounds ``fail_rounds`` (empty: every round)."""

    fail_clients: list[int] = Field(default_factory=list, description="these clients raise")
    nan_clients: list[int] = Field(default_factory=list, description="these clients return a NaN update")
    fail_rounds: list[int] = Field(default_factory=list, description="empty: every round")


class CompressionConfig(Options):
    """Lossy encoding of client updates on the uplink (aggregation/compression.py); bytes counted as encoded."""

    uplink: Literal["none", "fp16", "bf16", "int8", "topk"] = Field(
        "none", description="codec per payload slice: 16-bit floats, int8 with a scale per slice, or top-k"
    )
    topk_fraction: float = Field(0.1, gt=0, le=1, description="share of each slice's values top-k keeps")
    error_feedback: bool = Field(True, description="carry what the codec dropped to the client's next round")


class SystemConfig(Options):
    """Systems heterogeneity on a simulated clock (fedsim/sim/)."""

    profiles: str = Field(
        "uniform", description="uniform | random (slow_fraction, slow_factor) | a csv/json/parquet file with columns "
        "client, speed_factor, downlink_mbps, uplink_mbps, latency_s | a FedScale device capacity pickle (.pkl)",
    )
    slow_fraction: float = Field(0.0, ge=0, le=1, description="random profiles: share of clients that are slow")
    slow_factor: float = Field(1.0, ge=1, allow_inf_nan=False, description="random profiles: their compute slowdown")
    downlink_mbps: float | None = Field(None, gt=0, description="random/uniform profiles: None is free")
    uplink_mbps: float | None = Field(None, gt=0)
    latency_s: float = Field(0.0, ge=0)
    seconds_per_example: float | None = Field(
        None, gt=0, description="None: measured compute seconds; a number: a reproducible compute model"
    )
    policy: Literal["wait_all", "deadline", "over_select", "async"] = Field(
        "wait_all",
        description="async: FedBuff-style buffered asynchronous aggregation (clients_per_round train at once)",
    )
    async_buffer: int | None = Field(None, ge=1, description="policy async: updates per server step K (None: half the "
                                     "clients in flight)")
    staleness_exponent: float = Field(0.5, ge=0, description="policy async: weight discount (1 + staleness)^-a")
    deadline_s: float | None = Field(None, gt=0, description="policy deadline: updates later than this are dropped")
    over_selection: float = Field(0.3, ge=0, description="policy over_select: sample ⌈k·(1 + r)⌉, keep the first k")
    availability: float = Field(1.0, gt=0, le=1, description="probability a client is online when a round samples")
    availability_trace: str | None = Field(
        None, description="a FedScale client behaviour trace (.pkl): clients are online per its active intervals"
    )

    @model_validator(mode="after")
    def _deadline(self) -> SystemConfig:
        if self.policy == "deadline" and self.deadline_s is None:
            raise ValueError("policy 'deadline' needs deadline_s")
        return self


class LoggingConfig(Options):
    """Optional outputs beyond the run's tables: TensorBoard scalars and the aggregator's memory reading."""

    tensorboard: bool = Field(False, description="TensorBoard scalars under RUN_DIR/tensorboard (needs the extra)")
    aggregator_memory: bool = Field(
        False, description="read the aggregator's private memory (USS) after every round (~6 ms on its critical path)"
    )


class CheckpointConfig(Options):
    """Run state written after every ``every`` rounds (and the last) for ``fedsim resume``."""

    every: int = Field(1, ge=0, description="rounds between checkpoints; 0 disables them")


class RunConfig(Options):
    """One run's whole configuration: its name, seed, rounds and cohort, and one section per concern."""

    name: str = Field("run", pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = Field(0, ge=0)
    rounds: int = Field(20, ge=1)
    clients_per_round: int = Field(10, ge=1)
    out_dir: str = "runs"
    cache_dir: str = ".cache/fedsim"
    progress: bool = True
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    strategy: StrategyConfig = StrategyConfig()
    workers: WorkersConfig = WorkersConfig()
    engine: EngineConfig = EngineConfig()
    eval: EvalConfig = EvalConfig()
    faults: FaultsConfig = FaultsConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    compression: CompressionConfig = CompressionConfig()
    system: SystemConfig = SystemConfig()

    @model_validator(mode="after")
    def _cohort(self) -> RunConfig:
        if self.clients_per_round > self.data.num_clients:
            raise ValueError(
                f"clients_per_round: {self.clients_per_round} exceeds data.num_clients={self.data.num_clients}"
            )
        for name in ("fail_clients", "nan_clients"):
            unknown = [c for c in getattr(self.faults, name) if not 0 <= c < self.data.num_clients]
            if unknown:
                raise ValueError(
                    f"faults.{name}: no client has id {unknown[0]} (ids are 0..{self.data.num_clients - 1})"
                )
        late = [r for r in self.faults.fail_rounds if not 1 <= r <= self.rounds]
        if late:
            raise ValueError(f"faults.fail_rounds: no round {late[0]} (rounds are 1..{self.rounds})")
        if self.train.gradient_checkpointing and self.train.routing_stats == "during":
            raise ValueError(
                "train.gradient_checkpointing: it recomputes the routers in the backward pass, which would "
                "count their tokens twice: use train.routing_stats='after'"
            )
        if self.engine.backend == "deepspeed":
            if self.model.pretrained is None and self.model.num_experts % self.engine.group_size:
                raise ValueError(
                    f"engine.group_size: {self.engine.group_size} does not divide "
                    f"model.num_experts={self.model.num_experts}"
                )
            if not self.lora.experts:
                raise ValueError(
                    "lora.experts: engine.backend='deepspeed' shards the experts' LoRA: it needs lora.experts=true"
                )
            if self.model.family == "switch_transformers":
                raise ValueError(
                    "engine.backend: 'deepspeed' shards fused expert tensors; switch_transformers keeps one "
                    "module per expert: use engine.backend='torch'"
                )
            gpus = self.workers.gpus_per_worker
            if gpus and gpus != int(gpus):
                raise ValueError(
                    "workers.gpus_per_worker: engine.backend='deepspeed' needs whole GPUs per worker (NCCL), "
                    f"got workers.gpus_per_worker={gpus}"
                )
            if self.engine.precision == "bf16" and not gpus:
                raise ValueError(
                    "engine.precision: 'bf16' needs GPUs (workers.gpus_per_worker >= 1); CPU runs use fp32"
                )
            if self.model.quantization != "none":
                raise ValueError(
                    "model.quantization: the deepspeed engine shards a full-precision base; use engine.backend='torch'"
                )
        if self.system.policy == "async":
            if (self.system.async_buffer or 1) > self.clients_per_round:
                raise ValueError(f"system.async_buffer: {self.system.async_buffer} exceeds the clients in flight "
                                 f"(clients_per_round={self.clients_per_round})")
            if self.clients_per_round >= self.data.num_clients:
                raise ValueError("system.policy: 'async' needs clients_per_round < data.num_clients: a client that "
                                 "arrives is replaced by one not already training")
        if self.train.routing_stats == "off" and self.strategy.needs_routing_stats():
            raise ValueError(
                f"train.routing_stats: 'off', but strategy.name={self.strategy.name!r} reads routing statistics"
            )
        return self

    def digest(self, *sections: str) -> str:
        """Short hash of the named sections (all when none), for cache keys."""
        dumped = self.model_dump(mode="json")
        chosen = {k: dumped[k] for k in sections} if sections else dumped
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{k}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``a.b=value`` strings to (path, YAML-parsed value) pairs."""
    pairs = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        pairs.append((key.strip(), value))
    return pairs


def _format_error(err: ValidationError, prefix: str = "") -> str:
    """The first error as ``field.path: what is wrong (got value)``.

    A check across sections (``RunConfig``'s own validator) has no location;
    its message starts with the field it names.
    """
    first = err.errors()[0]
    loc = ".".join([prefix] * bool(prefix) + [str(p) for p in first["loc"]])
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    msg = msg.removeprefix("Value error, ")
    more = f" (and {len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    value = first.get("input")
    shown = "" if first["type"] == "extra_forbidden" or isinstance(value, dict) or not loc else f" (got {value!r})"
    return f"{loc}: {msg}{shown}{more}" if loc else f"{msg}{more}"


# PyYAML ships no type stubs (types-PyYAML is not a dependency), so mypy sees SafeLoader as Any
class _UniqueKeyLoader(yaml.SafeLoader):  # type: ignore[misc]  # subclassing Any: see above
    """A safe YAML loader that refuses a mapping with a key given twice (YAML itself keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
            seen.add(key)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def read_yaml_file(path: Path, field: str) -> Any:
    """A YAML file's contents; a one-line ConfigError naming ``field`` and the file for anything unreadable."""
    if path.is_dir():
        raise ConfigError(f"{field}: {path} is a directory, not a file")
    if not path.is_file():
        raise ConfigError(f"{field}: file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{field}: {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(f"{path} {exc}") from None
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" line {line + 1}" if line is not None else ""
        raise ConfigError(f"{path}{where}: not valid YAML") from None


# keys an earlier release had, and where they are now: an old config fails with the new place named
_MOVED = {"strategy.prox_mu": "strategy.fedprox.mu", "train.routing_reg": "strategy.fedalign.reg_form"}


def _moved(tree: dict[str, Any], *, migrate: bool) -> None:
    """Refuse a key that moved, naming its new place; or, with ``migrate``, move its value there."""
    for old, new in _MOVED.items():
        section, key = old.split(".")
        node = tree.get(section)
        if not (isinstance(node, dict) and key in node):
            continue
        if not migrate:
            raise ConfigError(f"{old}: moved to {new}")
        value = node.pop(key)
        _set_dotted(tree, new, value)


def load_config(path: str | Path | None, overrides: list[str] | None = None, *, migrate: bool = False) -> RunConfig:
    """Read YAML (if given), apply overrides, validate; raise ConfigError naming the field or file.

    ``migrate``: keys an earlier release had move to their new place instead of failing (``fedsim resume`` of
    a run directory whose ``config.yaml`` an earlier release wrote).
    """
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        loaded = read_yaml_file(p, "--config")
        if loaded is None:
            raise ConfigError(
                f"--config: {p} is empty; give the settings to change, or leave --config out for the defaults"
            )
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of keys")
        tree = loaded
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    _moved(tree, migrate=migrate)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None
