"""1,000 virtual clients on this machine: memory of every Ray process and of the object store, round by round.

Two workloads (``--shape``), 2 workers:

- ``tiny``: the tiny model, 1,000 clients (Dirichlet or natural partition),
  50 per round, 20 rounds;
- ``olmoe``: ``configs/scale/olmoe-1b-7b.yaml`` (OLMoE-1B-7B's widths, 2 layers:
  30 MiB updates), 1,000 clients, 300 per round, 3 rounds, one local step of
  one example, each strategy of ``--strategies`` on its own Ray: ~9 GB of
  updates a round against an object store of ``--object-store-gib`` (4), so
  updates spill to disk and are restored when the aggregator reads them.

After each round the table records the proportional set size (PSS: shared
pages split between the processes that map them, so the object store is not
counted once per reader) summed over the driver and every process of the Ray
session, the largest single process, the driver's PSS, the bytes the object
store holds (which must not grow from round to round), the bytes Ray spilled
and restored during the round and any it had to place in filesystem-backed
fallback memory (from Ray's own object-store statistics), the aggregator's
peak and private (USS) memory, and the round's seconds: training (until the
last update is in) and the whole round.

    .venv/bin/python benchmarks/scale.py [--clients 1000] [--per-round 50] [--rounds 20] [--partition dirichlet]
    .venv/bin/python benchmarks/scale.py --shape olmoe [--strategies fedavg,fedalign_moe] [--object-store-gib 4]
    .venv/bin/python benchmarks/scale.py --shape olmoe --quick     # tiny widths, a 1 GiB store (a test runs it)
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from fedsim import environment  # noqa: E402

environment.apply()

import pandas as pd  # noqa: E402
import psutil  # noqa: E402
import ray  # noqa: E402
from ray._private.internal_api import memory_summary  # noqa: E402

from actors import EMBEDDED_SYSTEM_CONFIG  # noqa: E402
from fedsim.callbacks.base import Callback, RoundRecord  # noqa: E402
from fedsim.config import load_config  # noqa: E402
from fedsim.driver import run  # noqa: E402
from fedsim.quiet import quiet_libraries  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    "progress=false", "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
    "model.intermediate_size=32", "model.num_experts=4", "model.top_k=2", "model.pretrain.steps=0",
    "model.pretrain.tokenizer_vocab=400", "lora.rank=2", "data.source=synthetic", "data.max_length=32",
    "data.min_examples=2", "train.batch_size=8", "train.local_steps=2", "workers.num_workers=2",
]


def session_processes() -> list[psutil.Process]:
    """The driver and every process Ray started for this session (raylet, GCS, workers, actors)."""
    me = psutil.Process()
    ours = [me]
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.pid != me.pid and ("ray" in cmd and ("raylet" in cmd or "gcs_server" in cmd or "default_worker" in cmd
                                                   or "ray::" in cmd or "dashboard" in cmd or "log_monitor" in cmd)):
            ours.append(p)
    return ours


def memory_now() -> dict[str, float]:
    pss, largest, largest_name, driver = 0, 0, "", 0
    for p in session_processes():
        try:
            m = p.memory_full_info().pss
            name = "driver" if p.pid == os.getpid() else p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        pss += m
        driver = m if name == "driver" else driver
        if m > largest:
            largest, largest_name = m, name
    stats = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    match = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", stats)
    return {
        "ray_pss_gib": pss / 2**30,
        "driver_mib": driver / 2**20,
        "largest_process_mib": largest / 2**20,
        "largest_process": largest_name,
        "object_store_mib": float(match.group(1)) if match else float("nan"),
        "object_store_objects": float(match.group(2)) if match else float("nan"),
        **{f"{name}_total_mib": _mib(rf"{label} (\d+) MiB", stats) for name, label in _STORE_TOTALS.items()},
    }


# Ray's cumulative object-store statistics (stats_only summary): absent until the first byte
_STORE_TOTALS = {"spilled": "Spilled", "restored": "Restored", "fallback": "Plasma filesystem mmap usage:"}


def _mib(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else 0.0


class MemoryProbe(Callback):
    """Reads the session's memory and the round's timings after every round."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def after_round(self, record: RoundRecord) -> tuple[bool, dict[str, Any]]:
        row = record.row
        self.rows.append({
            "round": record.round_idx, "train_wall_s": row["train_wall_s"], "wall_s": row["wall_s"],
            "aggregator_peak_mib": row["aggregator_peak_rss_mib"], "aggregator_uss_mib": row["aggregator_uss_mib"],
            "compute_s_sum": row["compute_s_sum"],
            **{f"aggregator_{phase}_s": row[f"aggregator_{phase}_s"] for phase in ("wait", "get", "fold", "merge")},
            "aggregator_spool_mib": row["aggregator_spool_mib"],
            **memory_now(),
        })
        return False, {}


