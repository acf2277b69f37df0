"""The ``deepspeed`` engine: one virtual client trained by a group of G processes with its experts sharded.

The G ClientWorkers of a group (``actors.group``) each build this engine with
their rank; together they form one torch.distributed world (gloo on CPU, NCCL
on GPUs) and one DeepSpeed engine with expert parallelism ep_size = G: rank r
holds experts r·E/G … (r+1)·E/G − 1 of every MoE layer
(``fedsim.engine.expert_parallel``), and every other trainable tensor
(attention LoRA, routers) replicated. Each client step splits the batch's rows
over the ranks; DeepSpeed exchanges the tokens between experts all-to-all and
averages the replicated gradients. Afterwards the ranks sum their parts of the
payload into rank 0, which returns the one ``ClientUpdate``, in the same
layout as the torch engine's, so aggregation does not know which engine ran.

Training is the torch engine's loop (``TorchEngine.train``); only loading and
reading the payload, the optimiser step, the split of rows and the sums over
ranks differ, which is what the overrides below do.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

from actors.group import GroupContext
from aggregation.routing_stats import RoutingStats
from fedsim.engine.expert_parallel import ExpertShard, shard_experts
from fedsim.engine.torch_engine import TorchEngine, TorchEngineSpec


@dataclass(frozen=True)
class DeepSpeedEngineSpec(TorchEngineSpec):
    """The torch engine's recipe plus how DeepSpeed runs it; built by each rank with its GroupContext."""

    zero_stage: int = 0
    profile_alltoall: bool = False
    timeout_s: float = 600.0

    def __call__(self, group: GroupContext | None = None) -> DeepSpeedEngine:
        """A DeepSpeedEngine for this rank of ``group`` (default: a group of one on 127.0.0.1)."""
        return DeepSpeedEngine(self, group or GroupContext(rank=0, size=1, master_addr="127.0.0.1", master_port=0))


