"""Aggregation cost: streaming merge throughput, the O(N²) pairwise terms, and aggregator memory.

Three tables, on payload layouts read off real peft-wrapped Mixtral models
(``--shape tiny``: the tests' tiny model; ``demo``: the demo's model) and
synthetic client updates (random deltas and routing statistics):

1. throughput: rounds of each strategy (begin, add × N, finish) over N
   updates, as bytes of update merged per second, against a ``numpy`` copy
   of the same number of bytes timed right before each round in the same
   process (medians over ``--repeats`` rounds). ``merge_gb_s`` and
   ``merge_vs_copy`` count the streaming part only: the round minus the time
   its FedAlign-MoE O(N²) terms took in that same round (table 2), which are
   compute, not streaming; ``merge_vs_copy`` ≥ 0.5 is the target;
2. pairwise: FedAlign-MoE's O(N²) terms (σ, the Gram matrix, D, τ, γ, π, the
   excluded-pair count) per round at N = 10, 100, 500, timed inside the
   round (``timing_pairwise``), and their share of the round;
3. memory: the Aggregator actor on a local Ray configured for an N-client
   round as the driver configures its embedded Ray, fed N updates that remote
   tasks put in the object store as workers do; its peak RSS and private
   memory (USS) after the round, against what it must hold (``must_hold_mib``).
   Updates read zero-copy from the object store are shared pages: they count
   in RSS once touched, not in USS. ``growth_beyond_must_hold``: how much
   USS grew from the smallest cohort beyond the growth of what must be held,
   relative to the smallest cohort's USS (target < 0.10).

Tables 1 and 2 run in this process with one BLAS / OpenMP / torch thread:
what Ray gives the Aggregator actor (``num_cpus=0``: ``OMP_NUM_THREADS=1``).
With two BLAS threads on two cores, OpenBLAS's idle thread spins after each
Gram product and slows the slice copies that follow it (4× under load).

    .venv/bin/python benchmarks/aggregate.py [--shape tiny|demo] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fedsim import environment  # noqa: E402

environment.apply({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from actors import embedded_system_config  # noqa: E402
from actors.aggregator import Aggregator  # noqa: E402
from aggregation import ArrayReader, ClientUpdate, FedAlignMoE, FedAvg, FedMoE, PayloadLayout, RoutingStats  # noqa: E402
from aggregation import semantic_alignment as sa  # noqa: E402
from aggregation.payload import PAYLOAD_DTYPE  # noqa: E402
from aggregation.strategy import Strategy  # noqa: E402
from fedsim.models.layout import build_layout  # noqa: E402
from fedsim.models.lora import apply_lora  # noqa: E402
from fedsim.models.registry import build_model  # noqa: E402
from fedsim.quiet import quiet_libraries  # noqa: E402

SHAPES = {  # hidden, layers, experts, LoRA rank, expert intermediate size: the tests' tiny model and the demo's
    "tiny": dict(hidden_size=64, num_layers=2, num_experts=4, rank=4, intermediate_size=64),
    "demo": dict(hidden_size=128, num_layers=4, num_experts=8, rank=8, intermediate_size=256),
}
STRATEGIES: dict[str, Callable[[PayloadLayout], Strategy]] = {
    "fedavg": FedAvg, "fedmoe": FedMoE, "fedalign_moe": FedAlignMoE,
}


def real_layout(shape: str) -> tuple[PayloadLayout, int]:
    """The payload layout of a peft-wrapped Mixtral of ``shape``, and its hidden size."""
    s = SHAPES[shape]
    model = build_model(
        "mixtral", vocab_size=600, hidden_size=s["hidden_size"], num_layers=s["num_layers"], num_heads=4,
        num_kv_heads=2, intermediate_size=s["intermediate_size"], num_experts=s["num_experts"], top_k=2,
        max_position=128, seed=0,
    )
    return build_layout(apply_lora(model, rank=s["rank"], alpha=2 * s["rank"], dropout=0.0)), s["hidden_size"]


def synthetic_update(layout: PayloadLayout, hidden: int, client_id: int, round_idx: int = 1) -> ClientUpdate:
    """Random delta and routing statistics of plausible shape; every client uses every expert."""
    rng = np.random.default_rng(client_id)
    num_experts = layout.select(role="router")[0].shape[0]
    stats = []
    for _ in range(layout.num_layers):
        counts = rng.integers(1, 200, size=num_experts).astype(np.float64)
        mu = rng.normal(size=(num_experts, hidden)) + np.eye(num_experts, hidden) * 3
        stats.append(RoutingStats(
            n_tokens=int(counts.sum()) // 2, p_sum=counts / 2, counts=counts,
            margin_sum=counts * rng.uniform(0, 0.3, num_experts), x_sum=mu * counts[:, None],
        ))
    delta = rng.normal(scale=1e-3, size=layout.total).astype(np.float32)
    return ClientUpdate(client_id, round_idx, int(rng.integers(20, 200)), delta, tuple(stats))


# Module 2's O(N²) terms as FedAlign-MoE's expert pass calls them (through the module, so they can be timed there)
PAIRWISE_TERMS = ("signature_similarity", "slice_gram", "direction_consensus", "threshold", "gate_weights",
                  "client_weights", "excluded_pairs")


@contextlib.contextmanager
def timing_pairwise() -> Iterator[list[float]]:
    """The seconds spent in the O(N²) terms inside real rounds, in the yielded one-element list.

    While the block runs, each function of ``PAIRWISE_TERMS`` is wrapped by a timer.

    Timing them in the round itself, not on separately stacked slices in a second run,
    keeps the round minus its pairwise part (the streaming part) from being the
    difference of two timings taken at different moments.
    """
    spent = [0.0]
    originals = {name: getattr(sa, name) for name in PAIRWISE_TERMS}

    def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t
        return call

    for name, fn in originals.items():
        setattr(sa, name, timed(fn))
    try:
        yield spent
    finally:
        for name, fn in originals.items():
            setattr(sa, name, fn)


def one_round(strategy: Strategy, base: np.ndarray, updates: list[ClientUpdate]) -> tuple[float, float]:
    """Seconds for begin, add × N, finish; and the seconds of that spent in the O(N²) terms."""
    with timing_pairwise() as pairwise:
        t = time.perf_counter()
        strategy.begin(base, round_idx=1)
        for u in updates:
            strategy.add(ArrayReader(u))
        strategy.finish()
        seconds = time.perf_counter() - t
    return seconds, pairwise[0]


def copy_seconds(updates: list[ClientUpdate]) -> float:
    """A numpy copy of the same bytes: each update into its row of one preallocated array."""
    out = np.ones((len(updates), updates[0].delta.size), dtype=updates[0].delta.dtype)  # pages touched: no faults timed
    t = time.perf_counter()
    for i, u in enumerate(updates):
        np.copyto(out[i], u.delta)
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
        pairs.append(pair)
    streaming = np.subtract(rounds, pairs)
    return {"round_s": float(np.median(rounds)), "pairwise_s": float(np.median(pairs)),
            "streaming_s": float(np.median(streaming))}


def throughput_table(layout: PayloadLayout, hidden: int, sizes: list[int], repeats: int) -> pd.DataFrame:
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
    base = np.zeros(layout.total, dtype=np.float32)
    rows = []
    for n in sizes:
        updates = [synthetic_update(layout, hidden, c) for c in range(n)]
        t = median_round(repeats, lambda: FedAlignMoE(layout), base, updates)
        rows.append({"clients": n, "experts": len(layout.expert_keys()), "round_s": t["round_s"],
                     "pairwise_s": t["pairwise_s"], "pairwise_share": t["pairwise_s"] / t["round_s"]})
    return pd.DataFrame(rows)


@ray.remote(num_cpus=1)
def _remote_update(layout: PayloadLayout, hidden: int, client_id: int) -> ClientUpdate:
    """As ``ClientWorker.train`` does: the update is the task's return value."""
    return synthetic_update(layout, hidden, client_id)


