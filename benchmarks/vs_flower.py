"""fedsim against Flower's simulation engine on the same workload: seconds per round and per client call.

The same MoE, LoRA, data split, clients per round, local steps and rounds,
run by fedsim (its torch engine on a worker pool) and by Flower 1.42
(``run_simulation`` with a ServerApp running FedAvg and a ClientApp whose
``train`` handler calls fedsim's own torch engine with fedsim's per-client
seed, so both systems train the same batches, on Flower's Ray backend with one
CPU per client). Flower pins its own ray, so it runs from a separate venv
(``make bench-flower`` creates ``.venv-flower`` from benchmarks/flower/requirements.txt;
this script creates it when missing).

Workloads:

- ``tiny``: the tests' tiny model; Flower's client cached per actor;
- ``demo``: the demo's model, Flower's client built per call (the way Flower's
  LLM examples build it) and cached per actor;
- ``olmoe``: OLMoE-1B-7B's widths (configs/scale/olmoe-1b-7b.yaml: hidden 2048,
  64 experts of FFN 1024, top-8, vocabulary 50304; depth 2, random weights,
  LoRA r 8 on attention and experts), ~30 MB updates. Flower's client is built
  per call and cached per actor, from the base re-saved by transformers'
  default ``save_pretrained`` (the hub's per-expert layout, what a Flower LLM
  example loads; ``--flower-base own`` gives it fedsim's own layout instead).
  ``--quick`` shrinks its widths to a smoke test's.

Printed per workload, local steps and system: clients per round, rounds, seconds
per round (median after the first), seconds per client call (mean, model
construction included where it is per call), the ratio to fedsim's seconds per
round, the update's bytes, the overhead ratio round wall ÷ (Σ client compute ÷
workers) with fedsim's Σ client compute as the denominator of every row, and
each system's own. For tiny and demo a ``ray floor`` row replays fedsim's own
clients (their measured compute seconds as busy tasks on bare Ray actors,
update-sized returns) with nothing else around them: the overhead any Ray
scheduler pays on this machine for this workload.

    .venv/bin/python benchmarks/vs_flower.py                 # tiny and demo
    .venv/bin/python benchmarks/vs_flower.py --workloads tiny --rounds 4
    .venv/bin/python benchmarks/vs_flower.py --workloads olmoe --local-steps 1,4,16 --clients 4 --rounds 2
    .venv/bin/python benchmarks/vs_flower.py --workloads olmoe --quick --clients 4 --rounds 2   # smoke

The third line is the OLMoE comparison of docs/benchmarks.md: about 21 minutes estimated on this project's
2-core machine with nothing else running (twice that beside other jobs), ~8 GB of disk in a temporary
directory (removed at the end) for the two copies of the base, and up to ~17 GiB of memory while Flower's
two actors load the hub layout per call (8.3 GiB each). The smoke takes 2-3 minutes per local-steps count
on a quiet machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fedsim import environment  # noqa: E402

environment.apply()

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import ray  # noqa: E402

from actors import shard_by_work  # noqa: E402
from fedsim.config import RunConfig, load_config  # noqa: E402
from fedsim.driver import ray_system_config, run  # noqa: E402
from fedsim.prepare import PreparedRun, prepare  # noqa: E402
from fedsim.quiet import quiet_libraries  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FLOWER_VENV = ROOT / ".venv-flower"
FlowerBase = Literal["own", "hub"]
FLOWER_SYSTEMS = {"per_call": "flower (per call)", "cached": "flower (cached)"}
RAY_FLOOR = "ray floor (same client times)"
LEADING = ["workload", "system", "local_steps", "clients", "rounds"]  # the columns that say which run a row is


@dataclass(frozen=True)
class Workload:
    """One model and task both systems run: a config file, overrides, and how Flower's client holds its model.

    Attributes
    ----------
    config : str or None
        YAML under the repository root; None for the defaults.
    shape : tuple of str
        Overrides applied after the file (the model's shape, its data).
    quick : tuple of str
        Overrides applied last under ``--quick``: a smoke test's widths (empty: the workload is small already).
    flower_modes : tuple of str
        Flower clients run: ``per_call`` (the engine built inside every call) and/or ``cached`` (once per actor).
    flower_base : {"own", "hub"}
        The base directory Flower's client loads: fedsim's own (``save_base``, read in place) or the same
        weights re-saved by transformers' default ``save_pretrained`` (the hub's per-expert layout).
    ray_floor : bool
        Whether to replay fedsim's clients on bare Ray actors (a row that costs fedsim's round time again).
    """

    config: str | None
    shape: tuple[str, ...]
    quick: tuple[str, ...] = ()
    flower_modes: tuple[str, ...] = ("per_call", "cached")
    flower_base: FlowerBase = "own"
    ray_floor: bool = True


WORKLOADS: dict[str, Workload] = {
    "tiny": Workload(None, (
        "model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "model.intermediate_size=64", "model.num_experts=4", "model.top_k=2", "model.pretrain.tokenizer_vocab=600",
        "lora.rank=4", "data.source=synthetic", "data.synthetic_docs_per_label=40", "data.max_length=48",
        "train.batch_size=8",
    ), flower_modes=("cached",)),
    "demo": Workload("configs/demo.yaml", ()),
    # The scale config's model, LoRA, data and batch of 4 (64 tokens); the benchmark sets the split to IID. A
    # test set of 5 %: fedsim evaluates once, after the last round and outside the figures, and at these widths
    # the config's 20 % took 40 s of a run measured on a busy machine.
    "olmoe": Workload("configs/scale/olmoe-1b-7b.yaml", ("data.test_fraction=0.05",), quick=(
        "model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=4", "model.intermediate_size=32",
        "model.num_experts=8", "model.top_k=2", "model.pretrain.tokenizer_vocab=600",
    ), flower_base="hub", ray_floor=False),
}


def local_steps_list(text: str) -> tuple[int, ...]:
    """``--local-steps``: one count or a comma-separated list of them (``1,4,16``), each ≥ 1."""
    try:
        steps = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected counts like 1,4,16, got {text!r}") from None
    if not steps or min(steps) < 1:
        raise argparse.ArgumentTypeError(f"every count must be at least 1, got {text!r}")
    return steps


def workload_config(
    name: str, *, local_steps: int, clients: int, rounds: int, workers: int, quick: bool, cache_dir: Path,
    overrides: list[str],
) -> RunConfig:
    """The run both systems make of workload ``name``: all ``clients`` every round, IID, FedAvg, no pretraining."""
    workload = WORKLOADS[name]
    return load_config(workload.config, [
        *workload.shape, "progress=false", f"name=vs-flower-{name}-{local_steps}", "strategy.name=fedavg",
        "model.pretrain.steps=0", f"rounds={rounds}", f"clients_per_round={clients}", f"data.num_clients={clients}",
        "data.partition=iid", f"train.local_steps={local_steps}", "train.routing_stats=off", f"eval.every={rounds}",
        f"workers.num_workers={workers}", "workers.cpus_per_worker=1", f"cache_dir={cache_dir}",
        *(workload.quick if quick else ()), *overrides,
    ])


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
    """The per-round table of fedsim (round wall, Σ client compute, clients, update bytes) and its per-client table."""
    ray.init(address="local", num_cpus=workers, include_dashboard=False, logging_level="WARNING",
             _system_config=ray_system_config(cfg, prepare(cfg)))  # as the driver starts its embedded Ray
    try:
        result = run(cfg, out=out)
    finally:
        ray.shutdown()
    rounds, clients = result.rounds, result.clients
    per_round = clients.groupby("round")
    return pd.DataFrame({
        "round": rounds["round"], "round_wall_s": rounds["train_wall_s"], "compute_s_sum": rounds["compute_s_sum"],
        "clients": rounds["round"].map(per_round.size()),
        "update_bytes": rounds["round"].map(per_round["bytes_up"].median()),
    }), clients


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
    ray.init(address="local", num_cpus=workers, include_dashboard=False, logging_level="WARNING",
             _system_config=system_config)
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
            rows.append({"round": r, "round_wall_s": time.perf_counter() - t, "compute_s_sum": float(seconds.sum()),
                         "clients": len(cohort), "update_bytes": update_values * 4})
            del refs
    finally:
        ray.shutdown()
    return pd.DataFrame(rows)


def _child(code: str, *args: str) -> None:
    """Run ``code`` in a fresh interpreter of this venv, so the models it loads never stay in this process."""
    done = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child failed ({done.returncode}):\n{done.stderr[-3000:]}")


# The same weights as fedsim's base, saved as transformers saves a model it did not load (the hub's per-expert
# layout). Re-saving the loaded base would keep its fused layout: save_pretrained reverts only the conversions its
# load applied, and loading the own layout applies none. So the weights go into a model built on the meta device.
_SAVE_HUB_LAYOUT = """
import sys
import torch
from transformers import AutoConfig
from fedsim.models import load_pretrained
from fedsim.models.registry import model_class
config = AutoConfig.from_pretrained(sys.argv[1])
with torch.device("meta"):
    model = model_class(config).from_config(config)
