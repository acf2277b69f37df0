"""Expert LoRA at real widths: a training step's time against its arithmetic, and its memory, peft's path vs routed.

Builds, with random weights, two layers of three real MoE models: OLMoE-1B-7B
(H 2048, 16 heads, 64 experts top-8, expert FFN 1024, vocabulary 50304),
Qwen1.5-MoE-A2.7B (H 2048, 16 heads, 60 experts top-4, expert FFN 1408, a
shared expert of FFN 5632, vocabulary 151936) and DeepSeek-V2-Lite (H 2048,
16 heads of latent attention, 64 experts top-6, expert FFN 1408, 2 shared
experts, vocabulary 102400, first layer dense). Each gets fedsim's LoRA (r 8,
α 16: attention, shared and routed experts, routers in full) and trains as
the torch engine does (the output layer read at the label position, AdamW),
on one thread, at 1 × 32, 4 × 96 and 16 × 96 tokens, on two paths:

- ``peft``: peft's own forward, which forms W + s·B·A for every expert;
- ``routed``: fedsim's, the same LoRA on each expert's routed rows
  (``fedsim.models.expert_lora``).

Columns: ``step_s`` (median of the timed steps), ``arithmetic_s`` (the step's
matmul FLOPs on the rows actually computed, ÷ the fp32 matmul rate measured
right before in the same process), ``ratio`` (step ÷ arithmetic; the target
is ≤ 2 at 16 × 96), ``rows_per_expert`` (routed rows an expert gets on
average), ``saved_mib`` (bytes autograd keeps for backward, counted once per
storage, parameters excluded), ``step_peak_gib`` (the process's peak RSS
during the timed steps, sampled every 2 ms, freed heap pages handed back
first) and ``step_extra_gib`` (that peak less the RSS before),
``peak_vs_budget`` (step peak ÷ (1.5 × weights + saved); target ≤ 1),
``weights_gib`` (all parameters), ``resident_gib`` (RSS once built), and
``stats_s`` / ``stats_extra_gib`` / ``eval_s`` (a no-grad pass with the
routing recorder, as the routing-statistics pass runs, its extra RSS, and a
plain no-grad evaluation pass, on the same tokens), ``status`` (``ok``, or
``out of memory`` when a shape needs more than ``--memory-limit-gib``, the
address space each measuring process gets: it ends that model's path).

Arithmetic, per matmul of m × k by k × n: 2mkn forward, 2mkn more for the
gradient of its input where that input needs one, 2mkn more for the gradient
of a trainable weight. Frozen weights get no weight gradient. Counted: every
``nn.Linear`` (attention and its LoRA, shared experts, dense FFNs, the output
layer on the label rows), the routers, each token's k experts with their LoRA,
and attention's two products over the causal half of S².

    python benchmarks/expert_lora.py                 # real widths: ~40 min, up to ~14 GiB RAM (peft, Qwen)
    python benchmarks/expert_lora.py --quick         # tiny widths, seconds (the tests run its functions)
    python benchmarks/expert_lora.py --models olmoe --paths routed
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsim import environment  # noqa: E402

environment.apply()

import pandas as pd  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from fedsim.models import RoutingRecorder, apply_lora, family_of, family_spec  # noqa: E402
from fedsim.models.expert_lora import RoutedExpertLora  # noqa: E402

GIB = 2**30
PATHS = ("peft", "routed")


@dataclass(frozen=True)
class ModelShape:
    """A model's widths: its family and the config values that differ from the family's defaults."""

    family: str
    config: dict[str, Any]
    tokens: tuple[tuple[int, int], ...]  # (batch, sequence) per measured step
    rank: int = 8
    repeats: int = 2  # timed steps per token shape, after one untimed

    def build(self, *, seed: int = 0) -> nn.Module:
        """The model with random weights (float32, a forked RNG seeded with ``seed``)."""
        spec = family_spec(self.family)
        config = spec.config_class(**{**dict(spec.fixed_config), **self.config})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


_TOKENS = ((1, 32), (4, 96), (16, 96))
_ATTENTION = {"hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 16, "num_hidden_layers": 2,
              "max_position_embeddings": 4096, "attention_dropout": 0.0}
SHAPES: dict[str, ModelShape] = {
    "olmoe": ModelShape("olmoe", {  # OLMoE-1B-7B
        **_ATTENTION, "vocab_size": 50304, "num_experts": 64, "num_experts_per_tok": 8, "intermediate_size": 1024,
    }, _TOKENS),
    "qwen2_moe": ModelShape("qwen2_moe", {  # Qwen1.5-MoE-A2.7B
        **_ATTENTION, "vocab_size": 151936, "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632, "intermediate_size": 5632,
    }, _TOKENS),
    "deepseek_v2": ModelShape("deepseek_v2", {  # DeepSeek-V2-Lite
        **_ATTENTION, "vocab_size": 102400, "n_routed_experts": 64, "num_experts_per_tok": 6,
        "moe_intermediate_size": 1408, "n_shared_experts": 2, "intermediate_size": 10944, "first_k_dense_replace": 1,
        "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "topk_method": "greedy", "n_group": 1, "topk_group": 1,
    }, _TOKENS),
}
_TINY_TOKENS = ((1, 8), (2, 16), (4, 16))
_TINY_ATTENTION = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4, "num_hidden_layers": 2,
                   "max_position_embeddings": 64, "attention_dropout": 0.0}
QUICK: dict[str, ModelShape] = {
    "olmoe": ModelShape("olmoe", {**_TINY_ATTENTION, "vocab_size": 128, "num_experts": 8, "num_experts_per_tok": 2,
                                  "intermediate_size": 32}, _TINY_TOKENS, rank=2),
    "qwen2_moe": ModelShape("qwen2_moe", {
        **_TINY_ATTENTION, "vocab_size": 128, "num_experts": 6, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
        "shared_expert_intermediate_size": 48, "intermediate_size": 48,
    }, _TINY_TOKENS, rank=2),
    "deepseek_v2": ModelShape("deepseek_v2", {
        **_TINY_ATTENTION, "vocab_size": 128, "n_routed_experts": 8, "num_experts_per_tok": 2,
        "moe_intermediate_size": 32, "n_shared_experts": 2, "intermediate_size": 96, "first_k_dense_replace": 1,
        "q_lora_rank": None, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "topk_method": "greedy", "n_group": 1, "topk_group": 1,
    }, _TINY_TOKENS, rank=2),
}


# -- one step, as the torch engine takes it -----------------------------------------------------------
def adapted(shape: ModelShape, path: str, *, seed: int = 0) -> nn.Module:
    """``shape``'s model with fedsim's LoRA (rank r, α = 2r), on peft's path or the routed one."""
    if path not in PATHS:
        raise ValueError(f"path: {path!r} is not one of {PATHS}")
    return apply_lora(shape.build(seed=seed), rank=shape.rank, alpha=2.0 * shape.rank, dropout=0.0,
                      routed_experts=path == "routed")


