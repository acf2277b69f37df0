"""The deepspeed engine's expert-parallel model on one accelerator: tokens/s, expert-FFN TFLOP/s, peak memory.

Builds a Mixtral-family MoE (random init), puts peft LoRA on attention and
experts with the routers trainable, shards the experts exactly as the
deepspeed engine does (``shard_experts``, G = 1, a NCCL world of one on a
GPU), trains it through ``deepspeed.initialize`` (bf16 on a GPU, ZeRO 0) on
random tokens as a causal LM, and prints:

- tokens/s over the timed steps;
- the expert FFNs' achieved TFLOP/s (forward + backward, timed with CUDA
  events around DeepSpeed's ``Experts`` module), counted on the routed tokens
  ("useful") and on the rows actually computed with capacity padding
  ("executed"), beside the card's bf16 matmul rate measured in the same run;
- peak accelerator memory.

    python benchmarks/gpu_engine.py                  # ~290M parameters, on the GPU
    python benchmarks/gpu_engine.py --shape tiny     # seconds, on CPU too (the tests run this)

Frozen expert weights get no weight gradient, so an expert FFN's forward +
backward is 2 × its forward FLOPs: 2 · 2·rows·(H·2I + I·H) = 12·rows·H·I.
"""

from __future__ import annotations

import argparse
import socket
import time
from dataclasses import dataclass

import deepspeed
import pandas as pd
import torch
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

from actors.group import GroupContext
from fedsim.engine.deepspeed_engine import join_group
from fedsim.engine.expert_parallel import ExpertParallelExperts, shard_experts
from fedsim.models import apply_lora, build_layout, build_model


@dataclass(frozen=True)
class Shape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    experts: int
    top_k: int
    batch: int
    seq: int


SHAPES = {
    # ~290M parameters: 6 layers × 16 experts of H 768 × I 1024, 32k vocabulary
    "gpu": Shape(vocab=32000, hidden=768, layers=6, heads=12, kv_heads=4, intermediate=1024, experts=16, top_k=2,
                 batch=16, seq=512),
    "tiny": Shape(vocab=500, hidden=32, layers=2, heads=2, kv_heads=1, intermediate=32, experts=4, top_k=2,
                  batch=4, seq=16),
}


class ExpertTimer:
    """Wall time of the experts' forward and backward passes, from hooks on DeepSpeed's Experts modules."""

    def __init__(self, modules: list[torch.nn.Module], cuda: bool) -> None:
        self.cuda = cuda
        self.spans: list[tuple[object, object]] = []
        self._open: list[object] = []
        for m in modules:
            m.register_forward_pre_hook(lambda *_: self._start())
            m.register_forward_hook(lambda *_: self._stop())
            m.register_full_backward_pre_hook(lambda *_: self._start())
            m.register_full_backward_hook(lambda *_: self._stop())
        self.enabled = False

    def _mark(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _start(self) -> None:
        if self.enabled:
            self._open.append(self._mark())

    def _stop(self) -> None:
        if self.enabled and self._open:
            self.spans.append((self._open.pop(), self._mark()))

    def seconds(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(a.elapsed_time(b) for a, b in self.spans) / 1e3  # type: ignore[attr-defined]
        return sum(b - a for a, b in self.spans)  # type: ignore[operator]


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, reps: int) -> float:
    """The card's dense matmul rate for ``dtype`` at n × n × n, measured now."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--lora-rank", type=int, default=8)
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    cuda = torch.cuda.is_available()
    device = torch.device("cuda:0" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    join_group(GroupContext(0, 1, "127.0.0.1", port), backend="nccl" if cuda else "gloo", timeout_s=300)

    model = build_model("mixtral", vocab_size=shape.vocab, hidden_size=shape.hidden, num_layers=shape.layers,
                        num_heads=shape.heads, num_kv_heads=shape.kv_heads, intermediate_size=shape.intermediate,
                        num_experts=shape.experts, top_k=shape.top_k, max_position=shape.seq, seed=0)
    params = sum(p.numel() for p in model.parameters())
    model = apply_lora(model, rank=args.lora_rank, alpha=2.0 * args.lora_rank, dropout=0.0)
    shard_experts(model, build_layout(model), ep_size=1, rank=0)
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(split_params_into_different_moe_groups_for_optimizer(
        [{"params": trainable, "name": "trainable"}]), lr=1e-4)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": shape.batch, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 0}, "bf16": {"enabled": cuda}, "steps_per_print": 2**62,
        "zero_allow_untested_optimizer": True,
    })
    moe_layers = [m for m in model.modules() if isinstance(m, ExpertParallelExperts)]
    timer = ExpertTimer([m.moe.deepspeed_moe.experts for m in moe_layers], cuda)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen).to(device)
               for _ in range(args.warmup + args.steps)]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    executed_rows = 0
    start = 0.0
    for step, ids in enumerate(batches):
        if step == args.warmup:
            sync(device)
            timer.enabled = True
            start = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
        engine.backward(loss)
        engine.step()
        if timer.enabled:
            executed_rows += sum(m.moe.deepspeed_moe.gate.last_capacity * shape.experts for m in moe_layers)
    sync(device)
    elapsed = time.perf_counter() - start
    expert_s = timer.seconds()
    tokens = shape.batch * shape.seq * args.steps
    routed_rows = tokens * shape.top_k * shape.layers
    flops_per_row = 12 * shape.hidden * shape.intermediate
    table = pd.DataFrame([{
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "params_M": params / 1e6,
        "tokens_per_s": tokens / elapsed,
        "expert_share_of_step": expert_s / elapsed,
        "expert_tflops_useful": routed_rows * flops_per_row / expert_s / 1e12,
        "expert_tflops_executed": executed_rows * flops_per_row / expert_s / 1e12,
        "matmul_tflops": matmul_tflops(device, dtype, 8192 if cuda else 512, 20 if cuda else 3),
        "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "final_loss": loss.item(),
    }])
    table["expert_vs_matmul"] = table["expert_tflops_useful"] / table["matmul_tflops"]
    print(table.T.to_string(header=False, float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
