"""``fedsim submit`` against real Ray heads started here on 127.0.0.1.

With the project's environment, the job runs to SUCCEEDED and writes its run; with a `python` lacking the pins
on the head's PATH, it fails in one line that names the missing package and the remedies.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fedsim import environment
from tests.e2e.conftest import TINY

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
# Ray ≥ 2.59 starts local clusters with token authentication; the client must say so to send the token.
# The job's `python` is the cluster's: this project's environment, as for a user who activated it.
ENV = {**os.environ, **environment.RAY_ENV, "RAY_AUTH_MODE": "token",
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@contextmanager
def _head(env: dict[str, str]) -> Iterator[str]:
    """A Ray head of its own (ports, temp dir), with its dashboard; stopped with its `ray start --block` process.

    `ray` is always this environment's; `env`'s PATH decides which `python` a job's entrypoint runs. The temp dir
    is short and directly under /tmp: Ray's socket paths inside it must stay under AF_UNIX's 107 bytes.
    """
    gcs, dashboard, client, agent_http, agent_grpc, metrics = _free_ports(6)
    ray = Path(sys.executable).with_name("ray")
    temp_dir = Path(tempfile.mkdtemp(prefix="fsray-", dir="/tmp"))
    output = (temp_dir / "ray-start.log").open("w")
    head = subprocess.Popen(
        [str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while subprocess.run([sys.executable, "-m", "fedsim", "status", "--address", address, "none"], cwd=ROOT,
                             env=ENV, capture_output=True, text=True, timeout=120).stderr.find("cannot reach") >= 0:
            assert head.poll() is None, "ray start --head exited:\n" + Path(output.name).read_text()[-3000:]
            assert time.monotonic() < deadline, "the head's dashboard did not come up within 180 s"
            time.sleep(2)
        yield address
    finally:
        with suppress(ProcessLookupError):  # a head that exited by itself has nothing left to stop
            os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=120)
        output.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    """A head whose jobs run this project's environment, as for a user who activated it before `ray start`."""
    with _head(ENV) as address:
        yield address


@pytest.fixture
def bare_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A head started by `.venv/bin/ray` with a bare venv first on PATH: its jobs' `python` lacks every pin.

    Function-scoped, and its test comes first in this module, so it is gone before `ray_head` starts (2 cores).
    """
    bare = tmp_path_factory.mktemp("bare")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    env = {**ENV, "PATH": f"{bare / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    with _head(env) as address:
        yield address, bare / "bin" / "python"


def test_submit_to_a_cluster_python_without_the_pins_fails_in_one_line_naming_the_module(
    bare_head: tuple[str, Path], cache_dir: Path, tmp_path: Path
) -> None:
    """A new user's first mistake (`ray start` outside the environment) must say what to do, not show a traceback."""
    # Prepare
    address, python = bare_head

    # Execute
    done = subprocess.run(
        [sys.executable, "-m", "fedsim", "submit", "--address", address, "--follow", "--out", str(tmp_path / "runs"),
         f"cache_dir={cache_dir}", *TINY],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )
    job_id = done.stdout.splitlines()[0].split()[2].rstrip(";") if done.stdout else ""
    log = subprocess.run([sys.executable, "-m", "fedsim", "logs", "--address", address, job_id],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120).stdout

    # Assert: exit 1; the last line says FAILED and why; what the job printed (after Ray's own lines) is that one
    # line, naming torch (the first pin), the Python that ran and both remedies
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith(f"job {job_id}: FAILED: the cluster's Python ({python}) lacks torch"), last
    assert "Running entrypoint for job" in log, log
    lines = [line for line in log.split("Running entrypoint for job", 1)[1].splitlines()[1:] if line.strip()]
    assert len(lines) == 1, log
    assert lines[0].startswith(f"fedsim: error: the cluster's Python ({python}) lacks torch (fedsim pins torch==")
    assert "ray start" in lines[0] and "--pip" in lines[0]
    assert "Traceback" not in log + done.stdout + done.stderr
    assert not (tmp_path / "runs").exists()


def test_submit_follows_the_job_to_success_and_the_run_directory_is_complete(
    ray_head: str, cache_dir: Path, tmp_path: Path
) -> None:
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
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout and str(run_dir) in status.stdout


def test_an_unknown_job_is_one_line_and_exit_two(ray_head: str) -> None:
    done = subprocess.run([sys.executable, "-m", "fedsim", "logs", "--address", ray_head, "no-such-job"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("fedsim: error:") and len(done.stderr.splitlines()) == 1
