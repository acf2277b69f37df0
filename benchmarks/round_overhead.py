"""Round overhead of the simulator: round wall time ÷ (Σ client compute seconds ÷ workers).

1.0 is a perfect split of the measured client work over the workers; anything
above is scheduling, transfer, aggregation and waiting. Also reports the peak
RSS of the driver and of the aggregator actor, which must not grow with the
number of clients per round beyond one update's size.

    .venv/bin/python benchmarks/round_overhead.py [--clients 20 50 100] [--rounds 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from fedsim import environment  # noqa: E402

environment.apply()

import pandas as pd  # noqa: E402
import ray  # noqa: E402

from fedsim.config import load_config  # noqa: E402
from fedsim.driver import ray_system_config, run  # noqa: E402
from fedsim.prepare import prepare  # noqa: E402
from fedsim.quiet import quiet_libraries  # noqa: E402

TINY = [
    "progress=false", "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
    "model.intermediate_size=64", "model.num_experts=4", "model.top_k=2", "model.pretrain.steps=0",
    "model.pretrain.tokenizer_vocab=600", "lora.rank=4", "data.source=synthetic", "data.partition=iid",
    "data.min_examples=8", "data.max_length=48", "train.batch_size=8", "train.local_steps=4",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[20, 50, 100])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.hidden_size=128")
    args = parser.parse_args()
    quiet_libraries()
    work = Path(tempfile.mkdtemp(prefix="fedsim-bench-"))
    rows = []
    for n in args.clients:
        cfg = load_config(None, [*TINY, f"name=overhead{n}", f"rounds={args.rounds}", f"clients_per_round={n}",
                                 f"data.num_clients={n}", f"data.synthetic_docs_per_label={max(12, 4 * n)}",
                                 f"workers.num_workers={args.workers}", f"cache_dir={work / 'cache'}",
                                 f"eval.every={args.rounds}", *args.overrides])
        # a Ray per cohort size, configured as the driver configures its embedded Ray for this run
        ray.init(address="local", num_cpus=args.workers, include_dashboard=False, logging_level="WARNING",
                 _system_config=ray_system_config(cfg, prepare(cfg)))
        try:
            rounds = run(cfg, out=work / f"run{n}").rounds
            steady = rounds[rounds["round"] > 1]  # round 1 includes actor warm-up
            rows.append({
                "clients_per_round": n,
                "workers": args.workers,
                "round_wall_s": steady["train_wall_s"].median(),
                "client_compute_s_sum": steady["compute_s_sum"].median(),
                "overhead_ratio": (steady["train_wall_s"] / (steady["compute_s_sum"] / args.workers)).median(),
                "driver_peak_rss_mib": rounds["driver_peak_rss_mib"].max(),
                "aggregator_peak_rss_mib": rounds["aggregator_peak_rss_mib"].max(),
                "update_mib": rounds["bytes_up"].iloc[-1] / n / 2**20,
            })
        finally:
            ray.shutdown()
    table = pd.DataFrame(rows)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    table.to_csv(Path(args.out) / "round_overhead.csv", index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
