"""What a run of a config costs, before anything runs: ``fedsim plan``.

Everything here is read off the model's shapes on the meta device (no memory,
no base built, no data read, no Ray): the parameters, the payload by class
at the configured depth and at the real one (``model.full_depth``), the bytes
a round moves down and up and holds in the object store, and the peak memory
of a worker, the aggregator and the driver, each with its parts
(``fedsim.host_memory``, ``fedsim.memory``; docs/scale.md gives each term
and where it comes from). ``check_fits`` compares the figures with a machine
or a Ray cluster (``Capacity``) and raises a one-line ConfigError naming what
does not fit; ``fedsim.plan_report`` writes them out as text.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
from transformers import AutoConfig, PreTrainedModel

from aggregation.errors import ConfigError
from aggregation.payload import PAYLOAD_DTYPE, ROLES, PayloadLayout
from fedsim.config import RunConfig
from fedsim.host_memory import HostMemory, aggregator_host, driver_host, worker_host
from fedsim.memory import GIB, WorkerMemory, adapted, check_gpu_packing, worker_memory
from fedsim.models import build_layout, build_model, family_of
from fedsim.models.registry import model_class
from fedsim.prepare import _base_key
from fedsim.sim.availability import over_selected

Parts = tuple[tuple[str, float], ...]
# Bytes a client's RoutingStats take on the wire besides its arrays: n_tokens (aggregation/routing_stats.py)
_ROUTING_SCALAR = 8
_ROUTING_ITEM = np.dtype(np.float64).itemsize  # its arrays are float64 sums


@dataclass(frozen=True)
class Depth:
    """The payload at one depth, and one client's traffic: bytes."""

    layers: int
    moe_layers: int
    params: int  # every parameter of the adapted model (base and LoRA factors)
    trainable: int  # LoRA factors and routers: the payload's values
    by_role: dict[str, int]  # payload bytes per class: shared, router, expert
    update: int  # one client's update as sent (encoded when compression is on)
    routing: int  # one client's routing statistics

    @property
    def payload(self) -> int:
        """Bytes of the global payload (float32)."""
        return sum(self.by_role.values())


@dataclass(frozen=True)
class Plan:
    """A run's figures, before it runs: parameters, bytes per round, object store and memory, in bytes."""

    name: str
    family: str
    strategy: str
    depths: tuple[Depth, ...]  # the configured depth, then the full depth when it differs
    clients_per_round: int  # updates a round holds at once (over-selection included)
    num_workers: int  # workers (deepspeed: groups)
    worker_processes: int  # worker processes: num_workers × the group size
    object_store: Parts  # bytes a round holds in the object store
    worker: HostMemory
    aggregator: HostMemory
    driver: HostMemory
    worker_gpu: WorkerMemory | None  # GPU memory of one worker, when workers take GPUs
    builds_base: bool  # the driver builds the base (none cached, none pretrained)
    config: RunConfig = field(repr=False, compare=False)

    @property
    def configured(self) -> Depth:
        """The payload at the configured depth."""
        return self.depths[0]

    @property
    def bytes_down(self) -> int:
        """Bytes a round sends down: the payload to every client (instructions, a few hundred bytes, not counted)."""
        return self.clients_per_round * self.configured.payload

    @property
    def bytes_up(self) -> int:
        """Bytes a round sends up: every client's update as sent and its routing statistics."""
        return self.clients_per_round * (self.configured.update + self.configured.routing)

    @property
    def object_store_bytes(self) -> int:
        """Bytes a round holds in the object store at its peak."""
        return int(sum(v for _, v in self.object_store))

    def to_dict(self) -> dict[str, Any]:
        """The figures as plain JSON types (``fedsim plan --json``)."""

        def parts(figure: HostMemory) -> dict[str, Any]:
            return {"total": figure.total, "private": figure.private, "parts": dict(figure.parts),
                    "shared": list(figure.shared)}

        return {
            "name": self.name, "family": self.family, "strategy": self.strategy,
            "clients_per_round": self.clients_per_round, "num_workers": self.num_workers,
            "worker_processes": self.worker_processes, "builds_base": self.builds_base,
            "depths": [{**{k: v for k, v in vars(d).items() if k != "by_role"}, "payload": d.payload,
                        "payload_by_role": dict(d.by_role)} for d in self.depths],
            "bytes_down_per_round": self.bytes_down, "bytes_up_per_round": self.bytes_up,
            "object_store_per_round": {"total": self.object_store_bytes, "parts": dict(self.object_store)},
            "memory": {"worker": parts(self.worker), "aggregator": parts(self.aggregator),
                       "driver": parts(self.driver),
                       "worker_gpu": None if self.worker_gpu is None else {
                           "total": self.worker_gpu.total, "base": self.worker_gpu.base,
                           "trainable": self.worker_gpu.trainable, "activations": self.worker_gpu.activations}},
        }  # fmt: skip


