"""Systems scenarios on the demo task: stragglers under each round policy, and uplink compression.

1. Stragglers: 30 % of the clients compute 5× slower (seeded random
   profiles, a reproducible compute model of ``--seconds-per-example``).
   Wait-for-all, a deadline that the slow clients miss, over-selection by
   30 %, and FedBuff-style asynchronous aggregation (the same clients in
   flight, a server step every half of them) are compared by simulated time
   to reach a target accuracy (90 % of the best final accuracy among them),
   final accuracy (mean of the last 3 evaluations) and simulated time in all.
2. Compression: bytes sent up per round and final accuracy for fp32, bf16,
   int8 and top-k 10 % (error feedback on) under FedAvg and FedAlign-MoE.

    .venv/bin/python benchmarks/systems.py [--rounds 12] [--parts stragglers compression]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from fedsim import environment  # noqa: E402

environment.apply()

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import ray  # noqa: E402

from actors import EMBEDDED_SYSTEM_CONFIG  # noqa: E402
from fedsim.config import load_config  # noqa: E402
from fedsim.driver import run  # noqa: E402
from fedsim.quiet import quiet_libraries  # noqa: E402

POLICIES: dict[str, list[str]] = {
    "wait_all": ["system.policy=wait_all"],
    "deadline": ["system.policy=deadline"],  # deadline_s set from the compute model below
    "over_select 30 %": ["system.policy=over_select", "system.over_selection=0.3"],
    "async (FedBuff)": ["system.policy=async"],
}
CODECS = {"fp32": "none", "bf16": "bf16", "int8": "int8", "top-k 10 %": "topk"}


def last(rounds: pd.DataFrame, column: str, n: int = 3) -> float:
    return float(rounds[column].dropna().tail(n).mean())


def stragglers(base: list[str], rounds: int, clients: int, spe: float, work: Path) -> pd.DataFrame:
    runs = {}
    for name, policy in POLICIES.items():
        extra = [f"rounds={rounds}"]
        if name == "deadline":
            extra.append(f"system.deadline_s={spe * 200:g}")  # ~2× a fast client of ~100 examples, < a slow one
        if name.startswith("async"):  # the same number of client updates: two server steps per synchronous round
            extra = [f"rounds={2 * rounds}", f"system.async_buffer={clients // 2}", "eval.every=2"]
        runs[name] = run(load_config("configs/demo.yaml", [*base, *policy, *extra]), out=work / f"s-{len(runs)}").rounds
    best = max(last(r, "test_accuracy") for r in runs.values())
    target = 0.9 * best
    rows = []
    for name, r in runs.items():
        reached = r[r["test_accuracy"] >= target]
        rows.append({
            "policy": name,
            "final_accuracy": last(r, "test_accuracy"),
            "sim_time_to_target_s": float(reached["sim_time_s"].iloc[0]) if len(reached) else float("nan"),
            "sim_time_total_s": float(r["sim_time_s"].iloc[-1]),
            "client_updates_trained": int(r["clients_completed"].sum()),
            "client_updates_merged": int(r["clients_completed"].sum() - r["stragglers"].sum()),
        })
    table = pd.DataFrame(rows)
    table.attrs["target"] = target
    return table


def compression(base: list[str], rounds: int, work: Path) -> pd.DataFrame:
    rows = []
    for strategy in ("fedavg", "fedalign_moe"):
        for name, codec in CODECS.items():
            extra = [f"rounds={rounds}", f"strategy.name={strategy}", f"compression.uplink={codec}",
                     "compression.topk_fraction=0.1"]
            if strategy == "fedalign_moe":
                extra.append("train.routing_stats=after")
            r = run(load_config("configs/demo.yaml", [*base, *extra]), out=work / f"c-{len(rows)}").rounds
            rows.append({"strategy": strategy, "uplink": name, "bytes_up_per_round_mib": r["bytes_up"].mean() / 2**20,
                         "final_accuracy": last(r, "test_accuracy"),
                         "compression_error": float(np.nanmean(r["compression_error"]))})
    table = pd.DataFrame(rows)
    fp32 = table[table["uplink"] == "fp32"].set_index("strategy")["bytes_up_per_round_mib"]
    table["bytes_vs_fp32"] = table["bytes_up_per_round_mib"] / table["strategy"].map(fp32)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=["stragglers", "compression"],
                        default=["stragglers", "compression"])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--clients", type=int, default=10, help="clients per round (of twice as many)")
    parser.add_argument("--seconds-per-example", type=float, default=0.01)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. cache_dir=/path/with/the/demo/base")
    args = parser.parse_args()
    quiet_libraries()
    work = Path(tempfile.mkdtemp(prefix="fedsim-systems-"))
    # FedAvg, statistics off the training passes: the demo config's strategy when these figures were taken
    base = ["strategy.name=fedavg", "train.routing_stats=during", "progress=false",
            f"data.num_clients={2 * args.clients}", f"clients_per_round={args.clients}",
            "data.alpha=1.0", "system.profiles=random", "system.slow_fraction=0.3", "system.slow_factor=5",
            f"system.seconds_per_example={args.seconds_per_example}", "checkpoint.every=0", *args.overrides]
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             _system_config=EMBEDDED_SYSTEM_CONFIG)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    try:
        if "stragglers" in args.parts:
            table = stragglers(base, args.rounds, args.clients, args.seconds_per_example, work)
            table.to_csv(Path(args.out) / "systems_stragglers.csv", index=False)
            print(f"stragglers: 30 % of clients 5× slower; target accuracy {table.attrs['target']:.3f}")
            print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        if "compression" in args.parts:
            table = compression(base, args.rounds, work)
            table.to_csv(Path(args.out) / "systems_compression.csv", index=False)
            print("compression (uplink; error feedback on for top-k)")
            print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
