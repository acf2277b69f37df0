"""Run Flower's simulation engine on the spec written by ``benchmarks/vs_flower.py`` (in the Flower venv).

FEDSIM_FLOWER_SPEC=spec.json PYTHONPATH=. .venv-flower/bin/python benchmarks/flower/run_flower.py
"""

from __future__ import annotations

import os

from flwr.simulation import run_simulation

from benchmarks.flower.flower_app import client_app, server_app, spec

if __name__ == "__main__":
    for key, value in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                       "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)
    s = spec()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=len(s["partitions"]),
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        "init_args": {"num_cpus": s["workers"], "include_dashboard": False}},
    )
