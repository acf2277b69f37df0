"""``fedsim plan``'s report: a plan's figures and a capacity written out as text.

``fedsim.plan`` computes the figures and checks the fit; this module only
lays them out (parameters, bytes by class, the object store, each process's
memory by part), so the wording and tables change without touching the
model of a run, and ``fedsim plan --json`` reads the same figures without it.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from aggregation.payload import ROLES
from fedsim.host_memory import HostMemory
from fedsim.memory import GIB
from fedsim.plan import Capacity, Plan, _gib, node_memory, rounds_memory

MIB = 2**20


def _table(rows: list[tuple[str, float]], columns: list[str], number: str) -> str:
    """A two-column table, names left-aligned, numbers formatted as ``number``."""
    width = max(len(columns[0]), *(len(name) for name, _ in rows))
    frame = pd.DataFrame(rows, columns=columns)
    table: str = frame.to_string(index=False, justify="left", formatters={
        columns[0]: lambda name: f"{name:<{width}}", columns[1]: lambda v: format(v, number)})
    return table


def _parts_table(figure: HostMemory) -> str:
    rows = [(name + (" [shared]" if name in figure.shared else ""), value / GIB) for name, value in figure.parts]
    return _table([*rows, ("total (peak RSS)", figure.total / GIB)], ["part", "GiB"], ".3f")


def describe(plan: Plan) -> str:
    """The plan as a readable report: parameters, bytes, object store, memory (each with its parts)."""
    cfg = plan.config
    d = plan.configured
    lines = [
        f"fedsim plan: {plan.name} ({plan.family}, {d.layers} layers"
        + (f" of {plan.depths[-1].layers}" if len(plan.depths) > 1 else "")
        + f", LoRA rank {cfg.lora.rank}, {plan.strategy}, {plan.clients_per_round} clients a round on "
        f"{plan.num_workers} workers)",
        "",
        "## Parameters",
    ]
    params = pd.DataFrame(
        [(f"{x.layers} layers" + (" (configured)" if i == 0 else " (full depth)"), x.params, x.trainable,
          x.moe_layers) for i, x in enumerate(plan.depths)],
        columns=["depth", "total", "trainable", "MoE layers"],
    )
    lines += [params.to_string(index=False, formatters={"total": "{:,}".format, "trainable": "{:,}".format}), ""]
    lines.append("## Bytes (MiB): payload by class, one client, one round (float32 payload)")
    rows: list[dict[str, Any]] = []
    for i, x in enumerate(plan.depths):
        rows.append({
            "depth": f"{x.layers}" + ("" if i == 0 else " (full)"),
            **{role: x.by_role[role] / MIB for role in ROLES}, "payload": x.payload / MIB,
            "update up": x.update / MIB, "routing stats": x.routing / MIB,
            "down/round": plan.clients_per_round * x.payload / MIB,
            "up/round": plan.clients_per_round * (x.update + x.routing) / MIB,
        })  # fmt: skip
    lines += [pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:,.2f}"),
              f"down/round = {plan.clients_per_round} clients × payload (each client's instructions, a few hundred "
              "bytes, not counted); up/round = clients × (update as sent + routing statistics)"
              + (f"; uplink encoded as {cfg.compression.uplink}" if cfg.compression.uplink != "none" else ""), ""]
    store = [(k, v / MIB) for k, v in plan.object_store] + [("total", plan.object_store_bytes / MIB)]
    lines += [_table(store, ["object store, one round", "MiB"], ",.1f"), ""]
    lines += [f"## Memory (GiB) at the configured depth; {plan.worker_processes} worker processes", "",
              "worker (each):", _parts_table(plan.worker), ""]
    if plan.worker_gpu is not None:
        lines += [f"worker GPU (each): {plan.worker_gpu.describe()}", ""]
    lines += ["aggregator:", _parts_table(plan.aggregator), "",
              "driver" + (" (builds the base: none cached)" if plan.builds_base else " (the base is cached)") + ":",
              _parts_table(plan.driver), ""]
    rounds = rounds_memory(plan)
    lines += [
        f"the run's peak on one node: {_gib(node_memory(plan))}, the larger of the driver's peak and the rounds' "
        f"{_gib(sum(v for _, v in rounds))}: " + " + ".join(f"{name} {v / GIB:.2f}" for name, v in rounds),
    ]
    return "\n".join(lines)


def describe_capacity(capacity: Capacity) -> str:
    """One line: what ``capacity`` offers."""
    gpus = f", {capacity.gpus:g} GPUs" if capacity.gpus else ""
    gpu = f" of {_gib(capacity.gpu_memory)}" if capacity.gpus and capacity.gpu_memory else ""
    return (f"{capacity.where}: {capacity.nodes} node(s), {_gib(capacity.memory)} RAM, {capacity.cpus:g} CPUs"
            f"{gpus}{gpu}, object store {_gib(capacity.object_store)}")