def workload(args: argparse.Namespace, work: Path, strategy: str) -> tuple[Path | None, list[str]]:
    """The config file and overrides of ``--shape`` for one strategy."""
    common = [f"data.num_clients={args.clients}", f"clients_per_round={args.per_round}", f"rounds={args.rounds}",
              f"eval.every={args.rounds}", f"cache_dir={work / 'cache'}", f"strategy.name={strategy}",
              "logging.aggregator_memory=true", "progress=false"]
    if args.shape == "tiny":
        return None, [*TINY, *common, f"data.partition={args.partition}", "data.alpha=1.0",
                      f"data.synthetic_docs_per_label={max(24, 4 * args.clients)}", "name=scale"]
    olmoe = ["train.batch_size=1", "train.local_steps=1", "data.min_examples=1", "data.max_length=32",
             f"data.max_per_class={max(100, args.clients * 3 // 10)}", "name=scale-olmoe"]
    if args.quick:
        olmoe += ["model.hidden_size=256", "model.num_heads=4", "model.num_kv_heads=4", "model.intermediate_size=128",
                  "model.max_position=128"]
    return ROOT / "configs" / "scale" / "olmoe-1b-7b.yaml", [*common, *olmoe]


def run_one(args: argparse.Namespace, work: Path, strategy: str) -> pd.DataFrame:
    """One run on its own embedded Ray: the per-round table, spill figures per round (not cumulative)."""
    config, overrides = workload(args, work, strategy)
    cfg = load_config(config, overrides)
    store = {"object_store_memory": int(args.object_store_gib * 2**30)} if args.object_store_gib else {}
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             _system_config=EMBEDDED_SYSTEM_CONFIG,
             **store)
    probe = MemoryProbe()
    try:
        run(cfg, out=work / f"run-{strategy}", callbacks=[probe])
    finally:
        ray.shutdown()
    table = pd.DataFrame(probe.rows)
    for name in ("spilled", "restored"):
        total = table.pop(f"{name}_total_mib")
        table[f"{name}_mib"] = total.diff().fillna(total)
    table.insert(0, "strategy", strategy)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["tiny", "olmoe"], default="tiny")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--per-round", type=int, help="default: 50 (tiny), 300 (olmoe)")
    parser.add_argument("--rounds", type=int, help="default: 20 (tiny), 3 (olmoe)")
    parser.add_argument("--partition", choices=["dirichlet", "natural", "iid"], default="dirichlet")
    parser.add_argument("--strategies", default="fedavg", help="comma-separated; each runs on its own Ray")
    parser.add_argument("--object-store-gib", type=float, help="default: Ray's (tiny), 4 (olmoe), 1 (--quick)")
    parser.add_argument("--quick", action="store_true", help="olmoe: tiny widths, 1 GiB object store")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    olmoe = args.shape == "olmoe"
    args.per_round = args.per_round or (300 if olmoe else 50)
    args.rounds = args.rounds or (3 if olmoe else 20)
    if args.object_store_gib is None and olmoe:
        args.object_store_gib = 1.0 if args.quick else 4.0
    quiet_libraries()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    csv = Path(args.out) / f"scale_{args.shape}{'_quick' if args.quick else ''}.csv"
    tables: list[pd.DataFrame] = []
    with tempfile.TemporaryDirectory(prefix="fedsim-scale-") as work:
        for strategy in args.strategies.split(","):
            tables.append(run_one(args, Path(work), strategy))
            table = pd.concat(tables, ignore_index=True)
            table.to_csv(csv, index=False)  # after each strategy: a later one's failure keeps what was measured
    print(f"{args.shape}: {args.clients} clients, {args.per_round} per round, {args.rounds} rounds, 2 workers")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    for strategy, rows in table.groupby("strategy", sort=False):
        steady = rows[rows["round"] > 1]
        if len(steady):
            print(f"{strategy}: peak PSS of all Ray processes {rows['ray_pss_gib'].max():.2f} GiB; object store from "
                  f"round 2 to {args.rounds}: {steady['object_store_mib'].iloc[0]:.0f} → "
                  f"{steady['object_store_mib'].iloc[-1]:.0f} MiB; driver PSS {steady['driver_mib'].iloc[0]:.0f} → "
                  f"{steady['driver_mib'].iloc[-1]:.0f} MiB; aggregator USS max {rows['aggregator_uss_mib'].max():.0f} "
                  f"MiB; spilled {rows['spilled_mib'].sum():.0f} MiB, restored {rows['restored_mib'].sum():.0f} MiB")


if __name__ == "__main__":
    main()
