"""Flower's side of ``benchmarks/vs_flower.py``: the same clients as fedsim, run by Flower's simulation engine.

A ClientApp whose ``train`` handler trains the virtual client ``partition-id``
with fedsim's own torch engine (same model, LoRA, data rows, local steps, and
the client's seed from ``fedsim.seeds``, so the same batches), so
the two systems differ only in how they schedule clients and move payloads,
and a ServerApp running Flower's FedAvg that records each round's wall time,
the clients' measured compute seconds and the bytes of the arrays they return.

Two ways to hold the model, set by the spec's ``mode``:

- ``per_call``: the engine (base model from ``from_pretrained`` + peft LoRA,
  the global parameters written in) is built inside every call, the way
  Flower's LLM examples build their client; the spec's ``base_path`` is the
  directory it loads (for the OLMoE workload, the base as transformers'
  default ``save_pretrained`` writes it);
- ``cached``: built once per Ray actor and kept in this module.

Imported by reference (``benchmarks.flower.flower_app``) in Flower's actors,
so the cache is per actor process. Runs in the Flower venv (flwr pins its own
ray); the spec file named by ``FEDSIM_FLOWER_SPEC`` carries everything else.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from functools import cache
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from aggregation.messages import ClientInstructions
from fedsim.config import LoraConfig, TrainConfig
from fedsim.engine.torch_engine import TorchEngine, TorchEngineSpec
from fedsim.seeds import client_seed

client_app = ClientApp()
server_app = ServerApp()


@cache
def spec() -> dict[str, Any]:
    with open(os.environ["FEDSIM_FLOWER_SPEC"]) as f:
        return json.load(f)


def _engine_spec() -> TorchEngineSpec:
    s = spec()
    return TorchEngineSpec(
        base_path=s["base_path"], train_path=s["train_path"], test_path=s["test_path"],
        label_token_ids=tuple(s["label_token_ids"]), lora=LoraConfig(**s["lora"]), train=TrainConfig(**s["train"]),
        threads=1, lora_seed=s["seed"],
    )


@cache
def _cached_engine() -> TorchEngine:
    return _engine_spec()()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    cid = int(context.node_config["partition-id"])
    round_idx = int(msg.content["config"]["server-round"])
    payload = msg.content["arrays"].to_numpy_ndarrays()[0]
    start = time.perf_counter()
    engine = _cached_engine() if spec()["mode"] == "cached" else _engine_spec()()
    rows = np.asarray(spec()["partitions"][cid], dtype=np.int64)
    update = engine.train(rows, payload, ClientInstructions(client_id=cid, round_idx=round_idx,
                                                            seed=client_seed(spec()["seed"], round_idx, cid)))
    seconds = time.perf_counter() - start  # the client's work, model construction included when it is per call
    trained = payload + update.delta
    metrics = MetricRecord({"num-examples": update.n_examples, "compute_s": seconds,
                            "train_s": update.compute_seconds, "update_bytes": trained.nbytes})
    return Message(RecordDict({"arrays": ArrayRecord([trained]), "metrics": metrics}), reply_to=msg)


class TimedFedAvg(FedAvg):
    """FedAvg that logs, per round, the wall time from sending the cohort to the merged model."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.rounds: list[dict[str, float]] = []
        self._started = 0.0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._started = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        merged = super().aggregate_train(server_round, replies)
        metrics = [m.content["metrics"] for m in replies if m.has_content()]
        self.rounds.append({
            "round": server_round,
            "round_wall_s": time.perf_counter() - self._started,
            "compute_s_sum": sum(float(m["compute_s"]) for m in metrics),
            "train_s_sum": sum(float(m["train_s"]) for m in metrics),
            "clients": len(metrics),
            "update_bytes": float(np.median([float(m["update_bytes"]) for m in metrics])) if metrics else 0.0,
        })
        return merged


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    s = spec()
    k = len(s["partitions"])
    strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=k, min_available_nodes=k)
    initial = np.load(s["initial_payload"])
    strategy.start(grid=grid, initial_arrays=ArrayRecord([initial]), num_rounds=s["rounds"])
    with open(s["result"], "w") as f:
        json.dump(strategy.rounds, f)