def batch_of(model: nn.Module, batch: int, seq: int, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids [batch, seq] and a label token per row [batch]."""
    gen = torch.Generator().manual_seed(seed)
    vocab = int(model.config.vocab_size)
    return torch.randint(3, vocab, (batch, seq), generator=gen), torch.randint(3, vocab, (batch,), generator=gen)


def loss_of(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The label word's cross-entropy, the output layer applied at the last position only (as the engine does)."""
    body = model.get_base_model()
    hidden = body.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).last_hidden_state
    return F.cross_entropy(body.lm_head(hidden[:, -1]), labels)


def trainer(model: nn.Module, *, lr: float = 1e-4) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """One training step (forward, backward, AdamW) on a batch; returns the loss."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    model.train()

    def step(ids: torch.Tensor, labels: torch.Tensor) -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(model, ids, labels)
        loss.backward()
        optimizer.step()
        return float(loss.item())

    return step


# -- arithmetic -----------------------------------------------------------------------------------------
def _factor_rank(wrapper: nn.Module) -> int:
    adapter = next(iter(wrapper.lora_A))
    return int(wrapper.lora_A[adapter].weight.shape[0] // wrapper.num_experts)


def _mm(rows: int, k: int, n: int, *, input_grad: bool, weight_grad: bool) -> int:
    """FLOPs of [rows, k] · [k, n] forward and backward."""
    return 2 * rows * k * n * (1 + int(input_grad) + int(weight_grad))


@dataclass(frozen=True)
class StepFlops:
    """A training step's arithmetic in FLOPs, forward and backward, by kind of matmul.

    ``weights``: its matmuls with weights (projections, routers, experts, the output layer); ``attention``:
    attention's two products (QKᵀ, PV).
    """

    weights: int
    attention: int

    @property
    def total(self) -> int:
        return self.weights + self.attention


def step_flops(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> StepFlops:
    """FLOPs of one training step on the rows it must compute (see the module docstring).

    Counted by hooks on one forward with gradients enabled (so each input's need of a gradient is what the step
    sees).
    """
    spec = family_of(model)
    config = model.config
    total = 0
    core = 0
    handles = []

    def linear(module: nn.Linear, args: tuple[Any, ...], _out: Any) -> None:
        nonlocal total
        x = args[0]
        total += _mm(x.numel() // x.shape[-1], module.in_features, module.out_features,
                     input_grad=x.requires_grad, weight_grad=module.weight.requires_grad)

    def router(module: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
        nonlocal total
        x, weight = args[0], module.weight
        total += _mm(x.numel() // x.shape[-1], weight.shape[1], weight.shape[0],
                     input_grad=x.requires_grad, weight_grad=weight.requires_grad)

    def experts(module: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
        nonlocal total
        hidden, top_k_index = args[0], args[1]
        rows = top_k_index.numel()  # (token, slot) pairs: each token's k experts
        wrappers = {}
        inner = module
        while hasattr(inner, "parameter_name"):
            wrappers[inner.parameter_name] = inner
            inner = inner.base_layer
        for name, input_grad in (("gate_up_proj", hidden.requires_grad), ("down_proj", True)):
            _, out_f, in_f = getattr(inner, name).shape
            total += _mm(rows, in_f, out_f, input_grad=input_grad, weight_grad=False)
            if name in wrappers:
                r = _factor_rank(wrappers[name])
                total += _mm(rows, in_f, r, input_grad=input_grad, weight_grad=True)
                total += _mm(rows, r, out_f, input_grad=True, weight_grad=True)

    heads = int(config.num_attention_heads)
    qk = int(getattr(config, "qk_nope_head_dim", 0) + getattr(config, "qk_rope_head_dim", 0)) or None
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    v_dim = int(getattr(config, "v_head_dim", None) or head_dim)

    def attention(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], _out: Any) -> None:
        nonlocal core
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        b, s = hidden.shape[0], hidden.shape[1]
        pairs = b * heads * s * (s + 1) // 2  # causal
        core += 2 * pairs * ((qk or head_dim) + v_dim) * 3  # QKᵀ and PV, forward and their input gradients

    body = model.get_base_model()
    for module in body.modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear))
    for r in spec.routers(model):
        handles.append(r.register_forward_hook(router))
    for e in spec.experts_modules(model):
        handles.append(e.register_forward_hook(experts))
    for layer in body.model.layers:
        handles.append(layer.self_attn.register_forward_hook(attention, with_kwargs=True))
    try:
        loss_of(model, ids, labels)
    finally:
        for h in handles:
            h.remove()
    return StepFlops(total, core)


def matmul_rate(size: int = 2048, repeats: int = 3) -> float:
    """The current process's fp32 matmul rate in FLOP/s, best of ``repeats`` [size, size] products."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# -- memory --------------------------------------------------------------------------------------------