@dataclass(frozen=True)
class Capacity:
    """What a run can use: this machine, or the nodes of a Ray cluster (bytes, counts)."""

    where: str  # "this machine" or "the cluster at ADDRESS"
    memory: float  # RAM of the nodes together
    largest_node: float  # RAM of the largest node
    nodes: int
    cpus: float
    gpus: float
    gpu_memory: float | None  # one GPU's memory; None when unknown
    object_store: float  # the object store's capacity, all nodes together
    driver_memory: float  # RAM of this machine, where the driver runs (and builds the base)


def local_capacity(cfg: RunConfig) -> Capacity:
    """The local host as an embedded Ray would see it: its RAM, ``workers.ray_num_cpus`` (or all) CPUs, its GPUs.

    The object store is Ray's default size: 30 % of the available memory, capped at the shared-memory
    filesystem (ray._private.utils.resolve_object_store_memory).
    """
    ram = psutil.virtual_memory()
    shm = shutil.disk_usage("/dev/shm").free if Path("/dev/shm").is_dir() else ram.total
    store = min(0.3 * ram.available, max(1e10, 0.95 * shm), 200e9)
    gpus, gpu_memory = 0.0, None
    if cfg.workers.gpus_per_worker > 0 and torch.cuda.is_available():
        gpus = float(torch.cuda.device_count())
        gpu_memory = float(torch.cuda.get_device_properties(0).total_memory)
    if cfg.workers.gpu_memory_gib:
        gpu_memory = cfg.workers.gpu_memory_gib * GIB
    return Capacity(where="this machine", memory=float(ram.total), largest_node=float(ram.total), nodes=1,
                    cpus=float(cfg.workers.ray_num_cpus or os.cpu_count() or 1), gpus=gpus, gpu_memory=gpu_memory,
                    object_store=float(store), driver_memory=float(ram.total))


def cluster_capacity(cfg: RunConfig, nodes: list[dict[str, Any]], address: str) -> Capacity:
    """A Ray cluster's capacity from ``ray.nodes()``: each alive node's memory, object store, CPUs and GPUs.

    Ray's ``memory`` resource is what it leaves to processes besides the object store; a node's RAM is taken
    as the two together. A GPU's memory is ``workers.gpu_memory_gib`` (None, unchecked, when unset).
    """
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    ram = [float(r.get("memory", 0.0)) + float(r.get("object_store_memory", 0.0)) for r in alive]
    return Capacity(
        where=f"the cluster at {address}", memory=sum(ram), largest_node=max(ram, default=0.0), nodes=len(alive),
        cpus=sum(float(r.get("CPU", 0.0)) for r in alive), gpus=sum(float(r.get("GPU", 0.0)) for r in alive),
        gpu_memory=cfg.workers.gpu_memory_gib * GIB if cfg.workers.gpu_memory_gib else None,
        object_store=sum(float(r.get("object_store_memory", 0.0)) for r in alive),
        driver_memory=float(psutil.virtual_memory().total),
    )