class DeepSpeedEngine(TorchEngine):
    """A TorchEngine whose experts live sharded over a torch.distributed group, trained through DeepSpeed."""

    spec: DeepSpeedEngineSpec
    own_precision = True  # DeepSpeed's bf16 mode casts the model and keeps fp32 master weights itself

    def __init__(self, spec: DeepSpeedEngineSpec, group: GroupContext) -> None:
        self.group = group
        on_gpu = spec.device.startswith("cuda")
        if on_gpu:
            spec = replace(spec, device="cuda:0")  # Ray shows each rank its own GPU as device 0
        join_group(group, backend="nccl" if on_gpu else "gloo", timeout_s=spec.timeout_s)
        self.shard: ExpertShard | None = None
        super().__init__(spec)  # builds the HF + peft model and its layout, then calls _place
        self._param_weights = [float(group.size) if is_moe_param(p) else 1.0 for p in self.trainable]

    # -- TorchEngine overrides -------------------------------------------------------------------------
    def _place(self) -> None:
        """Keep this rank's experts, move to the device and hand the model to ``deepspeed.initialize``."""
        self.shard = shard_experts(self.model, self.layout, ep_size=self.group.size, rank=self.group.rank)
        self.model.to(self.device)
        cfg = self.spec.train
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        groups = split_params_into_different_moe_groups_for_optimizer(
            [{"params": trainable, "name": "trainable", "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
        )
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        config = {
            "train_micro_batch_size_per_gpu": 1,  # batches are fed by this engine, not by DeepSpeed's loader
            "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": self.spec.zero_stage},
            "bf16": {"enabled": self.spec.precision == "bf16"},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**62,
        }
        self.ds, _, _, _ = deepspeed.initialize(model=self.model, optimizer=optimizer, config=config)
        self._base_optimizer = _innermost(self.ds.optimizer)

    def _load(self, payload: np.ndarray) -> None:
        assert self.shard is not None
        self.layout.check(payload, what="payload")
        source = torch.from_numpy(np.asarray(payload)).to(self.device)
        with torch.no_grad():
            for entry in self.layout:
                target = self.shard.tensors.get(entry.key)
                if target is not None:
                    target.copy_(source[entry.offset : entry.offset + entry.size].view(target.shape))

    def _read(self) -> np.ndarray | None:
        """Each rank fills what it alone holds (rank 0 also the replicated tensors); rank 0 gets the sum."""
        assert self.shard is not None
        buffer = torch.zeros(self.layout.total, dtype=torch.float32, device=self.device)
        leader = self.group.rank == 0
        with torch.no_grad():
            for entry in self.layout:
                tensor = self.shard.tensors.get(entry.key)
                if tensor is not None and (leader or entry.role == "expert"):
                    buffer[entry.offset : entry.offset + entry.size].copy_(tensor.reshape(-1))
        if self.group.size > 1:
            dist.reduce(buffer, dst=0, op=dist.ReduceOp.SUM)
        return buffer.cpu().numpy() if leader else None

    def _optimizer(self) -> Callable[[torch.Tensor], None]:
        """The DeepSpeed engine's optimiser, its moments cleared and its master copy refreshed for a new client."""
        self._base_optimizer.state.clear()
        refresh = getattr(self.ds.optimizer, "refresh_fp32_params", None)
        if refresh is not None:  # ZeRO 1-2 and bf16 keep fp32 master weights beside the model's
            refresh()

        def step(total: torch.Tensor) -> None:
            self.ds.backward(total)
            self.ds.step()

        return step

    def _my_rows(self, rows: np.ndarray) -> tuple[np.ndarray, float]:
        """Rows r, r+G, … of the batch; a rank left without rows runs one stand-in row weighted 0.

        Every rank must run every forward pass (the all-to-all exchanges need
        all of them). DeepSpeed averages gradients over the G ranks, so the
        rank's mean loss is scaled by its share G·n_r / n of the batch.
        """
        size = self.group.size
        mine = rows[self.group.rank :: size]
        if len(mine) == 0:
            return rows[:1], 0.0
        return mine, len(mine) * size / len(rows)

    def _sum(self, values: list[float]) -> list[float]:
        if self.group.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def _sum_stats(self, stats: tuple[RoutingStats, ...]) -> tuple[RoutingStats, ...]:
        """Routing statistics are sums over tokens, so the group's are the sum of its ranks'."""
        if self.group.size == 1 or not stats:
            return stats
        parts = [np.concatenate([[s.n_tokens], s.p_sum, s.counts, s.margin_sum, s.x_sum.ravel()]) for s in stats]
        flat = torch.from_numpy(np.concatenate(parts)).to(self.device)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat_np = flat.cpu().numpy()
        out, at = [], 0
        for s in stats:
            e, h = s.x_sum.shape
            n_tokens = int(round(flat_np[at]))
            p_sum, counts, margin = (flat_np[at + 1 + i * e : at + 1 + (i + 1) * e] for i in range(3))
            x_sum = flat_np[at + 1 + 3 * e : at + 1 + 3 * e + e * h].reshape(e, h)
            out.append(RoutingStats(n_tokens, p_sum.copy(), counts.copy(), margin.copy(), x_sum.copy()))
            at += 1 + 3 * e + e * h
        return tuple(out)

    def _profiled(self) -> contextlib.AbstractContextManager[Any]:
        """With ``profile_alltoall``, the torch profiler records the collectives of the client's steps."""
        if not self.spec.profile_alltoall:
            return contextlib.nullcontext()
        return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

    def _profile_metrics(self, profile: Any) -> dict[str, tuple[float, float]]:
        """Seconds this rank spent in all-to-all exchanges (forward and backward) during the client's steps."""
        if profile is None:
            return {}
        micros = sum(e.cpu_time_total for e in profile.key_averages() if _is_alltoall(e.key))
        return {"alltoall_seconds": (micros / 1e6, 1.0)}


def _is_alltoall(name: str) -> bool:
    """The backend's own all-to-all work ("gloo:all_to_all"), not the autograd or dispatch events around it."""
    return name.endswith(":all_to_all")


def join_group(group: GroupContext, *, backend: str, timeout_s: float) -> None:
    """Bind this process into its group's torch.distributed world (once per process)."""
    if dist.is_initialized():
        return
    os.environ.update(
        MASTER_ADDR=group.master_addr, MASTER_PORT=str(group.master_port), RANK=str(group.rank),
        WORLD_SIZE=str(group.size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
    )
    deepspeed.init_distributed(
        dist_backend=backend, auto_mpi_discovery=False, rank=group.rank, world_size=group.size,
        init_method=f"tcp://{group.master_addr}:{group.master_port}", timeout=timedelta(seconds=timeout_s),
    )


def _innermost(optimizer: object) -> torch.optim.Optimizer:
    """The torch optimiser inside DeepSpeed's wrappers (ZeRO, bf16), whose state holds the moments."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    assert isinstance(optimizer, torch.optim.Optimizer), type(optimizer)
    return optimizer