def saved_bytes(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> int:
    """Bytes autograd keeps for backward over one forward: each storage once, parameters' own storages excluded.

    The forward is not run backward. Each saved tensor is held in a list until the forward ends (so no address
    is reused while counting) and the graph keeps nothing: a graph holding the tensor itself would make a node
    that saves its own output a cycle that outlives the graph.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    held: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> None:
        held.append(t)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda _: None):
        loss_of(model, ids, labels)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
    held.clear()
    return sum(n for ptr, n in storages.items() if ptr not in params)


@dataclass
class PeakRss:
    """The process's peak RSS while inside the context, sampled every ``interval`` seconds."""

    interval: float = 0.002
    peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    @contextmanager
    def watch(self) -> Iterator[PeakRss]:
        proc = psutil.Process()
        self.peak = proc.memory_info().rss
        self._stop.clear()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, proc.memory_info().rss)
                self._stop.wait(self.interval)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join()
            self.peak = max(self.peak, proc.memory_info().rss)


def release_freed_memory() -> int:
    """Hand the C heap's freed pages back to the OS (glibc ``malloc_trim``), so RSS shows live memory; the RSS after."""
    name = ctypes.util.find_library("c")
    if name is not None and hasattr(libc := ctypes.CDLL(name), "malloc_trim"):
        libc.malloc_trim(0)
    return int(psutil.Process().memory_info().rss)


