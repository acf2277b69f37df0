"""fedsim against Flower's simulation engine on the same workload: seconds per round and overhead ratio.

The same MoE, LoRA, data split, clients per round, local steps and rounds,
run by fedsim (its torch engine on a worker pool) and by Flower 1.42
(``run_simulation`` with a ServerApp running FedAvg and a ClientApp whose
``train`` handler calls fedsim's own torch engine, on Flower's Ray backend with
one CPU per client). Flower pins its own ray, so it runs from a separate venv
(``make flower-venv`` creates ``.venv-flower`` from benchmarks/flower/requirements.txt;
this script creates it when missing).

Printed per workload and system: seconds per round (median after the first),
the overhead ratio round wall ÷ (Σ client compute ÷ workers), with fedsim's
Σ client compute used for every row so the ratios share a denominator, and
fedsim's speed-up. A third row per workload, ``ray floor``, replays fedsim's
own clients (their measured compute seconds as busy tasks on bare Ray actors,
update-sized returns) with nothing else around them: the overhead any Ray
scheduler pays on this machine for this workload. Workloads: (a) ``tiny``, the tests' tiny model; (b) ``demo``,
the demo's model loaded from its saved checkpoint, with Flower's client built
the way Flower's LLM examples build it (model loaded inside every call) and
with the model cached in the actor.

    .venv/bin/python benchmarks/vs_flower.py                 # both workloads
    .venv/bin/python benchmarks/vs_flower.py --workloads tiny --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedsim import environment  # noqa: E402

environment.apply()

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import ray  # noqa: E402

from actors import shard_by_work  # noqa: E402
from fedsim.config import RunConfig, load_config  # noqa: E402
from fedsim.driver import ray_system_config, run  # noqa: E402
from fedsim.engine.torch_engine import TorchEngineSpec  # noqa: E402
from fedsim.prepare import prepare  # noqa: E402
from fedsim.quiet import quiet_libraries  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLOWER_VENV = ROOT / ".venv-flower"
WORKLOADS: dict[str, tuple[str | None, list[str]]] = {
    "tiny": (None, [
        "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.intermediate_size=64", "model.num_experts=4", "model.top_k=2", "model.pretrain.tokenizer_vocab=600",
        "lora.rank=4", "data.source=synthetic", "data.synthetic_docs_per_label=40", "data.max_length=48",
        "train.batch_size=8",
    ]),
    "demo": ("configs/demo.yaml", []),
}


def flower_python() -> Path:
    """The Flower venv's interpreter, created from benchmarks/flower/requirements.txt if missing."""
    python = FLOWER_VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(FLOWER_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU build first, as for the product's venv
        subprocess.run([*pip, "-r", str(ROOT / "benchmarks/flower/requirements.txt")], check=True)
    return python


def run_fedsim(cfg: RunConfig, out: Path, workers: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The per-round table of fedsim (round wall, Σ client compute) and its per-client table."""
    ray.init(num_cpus=workers, include_dashboard=False, logging_level="WARNING",
             _system_config=ray_system_config(cfg, prepare(cfg)))  # as the driver starts its embedded Ray
    try:
        result = run(cfg, out=out)
    finally:
        ray.shutdown()
    rounds = result.rounds
    return pd.DataFrame({"round": rounds["round"], "round_wall_s": rounds["train_wall_s"],
                         "compute_s_sum": rounds["compute_s_sum"]}), result.clients


@ray.remote(num_cpus=1)
class BusyWorker:
    """A bare Ray actor: spends one client's measured seconds on its CPU and returns an update-sized array."""

    def train(self, seconds: float, values: int) -> np.ndarray:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass
        return np.zeros(values, dtype=np.float32)


def run_ray_floor(
    clients: pd.DataFrame, update_values: int, workers: int, system_config: dict[str, Any]
) -> pd.DataFrame:
    """What any Ray scheduler pays around fedsim's own clients, replayed as busy tasks on bare actors.

    Each round's clients, with the compute seconds fedsim measured, replayed as busy tasks on ``workers`` bare
    actors (sharded as fedsim shards them, update-sized returns in the shared object store), and nothing else: no
    instructions, aggregation or bookkeeping. Its overhead ratio is the floor for this workload.
    ``system_config``: the one fedsim's run had.
    """
    ray.init(num_cpus=workers, include_dashboard=False, logging_level="WARNING", _system_config=system_config)
    try:
        actors = [BusyWorker.remote() for _ in range(workers)]
        ray.get([a.train.remote(0.0, 1) for a in actors])  # started and warm, as fedsim's workers are after round 1
        rows = []
        for r, cohort in clients.groupby("round", sort=True):
            seconds, examples = cohort["compute_s"].to_numpy(), cohort["n_examples"].to_numpy()
            t = time.perf_counter()
            refs = [actors[w].train.remote(float(seconds[pos]), update_values)
                    for w, shard in enumerate(shard_by_work(examples.tolist(), workers)) for pos in shard]
            ray.wait(refs, num_returns=len(refs), fetch_local=False)
            rows.append({"round": r, "round_wall_s": time.perf_counter() - t, "compute_s_sum": float(seconds.sum())})
            del refs
    finally:
        ray.shutdown()
    return pd.DataFrame(rows)


def run_flower(cfg: RunConfig, work: Path, mode: str, workers: int) -> pd.DataFrame:
    """Flower's simulation of the same clients, in the Flower venv; its per-round table."""
    prepared = prepare(cfg)
    engine = TorchEngineSpec(base_path=prepared.base_path, train_path=prepared.train_path, test_path=prepared.test_path,
                             label_token_ids=prepared.label_token_ids, lora=cfg.lora, train=cfg.train)()
    np.save(work / "initial.npy", engine.initial_payload)  # fedsim's initial global payload, the same start
    spec = {
        "base_path": prepared.base_path, "train_path": prepared.train_path, "test_path": prepared.test_path,
        "label_token_ids": list(prepared.label_token_ids), "lora": cfg.lora.model_dump(),
        "train": cfg.train.model_dump(),
        "seed": cfg.seed, "mode": mode, "rounds": cfg.rounds, "workers": workers,
        "partitions": [prepared.partitions[c].tolist() for c in range(cfg.data.num_clients)],
        "initial_payload": str(work / "initial.npy"), "result": str(work / f"flower-{mode}.json"),
    }
    spec_path = work / f"flower-{mode}-spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "FEDSIM_FLOWER_SPEC": str(spec_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([str(flower_python()), str(ROOT / "benchmarks/flower/run_flower.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0 or not Path(spec["result"]).exists():
        raise RuntimeError(f"Flower run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return pd.DataFrame(json.loads(Path(spec["result"]).read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=["tiny", "demo"])
    parser.add_argument("--clients", type=int, default=10, help="clients per round (all clients, every round)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("overrides", nargs="*", help="config overrides for both systems")
    args = parser.parse_args()
    quiet_libraries()
    work = Path(tempfile.mkdtemp(prefix="fedsim-vs-flower-"))
    rows = []
    for workload in args.workloads:
        config, shape = WORKLOADS[workload]
        cfg = load_config(config, [
            *shape, "progress=false", f"name=vs-flower-{workload}", "strategy.name=fedavg", "model.pretrain.steps=0",
            f"rounds={args.rounds}", f"clients_per_round={args.clients}", f"data.num_clients={args.clients}",
            "data.partition=iid", f"train.local_steps={args.local_steps}", "train.routing_stats=off",
            f"eval.every={args.rounds}", f"workers.num_workers={args.workers}", "workers.cpus_per_worker=1",
            f"cache_dir={work / 'cache'}", *args.overrides,
        ])
        runs: dict[str, pd.DataFrame] = {}
        runs["fedsim"], clients = run_fedsim(cfg, work / f"fedsim-{workload}", args.workers)
        update_values = int(clients["bytes_up"].median()) // 4  # float32 values of an update as fedsim sent it
        runs["ray floor (same client times)"] = run_ray_floor(clients, update_values, args.workers,
                                                              ray_system_config(cfg, prepare(cfg)))
        for mode in (["cached"] if workload == "tiny" else ["per_call", "cached"]):
            runs[f"flower ({mode.replace('_', ' ')})"] = run_flower(cfg, work, mode, args.workers)
        fedsim_compute = runs["fedsim"].set_index("round")["compute_s_sum"]
        for system, table in runs.items():
            steady = table[table["round"] > 1]
            rows.append({
                "workload": workload, "system": system,
                "s_per_round": steady["round_wall_s"].median(),
                "overhead_ratio": (
                    steady["round_wall_s"] / (steady["round"].map(fedsim_compute) / args.workers)
                ).median(),
                "own_overhead_ratio": (steady["round_wall_s"] / (steady["compute_s_sum"] / args.workers)).median(),
            })
    table = pd.DataFrame(rows)
    fedsim_s = table[table["system"] == "fedsim"].set_index("workload")["s_per_round"]
    table["fedsim_speedup"] = table["workload"].map(fedsim_s).rdiv(table["s_per_round"])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    table.to_csv(Path(args.out) / "vs_flower.csv", index=False)
    print(f"{args.clients} clients per round, {args.local_steps} local steps, {args.rounds} rounds, "
          f"{args.workers} workers")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
