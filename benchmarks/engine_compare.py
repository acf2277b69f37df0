"""Per-client local-training time: torch engine vs deepspeed engine (G = 1 and 2), and the all-to-all share.

For each model shape (the tests' tiny model and the demo's model; random
init, which does not change the cost) and each engine setting, one worker
pool (or one worker group) trains the same clients from the same payload;
the table gives the median of the clients' measured compute seconds, their
ratio to the torch engine on one CPU, and, for G = 2, the share of a
profiled client's time that its rank spent inside gloo's all-to-all.

    .venv/bin/python benchmarks/engine_compare.py            # tiny and demo shapes, 4 clients × 2 repeats
    .venv/bin/python benchmarks/engine_compare.py --quick    # tiny shape only, 2 clients × 1 repeat
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
from aggregation.messages import ClientInstructions  # noqa: E402
from fedsim.config import load_config  # noqa: E402
from fedsim.driver import make_pool  # noqa: E402
from fedsim.prepare import prepare  # noqa: E402
from fedsim.quiet import quiet_libraries  # noqa: E402

SHAPES: dict[str, tuple[str | None, list[str]]] = {
    "tiny": (None, [
        "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1",
        "model.intermediate_size=32", "model.num_experts=4", "model.top_k=2", "model.pretrain.tokenizer_vocab=400",
        "lora.rank=2", "data.source=synthetic", "data.synthetic_docs_per_label=24", "data.max_length=32",
        "data.partition=iid", "data.num_clients=4", "clients_per_round=4", "train.batch_size=8",
    ]),
    "demo": ("configs/demo.yaml", ["data.partition=iid"]),
}
SETTINGS: list[tuple[str, list[str]]] = [
    ("torch, 1 CPU", []),
    ("torch, 2 CPUs", ["workers.cpus_per_worker=2"]),
    ("deepspeed G=1", ["engine.backend=deepspeed"]),
    ("deepspeed G=2", ["engine.backend=deepspeed", "engine.group_size=2"]),
]


def client_seconds(cfg, clients: list[int], repeats: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Median compute seconds per client and mean all-to-all seconds (0 when not profiled)."""
    prepared = prepare(cfg)
    pool = make_pool(cfg, prepared, 1)
    try:
        _, initial = pool.describe()
        payload = ray.put(initial)
        train = lambda cid, seed: pool.submit(  # noqa: E731
            payload, [ClientInstructions(client_id=cid, round_idx=1, seed=seed)], [prepared.partitions[cid]], [1.0])[0]
        ray.get(train(clients[0], 0))  # warm-up: first forward passes, allocator, gloo buffers
        updates = [ray.get(train(cid, rep)) for rep in range(repeats) for cid in clients]
    finally:
        pool.shutdown()
    alltoall = [u.metrics["alltoall_seconds"][0] / u.compute_seconds
                for u in updates if "alltoall_seconds" in u.metrics]
    return (float(np.median([u.compute_seconds for u in updates])),
            float(np.mean(alltoall)) if alltoall else float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--local-steps", type=int, default=8)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    quiet_libraries()
    shapes = ["tiny"] if args.quick else list(SHAPES)
    clients, repeats = ([0, 1], 1) if args.quick else ([0, 1, 2, 3], 2)
    work = Path(tempfile.mkdtemp(prefix="fedsim-engines-"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
             _system_config=EMBEDDED_SYSTEM_CONFIG)
    rows = []
    try:
        for shape in shapes:
            config, overrides = SHAPES[shape]
            base = [*overrides, "strategy.name=fedavg", "progress=false", "model.pretrain.steps=0",
                    "workers.num_workers=1", f"train.local_steps={args.local_steps}", "train.routing_stats=during",
                    f"cache_dir={work / 'cache'}"]
            for name, setting in SETTINGS:
                seconds, _ = client_seconds(load_config(config, [*base, *setting]), clients, repeats)
                share = float("nan")
                if "engine.group_size=2" in setting:  # a second, profiled pass: the profiler slows the step
                    _, share = client_seconds(load_config(config, [*base, *setting, "engine.profile_alltoall=true"]),
                                              clients[:1], 1)
                rows.append({"model": shape, "engine": name, "client_s": seconds, "alltoall_share": share})
    finally:
        ray.shutdown()
    table = pd.DataFrame(rows)
    torch_one = table[table["engine"] == "torch, 1 CPU"].set_index("model")["client_s"]
    table["vs_torch_1cpu"] = table["client_s"] / table["model"].map(torch_one)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    table.to_csv(Path(args.out) / "engine_compare.csv", index=False)
    print(f"local steps per client: {args.local_steps}; clients × repeats: {len(clients)} × {repeats}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
