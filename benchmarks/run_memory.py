"""Peak memory of each process of a run at a real MoE's widths: the driver, each worker, the aggregator.

The run is the one issue 17 measured: OLMoE-1B-7B's widths (hidden 2048,
16 heads, 64 experts top-8, expert FFN 1024) with 2 layers, random weights,
one round of 4 clients on 2 workers, one local step of 4 examples,
FedAlign-MoE. It runs twice through the CLI (``python -m fedsim run``), on the
same base, in the two ways a base and its expert LoRA can be handled:

- ``before``: the base saved in the hub's per-expert layout (transformers'
  default ``save_pretrained``; what a downloaded model has and what fedsim
  saved until now) and peft's expert LoRA, which forms W + s·B·A for every
  expert (``lora.routed_experts=false``);
- ``after``: the base in its own fused layout (``fedsim.models.save_base``,
  read in place by the workers) and the expert LoRA on the routed rows.

Both runs read their base from ``model.pretrained``, so neither driver builds
it; building it is measured on its own (row ``driver, building the base``: the
peak of a process that builds the model with random weights and saves it in
that layout; ``after`` is ``fedsim.prepare``'s own build, data included). The
two bases hold different random weights, which changes no memory figure.

Columns: ``process`` and, per variant, its peak resident memory (GiB; Linux
``ru_maxrss``, which counts a worker's mapped base pages once per process even
where a node's workers share them), and ``weights_gib`` (the base's parameters
in fp32). Printed after: each worker's peak ÷ weights.

    python benchmarks/run_memory.py              # OLMoE widths: ~10 min, up to ~14 GiB RAM
    python benchmarks/run_memory.py --quick      # tiny widths, ~1 min (a test runs it)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from fedsim import environment  # noqa: E402

environment.apply()

import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
OLMOE = [
    "model.family=olmoe", "model.hidden_size=2048", "model.num_heads=16", "model.num_kv_heads=16",
    "model.intermediate_size=1024", "model.num_experts=64", "model.top_k=8", "model.num_layers=2",
]
QUICK = [
    "model.family=olmoe", "model.hidden_size=64", "model.num_heads=4", "model.num_kv_heads=4",
    "model.intermediate_size=32", "model.num_experts=8", "model.top_k=2", "model.num_layers=2",
    "model.pretrain.tokenizer_vocab=600",
]
RUN = [
    "model.pretrain.steps=0", "data.partition=iid", "data.max_per_class=40", "rounds=1", "clients_per_round=4",
    "train.local_steps=1", "train.batch_size=4", "strategy.name=fedalign_moe", "train.routing_stats=during",
    "workers.num_workers=2", "progress=false",
]
VARIANTS = {"before": ["lora.routed_experts=false"], "after": ["lora.routed_experts=true"]}


def _child(code: str, *args: str) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter (so its peak is its own); it prints one JSON object last."""
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# fedsim's own build of the base (its cache directory, the model's own layout): directory, peak, weights.
_BUILD_OWN = """
import json, resource, sys
from fedsim.config import load_config
from fedsim.models import load_pretrained
from fedsim.prepare import prepare
cfg = load_config('configs/demo.yaml', json.loads(sys.argv[1]))
base = prepare(cfg).base_path
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
weights = sum(p.numel() * p.element_size() for p in load_pretrained(base).parameters())
print(json.dumps({'base': base, 'peak': peak, 'weights': weights}))
"""

# The same model built with random weights and saved as transformers saves by default (the hub's per-expert
# layout) next to a copy of the tokenizer: the directory the 'before' run reads, and the building process's peak.
_BUILD_HUB = """
import json, resource, shutil, sys
from pathlib import Path
import torch
from transformers import AutoConfig
from fedsim.models.registry import model_class
own, hub = Path(sys.argv[1]), Path(sys.argv[2])
shutil.copytree(own, hub, ignore=shutil.ignore_patterns('*.safetensors', '*.safetensors.index.json'))
config = AutoConfig.from_pretrained(own)
torch.manual_seed(0)
model_class(config).from_config(config).save_pretrained(hub)
print(json.dumps({'peak': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def run_peaks(run_dir: Path, overrides: list[str]) -> dict[str, float]:
    """Run the CLI into ``run_dir``; each process's peak resident memory (bytes), from the run's own tables."""
    cmd = [sys.executable, "-m", "fedsim", "run", "--config", "configs/demo.yaml", "--out", str(run_dir), *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        raise SystemExit(f"fedsim run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    rounds = pd.read_parquet(run_dir / "rounds.parquet")
    workers = pd.read_csv(run_dir / "placement.csv")
    peaks = {"driver, running the rounds": rounds["driver_peak_rss_mib"].max() * 2**20}
    peaks |= {f"worker {i}": mib * 2**20 for i, mib in enumerate(workers["peak_rss_mib"])}
    peaks["aggregator"] = rounds["aggregator_peak_rss_mib"].max() * 2**20
    return peaks


def measure(widths: list[str], work: Path) -> tuple[pd.DataFrame, float]:
    """The table (one row per process, a column per variant, GiB) and the base's weights (bytes)."""
    common = [*widths, *RUN, f"cache_dir={work / 'cache'}"]
    own = _child(_BUILD_OWN, json.dumps(common))
    hub = work / "hub-layout"
    hub_build = _child(_BUILD_HUB, own["base"], str(hub))
    bases = {"before": str(hub), "after": own["base"]}
    columns: dict[str, dict[str, float]] = {
        "before": {"driver, building the base": hub_build["peak"]}, "after": {"driver, building the base": own["peak"]},
    }
    for variant, extra in VARIANTS.items():
        peaks = run_peaks(work / f"run-{variant}", [*common, f"model.pretrained={bases[variant]}", *extra])
        columns[variant] |= peaks
    table = pd.DataFrame(columns) / GIB
    table.index.name = "process"
    return table.reset_index(), float(own["weights"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="tiny widths: about a minute")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedsim-run-memory-") as work:
        table, weights = measure(QUICK if args.quick else OLMOE, Path(work))
    table["weights_gib"] = weights / GIB
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / f"run_memory{'_quick' if args.quick else ''}.csv", index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    workers = table[table["process"].str.startswith("worker")]
    for variant in VARIANTS:
        print(f"{variant}: worker peak / weights = {(workers[variant] / table['weights_gib'].iloc[0]).max():.2f}")


if __name__ == "__main__":
    main()
