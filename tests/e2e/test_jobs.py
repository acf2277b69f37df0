"""``fedsim submit`` against a real Ray head started here on 127.0.0.1: the job runs to SUCCEEDED and writes its run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.e2e.conftest import TINY

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
# Ray ≥ 2.59 starts local clusters with token authentication; the client must say so to send the token.
# The job's `python` is the cluster's: this project's environment, as for a user who activated it.
ENV = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Ray head of its own (ports, temp dir), with its dashboard; stopped with its `ray start --block` process."""
    gcs, dashboard, client, agent_http, agent_grpc, metrics = _free_ports(6)
    ray = Path(sys.executable).with_name("ray")
    head = subprocess.Popen(
        [str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--temp-dir={tmp_path_factory.mktemp('rayhead')}", "--disable-usage-stats"],
        env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while subprocess.run([sys.executable, "-m", "fedsim", "status", "--address", address, "none"],
                             cwd=ROOT, env=ENV, capture_output=True, text=True).stderr.find("cannot reach") >= 0:
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the head's dashboard did not come up within 180 s"
            time.sleep(2)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=120)


def test_submit_follows_the_job_to_success_and_the_run_directory_is_complete(ray_head: str, cache_dir: Path, tmp_path: Path) -> None:
    # Prepare: the tiny run as a config file, as a user would submit it
    config = tmp_path / "tiny.yaml"
    overrides = dict(item.split("=", 1) for item in TINY)
    config.write_text(yaml.safe_dump({}))

    # Execute
    done = subprocess.run(
        [sys.executable, "-m", "fedsim", "submit", "--address", ray_head, "--config", str(config), "--follow",
         "--out", str(tmp_path / "runs"), f"cache_dir={cache_dir}", *(f"{k}={v}" for k, v in overrides.items())],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600,
    )

    # Assert: SUCCEEDED, and the run directory the job wrote
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    first = done.stdout.splitlines()[0]
    job_id, run_dir = first.split()[2].rstrip(";"), Path(first.split()[-1])
    assert done.stdout.strip().endswith(f"job {job_id}: SUCCEEDED") and "round 2" in done.stdout
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    assert pd.read_parquet(run_dir / "rounds.parquet")["round"].tolist() == [1, 2]
    status = subprocess.run([sys.executable, "-m", "fedsim", "status", "--address", ray_head, job_id],
                            cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout and str(run_dir) in status.stdout


def test_an_unknown_job_is_one_line_and_exit_two(ray_head: str) -> None:
    done = subprocess.run([sys.executable, "-m", "fedsim", "logs", "--address", ray_head, "no-such-job"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("fedsim: error:") and len(done.stderr.splitlines()) == 1