def meta_model(cfg: RunConfig, *, num_layers: int | None = None) -> PreTrainedModel:
    """``cfg``'s base on the meta device at ``num_layers`` (default: the configured depth), shapes only.

    A pretrained base is built from its own config (``model.pretrained``), at its own depth.
    """
    m = cfg.model
    if m.pretrained:
        path = Path(m.pretrained).expanduser()
        if (path.is_absolute() or m.pretrained.startswith((".", "~"))) and not path.exists():
            raise ConfigError(f"model.pretrained: no such directory '{path}'")
        try:
            config: Any = AutoConfig.from_pretrained(m.pretrained)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"model.pretrained: cannot read a config from '{m.pretrained}': "
                              f"{str(exc).splitlines()[0]}") from None
        with torch.device("meta"):
            # transformers leaves the auto classes' from_config unannotated
            model: PreTrainedModel = model_class(config).from_config(config)  # type: ignore[no-untyped-call]
        return model
    return build_model(
        m.family, vocab_size=m.pretrain.tokenizer_vocab, hidden_size=m.hidden_size,
        num_layers=num_layers or m.num_layers, num_heads=m.num_heads, num_kv_heads=m.num_kv_heads,
        intermediate_size=m.intermediate_size, num_experts=m.num_experts, top_k=m.top_k,
        max_position=m.max_position, seed=m.pretrain.seed, overrides=m.hf_overrides, device="meta",
    )  # fmt: skip


def encoded_nbytes(codec: str, values: int, fraction: float) -> int:
    """Bytes one payload slice of ``values`` takes on the uplink under ``codec`` (aggregation/compression.py)."""
    if codec == "none":
        return 4 * values
    if codec in ("fp16", "bf16"):
        return 2 * values
    if codec == "int8":  # a byte a value and one float32 scale
        return values + 4
    if codec == "topk":  # the kept values (float32) and their indices (int32)
        return 8 * min(values, max(1, math.ceil(fraction * values))) if values else 0
    raise ConfigError(f"compression.uplink: unknown codec {codec!r}")


def update_nbytes(cfg: RunConfig, layout: PayloadLayout) -> int:
    """One client's update as sent: every payload slice, encoded per ``compression``."""
    c = cfg.compression
    return sum(encoded_nbytes(c.uplink, b - a, c.topk_fraction) for a, b in layout.class_spans().values())


def routing_nbytes(moe_layers: int, num_experts: int, hidden_size: int) -> int:
    """One client's routing statistics (``RoutingStats.nbytes`` summed over its MoE layers).

    Per layer n_tokens plus four float64 arrays: p_sum, counts, margin_sum [E] and x_sum [E, d].
    """
    return moe_layers * (_ROUTING_SCALAR + _ROUTING_ITEM * (3 * num_experts + num_experts * hidden_size))


def _depth(cfg: RunConfig, model: Any, layout: PayloadLayout, layers: int) -> Depth:
    spec = family_of(model)
    config = model.get_base_model().config
    moe_layers = len(spec.moe_blocks(model))
    itemsize = np.dtype(PAYLOAD_DTYPE).itemsize
    by_role: dict[str, int] = {role: itemsize * sum(e.size for e in layout.select(role=role)) for role in ROLES}
    stats = 0 if cfg.train.routing_stats == "off" else routing_nbytes(
        moe_layers, spec.num_experts(config), int(config.hidden_size))
    return Depth(layers=layers, moe_layers=moe_layers, params=int(sum(p.numel() for p in model.parameters())),
                 trainable=layout.total, by_role=by_role, update=update_nbytes(cfg, layout), routing=stats)


def updates_in_flight(cfg: RunConfig) -> int:
    """The most updates one round (or, asynchronously, the clients in flight) holds at once."""
    if cfg.system.policy == "over_select":
        return over_selected(cfg.clients_per_round, cfg.system.over_selection, cfg.data.num_clients)
    return cfg.clients_per_round


def worker_cpus(cfg: RunConfig, capacity: Capacity) -> float:
    """The CPUs left to the workers: all but those reserved for the aggregator (``workers.aggregator_cpus`` > 1).

    As ``actors.aggregator.reserved_cpus`` reserves them: none for 1 (the actor mostly waits), else all of them.
    """
    reserved = cfg.workers.aggregator_cpus if cfg.workers.aggregator_cpus > 1 else 0
    return capacity.cpus - reserved


