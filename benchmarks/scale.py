"""1,000 virtual clients on this machine: memory of every Ray process and of the object store, round by round.

The tiny model, 1,000 clients (Dirichlet or natural partition), 50 per round,
20 rounds, 2 workers. After each round the table records the proportional set
size (PSS: shared pages split between the processes that map them, so the
object store is not counted once per reader) summed over the driver and every
process of the Ray session, the largest single process, and the bytes the
object store holds, which must not grow from round to round.

    .venv/bin/python benchmarks/scale.py [--clients 1000] [--per-round 50] [--rounds 20] [--partition dirichlet]
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
    match = re.search(r"Plasma memory usage (\d+) MiB, (\d+) objects", memory_summary(stats_only=True))
    return {
        "ray_pss_gib": pss / 2**30,
        "driver_mib": driver / 2**20,
        "largest_process_mib": largest / 2**20,
        "largest_process": largest_name,
        "object_store_mib": float(match.group(1)) if match else float("nan"),
        "object_store_objects": float(match.group(2)) if match else float("nan"),
    }


class MemoryProbe(Callback):
    """Reads the session's memory after every round."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def after_round(self, record: RoundRecord) -> tuple[bool, dict[str, Any]]:
        self.rows.append({"round": record.round_idx, "train_wall_s": record.row["train_wall_s"], **memory_now()})
        return False, {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--per-round", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--partition", choices=["dirichlet", "natural", "iid"], default="dirichlet")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    quiet_libraries()
    work = Path(tempfile.mkdtemp(prefix="fedsim-scale-"))
    cfg = load_config(None, [
        *TINY, f"data.num_clients={args.clients}", f"clients_per_round={args.per_round}", f"rounds={args.rounds}",
        f"data.partition={args.partition}", "data.alpha=1.0",
        f"data.synthetic_docs_per_label={max(24, 4 * args.clients)}",
        f"eval.every={args.rounds}", f"cache_dir={work / 'cache'}", "name=scale",
    ])
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", _system_config=EMBEDDED_SYSTEM_CONFIG)
    probe = MemoryProbe()
    try:
        run(cfg, out=work / "run", callbacks=[probe])
    finally:
        ray.shutdown()
    table = pd.DataFrame(probe.rows)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    table.to_csv(Path(args.out) / "scale.csv", index=False)
    print(f"{args.clients} clients ({args.partition}), {args.per_round} per round, {args.rounds} rounds, 2 workers")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    steady = table[table["round"] > 1]
    print(f"peak PSS of all Ray processes: {table['ray_pss_gib'].max():.2f} GiB; object store from round 2 to "
          f"{args.rounds}: {steady['object_store_mib'].iloc[0]:.0f} → {steady['object_store_mib'].iloc[-1]:.0f} MiB, "
          f"{steady['object_store_objects'].iloc[0]:.0f} → {steady['object_store_objects'].iloc[-1]:.0f} objects")


if __name__ == "__main__":
    main()
