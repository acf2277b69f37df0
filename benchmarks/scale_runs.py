"""Real widths end to end: each ``configs/scale/`` file, 2 rounds of 20 clients on 2 workers, FedAvg and FedAlign-MoE.

Each run goes through the CLI (``python -m fedsim run``) as a user's would,
on a base built once per configuration (the first run of a configuration
builds it in its driver, the second maps the cached one: the driver's peak
differs between them and both are reported). Figures come from the run's own
tables (``rounds.parquet``, ``placement.csv``), one row per run:

- ``update_mib``: one client's update as sent (``bytes_up`` over the clients
  of a round: LoRA factors, routers and routing statistics);
- ``round_s``: wall seconds of a round, median over the rounds; ``train_s``
  and ``eval_s`` its training and evaluation parts (``train_wall_s``,
  ``eval_wall_s``);
- ``overhead``: ``overhead_ratio`` (the round's training wall time over the
  clients' compute spread over the workers: 1.0 is a scheduler that costs
  nothing), median over the rounds;
- ``worker_gib``, ``aggregator_gib``, ``driver_gib``: each process's peak
  resident memory (the largest worker's).

``--record FILE`` also writes the table as CSV (``benchmarks/measured/`` keeps
the figures the docs quote and ``tests/fedsim/test_plan.py`` checks
``fedsim plan`` against).

    .venv/bin/python benchmarks/scale_runs.py [--configs olmoe-1b-7b,...] [--strategies fedavg,fedalign_moe]
    .venv/bin/python benchmarks/scale_runs.py --quick      # tiny widths, 1 round of 4 clients (a test runs it)

At the real widths each run takes minutes (OLMoE-1B-7B: about 2 min a round
on 2 cores) and needs up to ~16 GiB of memory; run them on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SCALE = ROOT / "configs" / "scale"
GIB = 2**30
# tiny widths of the same configuration files: what the test runs
QUICK = [
    "model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=4", "model.intermediate_size=32",
    "model.max_position=128", "data.max_per_class=20", "rounds=1",
    "clients_per_round=4", "data.num_clients=4", "data.min_examples=2",
]


def run_once(
    config: str, strategy: str, run_dir: Path, cache: Path, extra: list[str], *, builds_base: bool
) -> dict[str, object]:
    """Run ``configs/scale/<config>.yaml`` with ``strategy`` into ``run_dir``; one row of the table."""
    cmd = [
        sys.executable, "-m", "fedsim", "run", "--config", str(SCALE / f"{config}.yaml"), "--out", str(run_dir),
        f"strategy.name={strategy}", f"cache_dir={cache}", "progress=false", *extra,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"{config} / {strategy} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    rounds = pd.read_parquet(run_dir / "rounds.parquet")
    workers = pd.read_csv(run_dir / "placement.csv")
    return {
        "config": config,
        "strategy": strategy,
        "rounds": len(rounds),
        "clients": int(rounds["clients_completed"].iloc[0]),
        "update_mib": float((rounds["bytes_up"] / rounds["clients_completed"]).iloc[0] / 2**20),
        "round_s": float(rounds["wall_s"].median()),
        "train_s": float(rounds["train_wall_s"].median()),
        "eval_s": float(rounds["eval_wall_s"].median()),
        "overhead": float(rounds["overhead_ratio"].median()),
        "worker_gib": float(workers["peak_rss_mib"].max() / 1024),
        "aggregator_gib": float(rounds["aggregator_peak_rss_mib"].max() / 1024),
        "driver_gib": float(rounds["driver_peak_rss_mib"].max() / 1024),
        "driver_built_base": builds_base,
    }


def measure(configs: list[str], strategies: list[str], *, quick: bool, work: Path) -> pd.DataFrame:
    """One row per (configuration, strategy), each configuration's base built by its first run."""
    rows = []
    for config in configs:
        extra = QUICK if quick else []
        for strategy in strategies:
            run_dir, first = work / f"{config}-{strategy}", strategy == strategies[0]
            rows.append(run_once(config, strategy, run_dir, work / "cache", extra, builds_base=first))
            print(pd.DataFrame(rows[-1:]).to_string(index=False, float_format=lambda v: f"{v:.2f}"), flush=True)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--configs", default=",".join(sorted(p.stem for p in SCALE.glob("*.yaml"))))
    parser.add_argument("--strategies", default="fedavg,fedalign_moe")
    parser.add_argument("--quick", action="store_true", help="tiny widths, one round of 4 clients")
    parser.add_argument("--record", help="also write the table to this CSV file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedsim-scale-runs-") as work:
        table = measure(args.configs.split(","), args.strategies.split(","), quick=args.quick, work=Path(work))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    if args.record:
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.record, index=False)


if __name__ == "__main__":
    main()