def must_hold_mib(name: str, layout: PayloadLayout, update: ClientUpdate, n: int) -> dict[str, float]:
    """What a strategy must hold for a cohort of ``n``, by part (MiB).

    Every strategy: the global payload and its float64 accumulator. FedAlign-MoE
    also: one expert slice × cohort (float32, as the payload), every client's routing statistics
    (Modules 1 and 2 read them all), and its N×N pairwise matrices σ, D and γ.
    """
    widest = max(b - a for a, b in (layout.expert_span(*k) for k in layout.expert_keys()))
    parts = {"payload_mib": 3 * layout.nbytes / 2**20, "slices_mib": 0.0, "stats_mib": 0.0, "pairwise_mib": 0.0}
    if name == "fedalign_moe":
        parts["slices_mib"] = n * widest * np.dtype(PAYLOAD_DTYPE).itemsize / 2**20
        parts["stats_mib"] = n * sum(st.nbytes for st in update.routing) / 2**20
        parts["pairwise_mib"] = 3 * n * n * 8 / 2**20
    return parts


def memory_table(layout: PayloadLayout, hidden: int, sizes: list[int]) -> pd.DataFrame:
    """The Aggregator actor's memory per strategy and cohort size, against what it must hold (table 3).

    A fresh Ray per cohort size, configured as the driver would for such a round
    (``embedded_system_config``), and a fresh Aggregator actor per strategy, so its peak RSS is that round's.
    """
    sample = synthetic_update(layout, hidden, 0)
    rows = []
    for n in sizes:
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--throughput-clients", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--pairwise-clients", type=int, nargs="+", default=[10, 100, 500])
    parser.add_argument("--memory-clients", type=int, nargs="+", default=[50, 500])
    parser.add_argument("--repeats", type=int, default=5, help="rounds per measurement; medians are reported")
    parser.add_argument("--quick", action="store_true", help="small cohorts, one repeat")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.quick:
        args.throughput_clients, args.pairwise_clients, args.memory_clients, args.repeats = [10], [10, 50], [10, 50], 1
    quiet_libraries()
    torch.set_num_threads(1)  # as the Aggregator actor runs (see the module docstring)
    layout, hidden = real_layout(args.shape)
    print(f"payload: {layout.total} float32 ({layout.nbytes / 2**20:.3f} MiB), "
          f"{len(layout.expert_keys())} expert slices, shape {args.shape}; one thread "
          f"(OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}, as in the Aggregator actor)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tables = {"throughput": throughput_table(layout, hidden, args.throughput_clients, args.repeats),
              "pairwise": pairwise_table(layout, hidden, args.pairwise_clients, args.repeats)}
    tables["memory"] = memory_table(layout, hidden, args.memory_clients)
    for name, table in tables.items():
        table.to_csv(out / f"aggregate_{name}_{args.shape}.csv", index=False)
        print(f"\n{name}\n" + table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
