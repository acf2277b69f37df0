"""Several Ray nodes on 127.0.0.1 (``ray.cluster_utils.Cluster``): a run across them equals a one-node run.

Workers and worker groups land on two nodes and the run's metrics equal a one-node run's.

The cluster runs in a child process: this test session already holds an embedded Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(960)]  # its child may take 900 s

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, sys
import pandas as pd
import ray
from ray.cluster_utils import Cluster
from actors import EMBEDDED_SYSTEM_CONFIG
from fedsim.config import load_config
from fedsim.driver import run

config, out = sys.argv[1], sys.argv[2]
metrics = ["round", "test_loss", "test_accuracy", "train_loss", "clients_completed", "bytes_up"]
result = {}
# a head without CPUs (driver and aggregator) and two 1-CPU worker nodes
# Cluster writes /tmp/ray/ray_current_cluster; its shutdown removes it, even when a run fails
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": EMBEDDED_SYSTEM_CONFIG})
try:
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    for name, extra in (("torch", ["workers.placement=spread"]), ("deepspeed", ["engine.backend=deepspeed"])):
        r = run(load_config(config, extra), out=f"{out}/multi-{name}")
        nodes = pd.read_csv(r.run_dir / "placement.csv")["node_id"].nunique()
        result[f"multi-{name}"] = {"nodes": int(nodes), "rounds": r.rounds[metrics].to_dict("list")}
    ray.shutdown()
finally:
    cluster.shutdown()
ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING",
         _system_config=EMBEDDED_SYSTEM_CONFIG)
r = run(load_config(config), out=f"{out}/single")
result["single"] = {"nodes": 1, "rounds": r.rounds[metrics].to_dict("list")}
ray.shutdown()
print("RESULT " + json.dumps(result))
"""


def test_workers_on_two_nodes_give_the_one_node_metrics(tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the e2e tiny run with two workers (two groups of one for the deepspeed engine)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_config("workers.num_workers=2").model_dump(mode="json")))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # Execute
    child = subprocess.run([sys.executable, "-c", CHILD, str(config), str(tmp_path)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=900)
    # Assert
    assert child.returncode == 0, child.stderr[-3000:]
    line = next(ln for ln in child.stdout.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert result["multi-torch"]["nodes"] == 2
    assert result["multi-deepspeed"]["nodes"] == 2
    assert result["multi-torch"]["rounds"] == result["single"]["rounds"]
    assert result["multi-deepspeed"]["rounds"]["clients_completed"] == result["single"]["rounds"]["clients_completed"]
    assert result["multi-deepspeed"]["rounds"]["train_loss"] == pytest.approx(
        result["single"]["rounds"]["train_loss"], rel=1e-4
    )