def workers_for(cfg: RunConfig, capacity: Capacity) -> int:
    """The workers (deepspeed: groups) a run gets: ``workers.num_workers``, or as many as the CPUs and GPUs allow.

    At least one, so a plan shows one worker's figures where none fits (``check_fits`` then says so).
    """
    w = cfg.workers
    if w.num_workers:
        return w.num_workers
    group = cfg.engine.group_size if cfg.engine.backend == "deepspeed" else 1
    fit = int(round(worker_cpus(cfg, capacity) / (w.cpus_per_worker * group), 6))
    if w.gpus_per_worker > 0:
        fit = min(fit, int(round(capacity.gpus / (w.gpus_per_worker * group), 6)))
    return max(1, fit)


def base_cached(cfg: RunConfig) -> bool:
    """Whether the run will find its base: pretrained, or built before under ``cache_dir``."""
    if cfg.model.pretrained:
        return True
    return (Path(cfg.cache_dir) / f"base-{cfg.model.family}-{_base_key(cfg)}").is_dir()


def plan(cfg: RunConfig, *, num_workers: int | None = None, builds_base: bool | None = None) -> Plan:
    """The figures of a run of ``cfg``, from its model's shapes on the meta device.

    ``num_workers``: the workers the run will get (default: ``workers.num_workers``, or as many as this
    machine's CPUs allow, as an embedded Ray would start). ``builds_base``: whether the driver builds the base
    (default: unless it is pretrained or cached under ``cache_dir``).
    """
    m, w = cfg.model, cfg.workers
    group = cfg.engine.group_size if cfg.engine.backend == "deepspeed" else 1
    if num_workers is None:
        num_workers = workers_for(cfg, local_capacity(cfg))
    model = adapted(cfg, meta_model(cfg))
    layout = build_layout(model)
    config: Any = model.get_base_model().config
    layers = int(config.num_hidden_layers)
    depths = [_depth(cfg, model, layout, layers)]
    if not m.pretrained and m.full_depth and m.full_depth != m.num_layers:
        full = adapted(cfg, meta_model(cfg, num_layers=m.full_depth))
        depths.append(_depth(cfg, full, build_layout(full), m.full_depth))
    d = depths[0]
    cohort = updates_in_flight(cfg)
    payload = d.payload
    feedback = cfg.compression.uplink != "none" and cfg.compression.error_feedback
    personal = cfg.strategy.name == "pfl_moe" or (
        cfg.strategy.name == "fedalign_moe" and cfg.strategy.fedalign.expert_agg == "personalized")
    expert_block = d.by_role["expert"]
    update_object = payload + d.routing + (payload if feedback else 0)  # delta, routing statistics, residual
    instructions_object = (payload if feedback else 0) + (expert_block if personal else 0)
    store = [(f"{cohort} updates (delta{', residual' if feedback else ''}, routing statistics)",
              float(cohort * update_object))]
    if instructions_object:
        store.append((f"{cohort} instructions (residual or own experts)", float(cohort * instructions_object)))
    store += [("the global payload, broadcast once", float(payload)), ("the new global payload", float(payload))]
    spec = family_of(model)
    tokenizer_vocab = None if m.pretrained else m.pretrain.tokenizer_vocab
    builds = not base_cached(cfg) if builds_base is None else builds_base
    return Plan(
        name=cfg.name, family=config.model_type, strategy=cfg.strategy.name, depths=tuple(depths),
        clients_per_round=cohort, num_workers=num_workers, worker_processes=num_workers * group,
        object_store=tuple(store),
        worker=worker_host(cfg, model, tokenizer_vocab=tokenizer_vocab, payload=payload, update_object=update_object,
                           instructions_object=instructions_object,
                           updates_per_round=-(-cohort // num_workers)),
        aggregator=aggregator_host(cfg, layout, cohort=cohort, update_object=update_object,
                                   routing_client=d.routing, moe_layers=d.moe_layers,
                                   num_experts=spec.num_experts(config), hidden_size=int(config.hidden_size)),
        driver=driver_host(cfg, model, builds_base=builds, payload=payload),
        worker_gpu=worker_memory(cfg, model) if w.gpus_per_worker > 0 else None,
        builds_base=builds, config=cfg,
    )  # fmt: skip


# -- does it fit -----------------------------------------------------------------------------------------------


def rounds_memory(plan: Plan, *, nodes: int = 1, workers: int | None = None) -> Parts:
    """Bytes of RAM the rounds need together, by part, on ``nodes`` nodes.

    Each worker's private part counts once per worker, the base's mapped file once per node holding workers,
    the object store once (a round's objects: the store reuses their space in the next round), the driver
    without the base it built before the workers started.
    """
    n = plan.worker_processes if workers is None else workers
    building = sum(v for k, v in plan.driver.parts if k.startswith(("base being built", "pretraining")))
    return (
        (f"{n} workers' private memory", n * plan.worker.private),
        ("base, mapped file (once per node)", min(nodes, max(n, 1)) * plan.worker.part("base, mapped file")),
        ("aggregator's private memory", plan.aggregator.private),
        ("object store, one round", float(plan.object_store_bytes)),
        ("driver while the rounds run", plan.driver.total - building),
    )


def node_memory(plan: Plan, *, nodes: int = 1, workers: int | None = None) -> float:
    """Bytes of RAM the run needs at its peak on ``nodes`` nodes: the driver building the base, or the rounds.

    The phases do not overlap: the driver builds the base before any worker starts.
    """
    return max(sum(v for _, v in rounds_memory(plan, nodes=nodes, workers=workers)), plan.driver.total)


def check_fits(plan: Plan, capacity: Capacity) -> None:
    """Raise a one-line ConfigError naming what does not fit ``capacity``: workers, driver, GPUs (not the store)."""
    cfg, cap = plan.config, capacity
    w = cfg.workers
    n = plan.worker_processes
    short: list[str] = []
    need = node_memory(plan, nodes=cap.nodes)
    fit = _workers_that_fit(plan, cap)
    if need > cap.memory:
        short.append(f"memory {_gib(need)} > {_gib(cap.memory)} (at most {fit} worker processes fit)")
    if plan.worker.total > cap.largest_node:
        short.append(f"one worker's {_gib(plan.worker.total)} > the largest node's {_gib(cap.largest_node)}")
    cpus = worker_cpus(cfg, cap)
    if n * w.cpus_per_worker > cpus:
        reserved = f" ({cap.cpus:g} less workers.aggregator_cpus)" if cpus != cap.cpus else ""
        short.append(f"CPUs {n * w.cpus_per_worker:g} > {cpus:g}{reserved}")
    if n * w.gpus_per_worker > cap.gpus:
        short.append(f"GPUs {n * w.gpus_per_worker:g} > {cap.gpus:g}")
    if short:
        raise ConfigError(f"workers.num_workers: {plan.num_workers} workers ({n} processes) do not fit {cap.where}: "
                          + "; ".join(short))
    if plan.driver.total > cap.driver_memory:
        raise ConfigError(f"model: the driver needs {_gib(plan.driver.total)} (building the base), this machine "
                          f"has {_gib(cap.driver_memory)}")
    if plan.worker_gpu is not None and cap.gpu_memory is not None:
        check_gpu_packing(cfg, plan.worker_gpu, cap.gpu_memory)


def spill_note(plan: Plan, capacity: Capacity) -> str | None:
    """A note when a round's objects could exceed the object store: the run still fits, Ray spills what does not.

    Not a failure: an update leaves the store once the aggregator has folded it,
    so a cohort of 2.3× the store completed without spilling anything
    (``benchmarks/scale.py --shape olmoe``, docs/scale.md); spilling costs disk
    writes only where the aggregator falls behind the clients.
    """
    if plan.object_store_bytes <= capacity.object_store:
        return None
    return (f"clients_per_round: a round holds {_gib(plan.object_store_bytes)} in the object store, "
            f"{capacity.where}'s holds {_gib(capacity.object_store)}: Ray spills to disk what the aggregator has "
            "not folded yet when the store fills")


def _workers_that_fit(plan: Plan, cap: Capacity) -> int:
    """The most worker processes whose memory fits ``cap`` (the rest of the run included)."""
    fit = 0
    while fit < 100_000 and node_memory(plan, nodes=cap.nodes, workers=fit + 1) <= cap.memory:
        fit += 1
    return fit


def _gib(value: float) -> str:
    """``value`` bytes in GiB, to two places: the unit the fit's messages and the report give memory in."""
    return f"{value / GIB:.2f} GiB"