# -- one (model, path) in this process ------------------------------------------------------------------
def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(shape: ModelShape, path: str) -> Iterator[dict[str, Any]]:
    """One row per token shape of ``shape`` on ``path``, in this process, as each is measured.

    A shape that runs out of memory gives a row saying so and ends the
    sequence (the larger shapes would too).
    """
    model = adapted(shape, path)
    routed = any(isinstance(m, RoutedExpertLora) for m in model.modules())
    resident = release_freed_memory()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    spec = family_of(model)
    num_experts, top_k = spec.num_experts(model.config), spec.top_k(model.config)
    step = trainer(model)
    for batch, seq in shape.tokens:
        row = {"model": shape.family, "path": path, "routed": routed, "tokens": f"{batch}x{seq}",
               "rows_per_expert": batch * seq * top_k / num_experts, "weights_gib": weights / GIB,
               "resident_gib": resident / GIB}
        try:
            row.update(_measure_tokens(model, step, *batch_of(model, batch, seq), repeats=shape.repeats))
        except (MemoryError, RuntimeError) as exc:
            if not isinstance(exc, MemoryError) and "can't allocate memory" not in str(exc):
                raise
            yield {**row, "status": "out of memory"}
            return
        row["peak_vs_budget"] = row["step_peak_gib"] * GIB / (1.5 * weights + row["saved_mib"] * 2**20)
        yield {**row, "status": "ok"}


def _measure_tokens(
    model: nn.Module, step: Callable[[torch.Tensor, torch.Tensor], float], ids: torch.Tensor, labels: torch.Tensor,
    *, repeats: int,
) -> dict[str, float]:
    """The timings and memory of one token shape (the columns the module docstring describes)."""
    flops = step_flops(model, ids, labels).total
    saved = saved_bytes(model, ids, labels)
    step(ids, labels)  # untimed: first touch of this shape's buffers
    rate = matmul_rate()
    times = []
    before = release_freed_memory()
    with PeakRss().watch() as peak:
        for _ in range(repeats):
            times.append(_timed(lambda: step(ids, labels)))
    model.eval()
    stats_before = release_freed_memory()
    with torch.no_grad(), PeakRss().watch() as stats_peak:
        with RoutingRecorder(model) as recorder:
            recorder.set_mask(torch.ones_like(ids))
            stats_s = _timed(lambda: loss_of(model, ids, labels))
            recorder.stats()
    with torch.no_grad():
        eval_s = _timed(lambda: loss_of(model, ids, labels))
    model.train()
    step_s = statistics.median(times)
    return {
        "step_s": step_s, "arithmetic_s": flops / rate, "ratio": step_s * rate / flops, "gflop": flops / 1e9,
        "rate_gflops": rate / 1e9, "saved_mib": saved / 2**20, "step_peak_gib": peak.peak / GIB,
        "step_extra_gib": (peak.peak - before) / GIB, "stats_s": stats_s,
        "stats_extra_gib": (stats_peak.peak - stats_before) / GIB, "eval_s": eval_s,
    }


def _child(models: dict[str, ModelShape], name: str, path: str, limit_gib: float) -> list[dict[str, Any]]:
    """``measure``'s rows for one model and path, run in a fresh one-thread process under an address-space limit.

    Each model's memory is then its own, freed after, and a path that needs more than the machine has fails alone
    (the rows before it are kept).
    """
    cmd = [sys.executable, __file__, "--child", name, path, "--memory-limit-gib", str(limit_gib),
           *(["--quick"] if models is QUICK else [])]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=3 * 3600)
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0:
        print(f"{name}/{path} failed (exit {done.returncode}):\n{done.stderr[-2000:]}", file=sys.stderr)
        rows.append({"model": name, "path": path, "status": f"failed (exit {done.returncode})"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="tiny widths: seconds")
    parser.add_argument("--models", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--memory-limit-gib", type=float, default=18.0,
                        help="address space of each measuring process; beyond it a shape reports 'out of memory'")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    models = QUICK if args.quick else SHAPES
    if args.child:
        limit = int(args.memory_limit_gib * GIB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        torch.set_num_threads(1)
        for row in measure(models[args.child[0]], args.child[1]):
            print(json.dumps(row), flush=True)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for name in args.models:
        for path in args.paths:
            rows += _child(models, name, path, args.memory_limit_gib)
            table = pd.DataFrame(rows)
            table.to_csv(out / f"expert_lora{'_quick' if args.quick else ''}.csv", index=False)
            print(f"{name}/{path} done", file=sys.stderr, flush=True)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))


if __name__ == "__main__":
    main()
