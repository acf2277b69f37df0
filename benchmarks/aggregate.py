"""Aggregation cost: streaming merge throughput, the O(N²) pairwise terms, and aggregator memory.

Payload layouts are read off real peft-wrapped models: ``--shape tiny`` (the
tests' tiny Mixtral) and ``demo`` (the demo's) are built in memory; the
full-depth shapes of ``configs/scale/`` (``olmoe-1b-7b``: 16 MoE layers × 64
experts, ``qwen1.5-moe-a2.7b``: 24, ``deepseek-v2-lite``: 27 layers,
``switch-base-16``: 12) on the meta device, with the config's LoRA settings.
Client updates and routing statistics are synthetic. Four tables:

1. throughput (tiny/demo): rounds of each strategy (begin, add × N, finish)
   over N updates, as bytes of update merged per second, against a ``numpy``
   copy of the same number of bytes timed right before each round in the same
   process (medians over ``--repeats`` rounds). ``merge_gb_s`` and
   ``merge_vs_copy`` count the streaming part only: the round minus the time
   its FedAlign-MoE O(N²) terms took in that same round (table 2), which are
   compute, not streaming; ``merge_vs_copy`` ≥ 0.5 is the target;
2. pairwise (tiny/demo): FedAlign-MoE's O(N²) terms (σ, the Gram matrix, D,
   τ, γ, π, the excluded-pair count) per round at N = 10, 100, 500, timed
   inside the round (``timing_pairwise``), and their share of the round;
3. memory (tiny/demo): the Aggregator actor on a local Ray configured for an
   N-client round as the driver configures its embedded Ray, fed N updates
   that remote tasks put in the object store as workers do; its peak RSS and
   private memory (USS) after the round, against what it must hold
   (``must_hold_mib``). Updates read zero-copy from the object store are
   shared pages: they count in RSS once touched, not in USS.
   ``growth_beyond_must_hold``: how much USS grew from the smallest cohort
   beyond the growth of what must be held, relative to the smallest cohort's
   USS (target < 0.10);
4. rounds (every shape; the default for the full-depth ones): per cohort size
   N (``--clients``, 10, 50, 100), a FedAvg and a FedAlign-MoE round on the
   same updates, each against a numpy copy of the same bytes from the same
   storage into one payload-sized buffer, timed right before it; the
   FedAlign-MoE round's pairwise terms by term (σ, Gram, D, τ, γ, π) and their
   share of the round; FedAlign-MoE / FedAvg; the process's peak RSS during
   the rounds (``clear_refs`` resets it first; it counts the cohort's pages
   the rounds touched) and its peak private (anonymous) memory, sampled.
   A cohort over ``--memory-budget-gib`` lives on disk: each update is an
   ``np.memmap`` file under a temporary directory (``--spill-dir``), read
   through the same ``ArrayReader`` (a memmap is an ndarray): the in-process
   stand-in for updates Ray has spilled from its object store. At full
   OLMoE depth 100 updates are 25 GB, more than this machine's memory, so
   every pass over them reads the disk.

Synthetic updates of the full-depth shapes (cheap to make at 0.25–0.5 GB
each): three random float32 base vectors B_k of the payload's length, drawn
once, and per client i three random coefficients c_ik and a random vector
r_i of 65,537 values (a prime, so it does not line up with the expert
slices), repeated: Δ_i = Σ_k c_ik·B_k + ½·tile(r_i). Clients' directions then
spread over the whole range of cosines (D is not degenerate: negative,
partial and near-parallel pairs), and no two updates are equal.

Tables 1, 2 and 4 run in this process with one BLAS / OpenMP / torch thread:
what Ray gives the Aggregator actor by default (``num_cpus=0``:
``OMP_NUM_THREADS=1``). ``OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2`` in the
environment measures what ``workers.aggregator_cpus: 2`` gives it instead.

    .venv/bin/python benchmarks/aggregate.py [--shape tiny|demo|olmoe-1b-7b|...] [--quick] [--csv PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fedsim import environment  # noqa: E402

environment.apply(environment.thread_env(1))  # the user's OMP_NUM_THREADS / OPENBLAS_NUM_THREADS win

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from actors import embedded_system_config  # noqa: E402
from actors.aggregator import Aggregator  # noqa: E402
from aggregation import (  # noqa: E402
    ArrayReader,
    ClientUpdate,
    FedAlignMoE,
    FedAlignOptions,
    FedAvg,
    FedMoE,
    PayloadLayout,
    RoutingStats,
)
from aggregation import semantic_alignment as sa  # noqa: E402
from aggregation.payload import PAYLOAD_DTYPE  # noqa: E402
from aggregation.strategy import Strategy  # noqa: E402
from fedsim.config import load_config  # noqa: E402
from fedsim.models.layout import build_layout  # noqa: E402
from fedsim.models.lora import apply_lora  # noqa: E402
from fedsim.models.registry import build_model  # noqa: E402
from fedsim.quiet import quiet_libraries  # noqa: E402

SHAPES = {  # hidden, layers, experts, LoRA rank, expert intermediate size: the tests' tiny model and the demo's
    "tiny": dict(hidden_size=64, num_layers=2, num_experts=4, rank=4, intermediate_size=64),
    "demo": dict(hidden_size=128, num_layers=4, num_experts=8, rank=8, intermediate_size=256),
}
# configs/scale/<name>.yaml at the published depth (the configs reduce it so that two workers fit this machine;
# model.full_depth, where a config sets it, wins)
FULL_DEPTH = {"olmoe-1b-7b": 16, "qwen1.5-moe-a2.7b": 24, "deepseek-v2-lite": 27, "switch-base-16": 12}
SCALE_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "scale"
# FedAlign-MoE with the spec's γ = 1[σ ≥ τ]·max(D, 0): the default drops D (docs/paper.md), but timed with it, the
# tables keep the dearest form's cost, D's Gram and all, and their recorded figures keep their meaning
FEDALIGN_WITH_D = functools.partial(FedAlignMoE, options=FedAlignOptions(direction_consensus=True))
STRATEGIES: dict[str, Callable[[PayloadLayout], Strategy]] = {
    "fedavg": FedAvg, "fedmoe": FedMoE, "fedalign_moe": FEDALIGN_WITH_D,
}
TABLES = ("throughput", "pairwise", "memory", "rounds")


def real_layout(shape: str) -> tuple[PayloadLayout, int]:
    """The payload layout of a peft-wrapped model of ``shape``, and its hidden size (the signatures' width)."""
    if shape in FULL_DEPTH:
        return full_depth_layout(shape)
    s = SHAPES[shape]
    model = build_model(
        "mixtral", vocab_size=600, hidden_size=s["hidden_size"], num_layers=s["num_layers"], num_heads=4,
        num_kv_heads=2, intermediate_size=s["intermediate_size"], num_experts=s["num_experts"], top_k=2,
        max_position=128, seed=0,
    )
    return build_layout(apply_lora(model, rank=s["rank"], alpha=2 * s["rank"], dropout=0.0)), s["hidden_size"]


def full_depth_layout(shape: str) -> tuple[PayloadLayout, int]:
    """The layout of ``configs/scale/<shape>.yaml`` at its published depth, built on the meta device (no memory)."""
    path = SCALE_CONFIGS / f"{shape}.yaml"
    depth = getattr(load_config(path).model, "full_depth", None) or FULL_DEPTH[shape]  # the config's, where it says
    cfg = load_config(path, [f"model.num_layers={depth}"])
    m = cfg.model
    model = build_model(
        m.family, vocab_size=m.pretrain.tokenizer_vocab, hidden_size=m.hidden_size, num_layers=m.num_layers,
        num_heads=m.num_heads, num_kv_heads=m.num_kv_heads, intermediate_size=m.intermediate_size,
        num_experts=m.num_experts, top_k=m.top_k, max_position=m.max_position, seed=cfg.seed,
        overrides=m.hf_overrides, device="meta",
    )
    lora = cfg.lora
    peft_model = apply_lora(model, rank=lora.rank, alpha=lora.alpha, dropout=0.0, lora_attention=lora.attention,
                            lora_experts=lora.experts, routed_experts=lora.routed_experts)
    return build_layout(peft_model), m.hidden_size


def synthetic_routing(layout: PayloadLayout, hidden: int, rng: np.random.Generator) -> tuple[RoutingStats, ...]:
    """Routing statistics of plausible shape, one per MoE layer; every client uses every expert."""
    num_experts = layout.select(role="router")[0].shape[0]
    stats = []
    for _ in range(layout.num_layers):
        counts = rng.integers(1, 200, size=num_experts).astype(np.float64)
        mu = rng.normal(size=(num_experts, hidden)) + np.eye(num_experts, hidden) * 3
        stats.append(RoutingStats(
            n_tokens=int(counts.sum()) // 2, p_sum=counts / 2, counts=counts,
            margin_sum=counts * rng.uniform(0, 0.3, num_experts), x_sum=mu * counts[:, None],
        ))
    return tuple(stats)


def synthetic_update(layout: PayloadLayout, hidden: int, client_id: int, round_idx: int = 1) -> ClientUpdate:
    """Random delta and routing statistics of plausible shape (tiny/demo: a fresh normal draw per client)."""
    rng = np.random.default_rng(client_id)
    stats = synthetic_routing(layout, hidden, rng)
    delta = rng.normal(scale=1e-3, size=layout.total).astype(np.float32)
    return ClientUpdate(client_id, round_idx, int(rng.integers(20, 200)), delta, stats)


NOISE_PERIOD = 65_537  # a prime: a client's own random part does not line up with the expert slices
FILL_CHUNK = 64 * NOISE_PERIOD  # values written per step, a whole number of periods


def fill_delta(out: np.ndarray, bases: list[np.ndarray], rng: np.random.Generator) -> None:
    """``out`` ← Σ_k c_k·B_k + ½·tile(r), chunk by chunk (no payload-sized temporary); c, r drawn from ``rng``."""
    coef = rng.normal(size=len(bases)).astype(np.float32)
    own = np.tile(rng.standard_normal(NOISE_PERIOD, dtype=np.float32) * np.float32(5e-4), FILL_CHUNK // NOISE_PERIOD)
    for lo in range(0, out.size, FILL_CHUNK):
        hi = min(lo + FILL_CHUNK, out.size)
        chunk = out[lo:hi]
        np.multiply(bases[0][lo:hi], coef[0], out=chunk)
        for base, c in zip(bases[1:], coef[1:], strict=True):
            chunk += c * base[lo:hi]
        chunk += own[: hi - lo]


@contextlib.contextmanager
def synthetic_cohort(
    layout: PayloadLayout, hidden: int, n: int, *, budget_bytes: float, spill_dir: str | None = None
) -> Iterator[tuple[list[ClientUpdate], str]]:
    """N synthetic updates (``fill_delta``) and where they live: "memory", or "memmap" past ``budget_bytes``.

    A cohort over the budget is written to one ``np.memmap`` file per update
    under a temporary directory (removed on exit) and read back read-only: the
    stand-in for updates Ray has spilled to disk.
    """
    rng = np.random.default_rng(12345)
    bases = [rng.standard_normal(layout.total, dtype=np.float32) * np.float32(1e-3) for _ in range(3)]
    spill = n * layout.nbytes > budget_bytes
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedsim-cohort-", dir=spill_dir))) \
            if spill else None
        updates = []
        for cid in range(n):
            client_rng = np.random.default_rng([12345, cid])
            if folder is None:
                delta = np.empty(layout.total, dtype=PAYLOAD_DTYPE)
                fill_delta(delta, bases, client_rng)
            else:
                path = folder / f"client{cid}.f32"
                written = np.memmap(path, dtype=PAYLOAD_DTYPE, mode="w+", shape=(layout.total,))
                fill_delta(written, bases, client_rng)
                written.flush()
                del written
                delta = np.memmap(path, dtype=PAYLOAD_DTYPE, mode="r", shape=(layout.total,))
            stats = synthetic_routing(layout, hidden, client_rng)
            updates.append(ClientUpdate(cid, 1, int(client_rng.integers(20, 200)), delta, stats))
        del bases
        yield updates, "memory" if folder is None else "memmap"


# Module 2's O(N²) terms by the columns they are reported in, as FedAlign-MoE's expert pass calls them (through
# the module, so they can be timed there); a name the module lacks (an older version of it) is skipped.
PAIRWISE_TERMS: dict[str, tuple[str, ...]] = {
    "sigma": ("signature_similarity",),
    "gram": ("slice_gram",),
    "d": ("direction_consensus",),
    "tau": ("threshold", "thresholds", "excluded_pairs"),
    "gamma": ("gate_weights", "sigma_gate", "gated_consensus"),
    "pi": ("client_weights",),
}


@contextlib.contextmanager
def timing_pairwise() -> Iterator[dict[str, float]]:
    """The seconds spent in the O(N²) terms inside real rounds: the yielded dict, by term and as "total".

    While the block runs, each function of ``PAIRWISE_TERMS`` is wrapped by a
    timer; a call made from inside another timed one counts once, in the outer.

    Timing them in the round itself, not on separately stacked slices in a second run,
    keeps the round minus its pairwise part (the streaming part) from being the
    difference of two timings taken at different moments.
    """
    spent = dict.fromkeys(PAIRWISE_TERMS, 0.0) | {"total": 0.0}
    depth = [0]
    originals = {name: (term, getattr(sa, name)) for term, names in PAIRWISE_TERMS.items()
                 for name in names if hasattr(sa, name)}

    def timed(term: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if depth[0]:
                return fn(*args, **kwargs)
            depth[0] += 1
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - t
                depth[0] -= 1
                spent[term] += seconds
                spent["total"] += seconds
        return call

    for name, (term, fn) in originals.items():
        setattr(sa, name, timed(term, fn))
    try:
        yield spent
    finally:
        for name, (_, fn) in originals.items():
            setattr(sa, name, fn)


def one_round(strategy: Strategy, base: np.ndarray, updates: list[ClientUpdate]) -> tuple[float, dict[str, float]]:
    """Seconds for begin, add × N, finish; and the seconds of that spent in the O(N²) terms (``timing_pairwise``)."""
    with timing_pairwise() as pairwise:
        t = time.perf_counter()
        strategy.begin(base, round_idx=1)
        for u in updates:
            strategy.add(ArrayReader(u))
        strategy.finish()
        seconds = time.perf_counter() - t
    return seconds, pairwise


def copy_seconds(updates: list[ClientUpdate]) -> float:
    """A numpy copy of the same bytes: each update into its row of one preallocated array."""
    out = np.ones((len(updates), updates[0].delta.size), dtype=updates[0].delta.dtype)  # pages touched: no faults timed
    t = time.perf_counter()
    for i, u in enumerate(updates):
        np.copyto(out[i], u.delta)
    return time.perf_counter() - t


def copy_one_buffer_seconds(updates: list[ClientUpdate]) -> float:
    """A numpy copy of the same bytes from the same storage, each update in turn into one payload-sized buffer."""
    out = np.ones(updates[0].delta.size, dtype=updates[0].delta.dtype)
    t = time.perf_counter()
    for u in updates:
        np.copyto(out, u.delta)
    return time.perf_counter() - t


def median_round(repeats: int, make: Callable[[], Strategy], base: np.ndarray, updates: list[ClientUpdate],
                 copy_s: list[float] | None = None) -> dict[str, float]:
    """Median over ``repeats`` rounds of the round, its pairwise part and its streaming part (the rest).

    With ``copy_s``, a numpy copy of the cohort's bytes is timed right before each
    round and appended, so the copy and the merge see the same state of the machine.
    """
    rounds, pairs = [], []
    for _ in range(repeats):
        if copy_s is not None:
            copy_s.append(copy_seconds(updates))
        seconds, pair = one_round(make(), base, updates)
        rounds.append(seconds)
        pairs.append(pair["total"])
    streaming = np.subtract(rounds, pairs)
    return {"round_s": float(np.median(rounds)), "pairwise_s": float(np.median(pairs)),
            "streaming_s": float(np.median(streaming))}


def throughput_table(layout: PayloadLayout, hidden: int, sizes: list[int], repeats: int) -> pd.DataFrame:
    """Table 1: each strategy's round, its streaming part, against a numpy copy of the cohort."""
    base = np.zeros(layout.total, dtype=np.float32)
    rows = []
    for n in sizes:
        updates = [synthetic_update(layout, hidden, c) for c in range(n)]
        merged_gb = n * layout.nbytes / 1e9
        for name, make in STRATEGIES.items():
            copies: list[float] = []
            t = median_round(repeats, functools.partial(make, layout), base, updates, copies)
            copy_s = float(np.median(copies))
            rows.append({"strategy": name, "clients": n, "update_mib": layout.nbytes / 2**20, **t,
                         "round_gb_s": merged_gb / t["round_s"], "merge_gb_s": merged_gb / t["streaming_s"],
                         "copy_gb_s": merged_gb / copy_s, "merge_vs_copy": copy_s / t["streaming_s"]})
    return pd.DataFrame(rows)


def pairwise_table(layout: PayloadLayout, hidden: int, sizes: list[int], repeats: int) -> pd.DataFrame:
    """Table 2: FedAlign-MoE's O(N²) terms per round and their share of it."""
    base = np.zeros(layout.total, dtype=np.float32)
    rows = []
    for n in sizes:
        updates = [synthetic_update(layout, hidden, c) for c in range(n)]
        t = median_round(repeats, lambda: FEDALIGN_WITH_D(layout), base, updates)
        rows.append({"clients": n, "experts": len(layout.expert_keys()), "round_s": t["round_s"],
                     "pairwise_s": t["pairwise_s"], "pairwise_share": t["pairwise_s"] / t["round_s"]})
    return pd.DataFrame(rows)


def _status_mib(field: str) -> float:
    """A ``/proc/self/status`` memory field (VmHWM, RssAnon, ...) in MiB; nan where there is none."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class MemoryWatch:
    """Peak RSS (VmHWM, reset on entry) and peak private memory (RssAnon, sampled) of this process over a block."""

    def __init__(self, every_s: float = 0.01) -> None:
        self.every_s = every_s
        self.peak_rss_mib = self.peak_private_mib = float("nan")
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak_private_mib = max(self.peak_private_mib, _status_mib("RssAnon"))

    def __enter__(self) -> MemoryWatch:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self.peak_private_mib = _status_mib("RssAnon")
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_private_mib = max(self.peak_private_mib, _status_mib("RssAnon"))
        self.peak_rss_mib = _status_mib("VmHWM")


def rounds_table(shape: str, layout: PayloadLayout, hidden: int, sizes: list[int], repeats: int, *,
                 budget_bytes: float, spill_dir: str | None = None) -> pd.DataFrame:
    """Table 4: FedAvg and FedAlign-MoE rounds on one cohort per size, each after a copy of the same bytes."""
    base = layout.zeros()
    rows = []
    for n in sizes:
        with synthetic_cohort(layout, hidden, n, budget_bytes=budget_bytes, spill_dir=spill_dir) as (updates, where):
            gb = n * layout.nbytes / 1e9
            runs: dict[str, list[float]] = {}
            for _ in range(repeats):
                for name, make in (("fedavg", FedAvg), ("fedalign", FEDALIGN_WITH_D)):
                    runs.setdefault(f"{name}_copy_s", []).append(copy_one_buffer_seconds(updates))
                    with MemoryWatch() as memory:
                        seconds, pairwise = one_round(make(layout), base, updates)
                    runs.setdefault(f"{name}_s", []).append(seconds)
                    runs.setdefault(f"{name}_peak_rss_mib", []).append(memory.peak_rss_mib)
                    runs.setdefault(f"{name}_peak_private_mib", []).append(memory.peak_private_mib)
                    if name == "fedalign":
                        for term, spent in pairwise.items():
                            runs.setdefault("pairwise_s" if term == "total" else f"{term}_s", []).append(spent)
            t = {key: float(np.median(values)) for key, values in runs.items()}
            rows.append({
                "shape": shape, "clients": n, "update_mib": layout.nbytes / 2**20, "storage": where,
                "copy_gb_s": gb / t["fedavg_copy_s"], "fedavg_s": t["fedavg_s"], "fedavg_gb_s": gb / t["fedavg_s"],
                "fedavg_vs_copy": t["fedavg_copy_s"] / t["fedavg_s"], "fedalign_s": t["fedalign_s"],
                "fedalign_gb_s": gb / t["fedalign_s"], "fedalign_vs_copy": t["fedalign_copy_s"] / t["fedalign_s"],
                "fedalign_over_fedavg": t["fedalign_s"] / t["fedavg_s"], "pairwise_s": t["pairwise_s"],
                "pairwise_share": t["pairwise_s"] / t["fedalign_s"],
                **{f"{term}_s": t[f"{term}_s"] for term in PAIRWISE_TERMS},
                **{f"{term}_share": t[f"{term}_s"] / t["fedalign_s"] for term in PAIRWISE_TERMS},
                **{f"{name}_{peak}": max(runs[f"{name}_{peak}"]) for name in ("fedavg", "fedalign")
                   for peak in ("peak_rss_mib", "peak_private_mib")},
            })
    return pd.DataFrame(rows)


@ray.remote(num_cpus=1)
def _remote_update(layout: PayloadLayout, hidden: int, client_id: int) -> ClientUpdate:
    """As ``ClientWorker.train`` does: the update is the task's return value."""
    return synthetic_update(layout, hidden, client_id)


def must_hold_mib(name: str, layout: PayloadLayout, update: ClientUpdate, n: int) -> dict[str, float]:
    """What a strategy must hold for a cohort of ``n``, by part (MiB).

    Every strategy: the global payload and its float64 accumulator. FedAlign-MoE
    also: one expert slice × cohort (float32, as the payload), every client's routing statistics
    (Modules 1 and 2 read them all), its N×N pairwise matrices σ, D and γ, and the
    ~4 float64 [k, N, N] arrays of one batch of k experts' σ terms (``sigma_batch``).
    """
    widest = max(b - a for a, b in (layout.expert_span(*k) for k in layout.expert_keys()))
    parts = {"payload_mib": 3 * layout.nbytes / 2**20, "slices_mib": 0.0, "stats_mib": 0.0, "pairwise_mib": 0.0}
    if name == "fedalign_moe":
        per_layer = len(layout.expert_keys()) // layout.num_layers
        batch = min(per_layer, sa.sigma_batch(n, update.routing[0].x_sum.shape[-1]))
        parts["slices_mib"] = n * widest * np.dtype(PAYLOAD_DTYPE).itemsize / 2**20
        parts["stats_mib"] = n * sum(st.nbytes for st in update.routing) / 2**20
        parts["pairwise_mib"] = (3 + 4 * batch) * n * n * 8 / 2**20
    return parts


def memory_table(layout: PayloadLayout, hidden: int, sizes: list[int]) -> pd.DataFrame:
    """The Aggregator actor's memory per strategy and cohort size, against what it must hold (table 3).

    A fresh Ray per cohort size, configured as the driver would for such a round
    (``embedded_system_config``), and a fresh Aggregator actor per strategy, so its peak RSS is that round's.
    """
    sample = synthetic_update(layout, hidden, 0)
    rows = []
    for n in sizes:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
                 _system_config=embedded_system_config(layout.nbytes, n))
        for name in ("fedavg", "fedalign_moe"):
            aggregator = Aggregator.remote(STRATEGIES[name], layout, measure_memory=True)
            refs = [_remote_update.remote(layout, hidden, c) for c in range(n)]
            ray.wait(refs, num_returns=n)
            payload_ref = ray.put(np.zeros(layout.total, dtype=np.float32))
            new_ref, summary_ref = aggregator.aggregate.remote(1, payload_ref, refs)
            del refs
            summary = ray.get(summary_ref)
            del new_ref
            if summary.failures or len(summary.clients) != n:
                raise SystemExit(f"memory table, {name} at {n} clients: {len(summary.clients)} updates merged, "
                                 f"{len(summary.failures)} failed (first: {summary.failures[:1]})")
            hold = must_hold_mib(name, layout, sample, n)
            rows.append({"strategy": name, "clients": n, "cohort_mib": n * layout.nbytes / 2**20, **hold,
                         "must_hold_mib": sum(hold.values()),
                         "peak_rss_mib": summary.aggregator_peak_rss_mib, "uss_mib": summary.aggregator_uss_mib})
            ray.kill(aggregator)
        ray.shutdown()
    table = pd.DataFrame(rows)
    first_uss = table.groupby("strategy")["uss_mib"].transform("first")
    first_hold = table.groupby("strategy")["must_hold_mib"].transform("first")
    # growth of private memory from the smallest cohort, beyond the growth of what must be held, relative
    table["growth_beyond_must_hold"] = (
        table["uss_mib"] - first_uss - (table["must_hold_mib"] - first_hold)
    ) / first_uss
    return table


def _print(name: str, table: pd.DataFrame) -> None:
    """A table as text; the rounds table in two parts (rounds, then the pairwise terms) to stay readable."""
    fmt = functools.partial(str.format, "{:.3f}")
    parts = [(name, list(table.columns))]
    if name == "rounds":
        terms = [c for c in table.columns if c.endswith("_share") or c in {f"{t}_s" for t in PAIRWISE_TERMS}]
        keys = ["shape", "clients"]
        parts = [(name, [c for c in table.columns if c not in terms]), ("FedAlign-MoE pairwise terms", keys + terms)]
    for title, columns in parts:
        print(f"\n{title}\n" + table[columns].to_string(index=False, float_format=fmt))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=[*SHAPES, *FULL_DEPTH], default="tiny")
    parser.add_argument("--tables", choices=TABLES, nargs="+",
                        help="default: throughput, pairwise and memory for tiny/demo; rounds for the full-depth shapes")
    parser.add_argument("--throughput-clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--pairwise-clients", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--memory-clients", type=int, nargs="+", default=[50, 500])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 50, 100], help="rounds table: cohort sizes")
    parser.add_argument("--memory-budget-gib", type=float, default=4.0,
                        help="rounds table: a cohort over this many GiB lives on disk (one np.memmap per update)")
    parser.add_argument("--spill-dir", default=None, help="where a spilled cohort is written (default: the temp dir)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per measurement; medians are reported")
    parser.add_argument("--quick", action="store_true", help="small cohorts, one repeat")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--csv", default=None, help="also write every table to this one CSV (a 'table' column)")
    args = parser.parse_args()
    tables_run = args.tables or (["rounds"] if args.shape in FULL_DEPTH else ["throughput", "pairwise", "memory"])
    if args.quick:
        args.throughput_clients, args.pairwise_clients, args.memory_clients, args.repeats = [10], [10, 50], [10, 50], 1
        args.clients = [10]
    quiet_libraries()
    threads = int(os.environ["OMP_NUM_THREADS"])
    torch.set_num_threads(threads)  # as the Aggregator actor runs (see the module docstring)
    layout, hidden = real_layout(args.shape)
    print(f"payload: {layout.total} float32 ({layout.nbytes / 2**20:.3f} MiB), "
          f"{len(layout.expert_keys())} expert slices in {layout.num_layers} MoE layers, shape {args.shape}; "
          f"{threads} thread(s) (OMP_NUM_THREADS={threads}; the Aggregator actor's default is 1)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    builders: dict[str, Callable[[], pd.DataFrame]] = {
        "throughput": lambda: throughput_table(layout, hidden, args.throughput_clients, args.repeats),
        "pairwise": lambda: pairwise_table(layout, hidden, args.pairwise_clients, args.repeats),
        "memory": lambda: memory_table(layout, hidden, args.memory_clients),
        "rounds": lambda: rounds_table(args.shape, layout, hidden, args.clients, args.repeats,
                                       budget_bytes=args.memory_budget_gib * 2**30, spill_dir=args.spill_dir),
    }
    tables = {name: builders[name]() for name in TABLES if name in tables_run}
    for name, table in tables.items():
        table.to_csv(out / f"aggregate_{name}_{args.shape}.csv", index=False)
        _print(name, table)
    if args.csv:
        pd.concat([t.assign(table=name) for name, t in tables.items()]).to_csv(args.csv, index=False)


if __name__ == "__main__":
    main()