model.load_state_dict(load_pretrained(sys.argv[1]).state_dict(), assign=True)
model.save_pretrained(sys.argv[2])
"""

# fedsim's initial global payload (the base with LoRA as a worker builds it), saved as .npy.
_SAVE_INITIAL = """
import json, sys
import numpy as np
from fedsim.config import LoraConfig, TrainConfig
from fedsim.engine.torch_engine import TorchEngineSpec
s = json.loads(sys.argv[1])
engine = TorchEngineSpec(base_path=s['base_path'], train_path=s['train_path'], test_path=s['test_path'],
                         label_token_ids=tuple(s['label_token_ids']), lora=LoraConfig(**s['lora']),
                         train=TrainConfig(**s['train']))()
np.save(s['out'], engine.initial_payload)
"""


def flower_base(base_path: str, layout: FlowerBase, work: Path) -> str:
    """The base directory Flower's client loads: fedsim's own (``base_path``), or a copy in the hub's layout.

    The copy is what a Flower LLM example's ``from_pretrained`` reads (a downloaded checkpoint: one tensor per
    expert, fused as it loads); it is built once under ``work``.
    """
    if layout == "own":
        return base_path
    target = work / f"hub-{Path(base_path).name}"
    if not target.exists():
        building = work / f".building-{target.name}"
        _child(_SAVE_HUB_LAYOUT, base_path, str(building))
        building.rename(target)
    return str(target)


def initial_payload(cfg: RunConfig, prepared: PreparedRun, work: Path) -> Path:
    """The initial global payload of fedsim's engine for this base and LoRA: both systems start from it.

    Built once per base and LoRA, in a child, so the driver holds no model while the systems run.
    """
    spec = {"base_path": prepared.base_path, "train_path": prepared.train_path, "test_path": prepared.test_path,
            "label_token_ids": list(prepared.label_token_ids), "lora": cfg.lora.model_dump(),
            "train": cfg.train.model_dump()}
    key = hashlib.sha256(json.dumps([spec["base_path"], spec["lora"]], sort_keys=True).encode()).hexdigest()[:12]
    path = work / f"initial-{key}.npy"
    if not path.exists():
        _child(_SAVE_INITIAL, json.dumps({**spec, "out": str(path)}))
    return path


def run_flower(cfg: RunConfig, work: Path, mode: str, workers: int, base: FlowerBase = "own") -> pd.DataFrame:
    """Flower's simulation of the same clients, in the Flower venv; its per-round table."""
    prepared = prepare(cfg)
    spec = {
        "base_path": flower_base(prepared.base_path, base, work), "train_path": prepared.train_path,
        "test_path": prepared.test_path, "label_token_ids": list(prepared.label_token_ids),
        "lora": cfg.lora.model_dump(), "train": cfg.train.model_dump(),
        "seed": cfg.seed, "mode": mode, "rounds": cfg.rounds, "workers": workers,
        "partitions": [prepared.partitions[c].tolist() for c in range(cfg.data.num_clients)],
        "initial_payload": str(initial_payload(cfg, prepared, work)),
        "result": str(work / f"flower-{cfg.name}-{mode}.json"),
    }
    spec_path = work / f"flower-{cfg.name}-{mode}-spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "FEDSIM_FLOWER_SPEC": str(spec_path), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([str(flower_python()), str(ROOT / "benchmarks/flower/run_flower.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if done.returncode != 0 or not Path(spec["result"]).exists():
        raise RuntimeError(f"Flower run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return pd.DataFrame(json.loads(Path(spec["result"]).read_text()))


def summarise(runs: dict[str, pd.DataFrame], *, workers: int) -> pd.DataFrame:
    """One row per system from its per-round table; every table's rounds after the first count.

    Each table has columns ``round``, ``round_wall_s``, ``compute_s_sum`` (Σ of its clients' in-call seconds),
    ``clients`` and ``update_bytes`` (one client's update); ``runs["fedsim"]`` is the reference. Columns:
    ``s_per_round`` (median), ``s_per_call`` (Σ compute ÷ Σ clients), ``ratio_to_fedsim`` (s per round ÷
    fedsim's: above 1, slower than fedsim), ``update_bytes`` (median), ``overhead_ratio`` (round wall ÷ (fedsim's
    Σ client compute of that round ÷ workers), median: one denominator for every row) and
    ``own_overhead_ratio`` (the same with the system's own Σ compute).
    """
    fedsim_compute = runs["fedsim"].set_index("round")["compute_s_sum"]
    rows = []
    for system, table in runs.items():
        steady = table[table["round"] > 1]
        rows.append({
            "system": system,
            "s_per_round": steady["round_wall_s"].median(),
            "s_per_call": steady["compute_s_sum"].sum() / steady["clients"].sum(),
            "update_bytes": int(table["update_bytes"].median()),
            "overhead_ratio": (steady["round_wall_s"] / (steady["round"].map(fedsim_compute) / workers)).median(),
            "own_overhead_ratio": (steady["round_wall_s"] / (steady["compute_s_sum"] / workers)).median(),
        })
    out = pd.DataFrame(rows)
    out.insert(3, "ratio_to_fedsim", out["s_per_round"] / out.loc[out["system"] == "fedsim", "s_per_round"].iloc[0])
    return out


def compare(name: str, cfg: RunConfig, work: Path, workers: int, base: FlowerBase) -> pd.DataFrame:
    """Every system's run of ``cfg`` (workload ``name``), summarised: a row per system."""
    workload = WORKLOADS[name]
    runs: dict[str, pd.DataFrame] = {}
    started = time.perf_counter()
    runs["fedsim"], clients = run_fedsim(cfg, work / f"fedsim-{cfg.name}", workers)
    _took(cfg.name, "fedsim (base and data included the first time)", started)
    if workload.ray_floor:
        started = time.perf_counter()
        update_values = int(clients["bytes_up"].median()) // 4  # float32 values of an update as fedsim sent it
        runs[RAY_FLOOR] = run_ray_floor(clients, update_values, workers, ray_system_config(cfg, prepare(cfg)))
        _took(cfg.name, RAY_FLOOR, started)
    for mode in workload.flower_modes:
        started = time.perf_counter()
        runs[FLOWER_SYSTEMS[mode]] = run_flower(cfg, work, mode, workers, base)
        _took(cfg.name, FLOWER_SYSTEMS[mode], started)
    return summarise(runs, workers=workers)


def _took(run_name: str, system: str, started: float) -> None:
    """One line on stderr per system run: what a full benchmark's duration is extrapolated from."""
    print(f"{run_name}: {system}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="+", choices=sorted(WORKLOADS), default=["tiny", "demo"])
    parser.add_argument("--clients", type=int, default=10, help="clients per round (all clients, every round)")
    parser.add_argument("--rounds", type=int, default=5, help="at least 2: the first round is left out")
    parser.add_argument("--local-steps", type=local_steps_list, default=(4,), help="e.g. 4, or 1,4,16")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="olmoe at a smoke test's widths (the others as they are)")
    parser.add_argument("--flower-base", choices=["own", "hub"], default=None,
                        help="the base layout Flower's client loads (default: the workload's; olmoe: hub)")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("overrides", nargs="*", help="config overrides for both systems")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds: at least 2 (every figure is taken from the rounds after the first)")
    quiet_libraries()
    tables = []
    with tempfile.TemporaryDirectory(prefix="fedsim-vs-flower-") as tmp:  # OLMoE's two bases: ~8 GB
        work = Path(tmp)
        for name in args.workloads:
            for steps in args.local_steps:
                cfg = workload_config(name, local_steps=steps, clients=args.clients, rounds=args.rounds,
                                      workers=args.workers, quick=args.quick, cache_dir=work / "cache",
                                      overrides=args.overrides)
                table = compare(name, cfg, work, args.workers, args.flower_base or WORKLOADS[name].flower_base)
                table = table.assign(workload=name, local_steps=steps, clients=args.clients, rounds=args.rounds)
                table = table[[*LEADING, *(c for c in table.columns if c not in LEADING)]]
                tables.append(table)
                print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"), flush=True)  # one per system
    table = pd.concat(tables, ignore_index=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    csv = Path(args.out) / f"vs_flower_{'_'.join(args.workloads)}{'_quick' if args.quick else ''}.csv"
    table.to_csv(csv, index=False)  # one file per choice of workloads: an olmoe run leaves tiny's and demo's alone
    print(f"\n{args.workers} workers; seconds per round: median of rounds 2..{args.rounds}; written to {csv}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
