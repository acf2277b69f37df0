"""``fedsim submit/status/logs/stop``: a run as a Ray Job on a cluster, through Ray's JobSubmissionClient.

``submit`` validates the configuration here first (a bad key never reaches the
cluster), then stages what the job needs in a temporary ``working_dir``: the
three packages, ``pyproject.toml``, ``requirements.txt``, the resolved
configuration as ``job_config.yaml`` and, for a strategy named by import path,
the top-level module or package that holds it (so the job's driver, aggregator
and workers import it from the working directory). The job's first step,
``python -m fedsim.envcheck``, checks that the cluster's ``python`` has the
pinned packages (one line naming the first missing one and the remedies,
instead of an import traceback). Paths in the configuration (``out_dir``, ``cache_dir``, a
data or profiles file) are made absolute, because the job runs in its own
copy of the working directory: they must name a filesystem every node sees
(a shared mount). Inside the job, ``workers.ray_address: auto`` attaches the
driver to the cluster instead of starting an embedded Ray.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml
from ray.job_submission import JobStatus, JobSubmissionClient

from aggregation.errors import ConfigError
from aggregation.registry import is_import_path
from fedsim import environment
from fedsim.config import RunConfig, load_config
from fedsim.data.local import looks_like_path

PROJECT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedsim", "actors", "aggregation")
FINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


def client(address: str) -> JobSubmissionClient:
    """A client of the cluster's dashboard at ``address`` (http://HEAD:8265); a one-line error if unreachable."""
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, ValueError from the SDK: one line naming the address
        if type(exc).__name__ == "AuthenticationError":
            raise ConfigError(
                f"--address: the cluster at {address} requires token authentication: set RAY_AUTH_MODE=token, and "
                "RAY_AUTH_TOKEN or ~/.ray/auth_token, where you run fedsim"
            ) from None
        raise ConfigError(f"--address: cannot reach the Ray dashboard at {address} ({type(exc).__name__})") from None


def job_config(config: str | None, overrides: Sequence[str], out_dir: str | None) -> RunConfig:
    """The run's configuration as the job will see it: validated, attached to the cluster, paths absolute."""
    cfg = load_config(config, [*overrides, "workers.ray_address=auto", "progress=false"])
    absolute = {"out_dir": str(Path(out_dir or cfg.out_dir).resolve()), "cache_dir": str(Path(cfg.cache_dir).resolve())}
    data, system, model = cfg.data, cfg.system, cfg.model
    # the job runs in a staged working_dir: every local file the run reads is named by its absolute path
    if data.source not in ("gensim_topics", "synthetic") and looks_like_path(data.source):
        data = data.model_copy(update={"source": _absolute(data.source)})
    if system.profiles not in ("uniform", "random"):
        system = system.model_copy(update={"profiles": _absolute(system.profiles)})
    if system.availability_trace:
        system = system.model_copy(update={"availability_trace": _absolute(system.availability_trace)})
    if model.pretrained and Path(model.pretrained).expanduser().exists():  # a local directory, not a hub id
        model = model.model_copy(update={"pretrained": _absolute(model.pretrained)})
    return cfg.model_copy(update={**absolute, "data": data, "system": system, "model": model})


def _absolute(path: str) -> str:
    """``path`` resolved against this machine's working directory (where the user submits from)."""
    return str(Path(path).expanduser().resolve())


def stage(cfg: RunConfig) -> Path:
    """A temporary working_dir with the packages and ``job_config.yaml`` (the caller removes it)."""
    staging = Path(tempfile.mkdtemp(prefix="fedsim-job-"))
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for package in PACKAGES:
        shutil.copytree(PROJECT / package, staging / package, ignore=ignore)
    for name in ("pyproject.toml", "requirements.txt"):  # requirements.txt: what fedsim.envcheck checks in the job
        shutil.copy2(PROJECT / name, staging / name)
    user = _user_strategy_source(cfg)
    if user is not None and user.is_dir():
        shutil.copytree(user, staging / user.name, ignore=ignore)
    elif user is not None:
        shutil.copy2(user, staging / user.name)
    (staging / "job_config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return staging


def _user_strategy_source(cfg: RunConfig) -> Path | None:
    """The file or package directory of a user strategy's top-level module; None for a built-in.

    The config was validated, so the module imports here.
    """
    if not is_import_path(cfg.strategy.name):
        return None
    top = cfg.strategy.name.partition(":")[0].split(".")[0]
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin is None:
        raise ConfigError(f"strategy.name: cannot find the source of module {top!r} to ship with the job")
    origin = Path(spec.origin)
    return origin.parent if spec.submodule_search_locations else origin


def submit(address: str, cfg: RunConfig, *, pip: bool = False, run_dir_name: str | None = None) -> tuple[str, Path]:
    """Submit the run; returns the job id and the run directory it will write (under ``cfg.out_dir``)."""
    jobs = client(address)
    run_dir = Path(cfg.out_dir) / (run_dir_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.name}")
    staging = stage(cfg)
    try:
        runtime_env: dict[str, object] = {"working_dir": str(staging),
                                          "env_vars": environment.ENV}
        if pip:  # the pinned set, installed by Ray on the cluster's nodes
            runtime_env["pip"] = [line for line in (PROJECT / "requirements.txt").read_text().splitlines()
                                  if line.strip() and not line.startswith("#")]
        job_id = jobs.submit_job(
            entrypoint=f"python -m fedsim.envcheck && python -m fedsim run --config job_config.yaml --out {run_dir}",
            runtime_env=runtime_env,
            metadata={"fedsim_run_dir": str(run_dir), "fedsim_name": cfg.name},
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # Ray has uploaded it
    return job_id, run_dir


def follow(address: str, job_id: str, *, write: Callable[[str], object] = print, poll_s: float = 1.0) -> JobStatus:
    """Print the job's new log lines until it ends; returns its final status."""
    jobs = client(address)
    shown = 0
    while True:
        status = jobs.get_job_status(job_id)
        logs = jobs.get_job_logs(job_id)
        if len(logs) > shown:
            write(logs[shown:].rstrip("\n"))
            shown = len(logs)
        if status in FINAL:
            return status
        time.sleep(poll_s)


def outcome(address: str, job_id: str) -> str:
    """The job's last line: its status and, unless it succeeded, why: its own last ``fedsim: error:``, else Ray's."""
    jobs = client(address)
    info = jobs.get_job_info(job_id)
    line = f"job {job_id}: {info.status.value}"
    if info.status == JobStatus.SUCCEEDED:
        return line
    errors = [text for text in jobs.get_job_logs(job_id).splitlines() if text.startswith("fedsim: error: ")]
    reason = errors[-1].removeprefix("fedsim: error: ") if errors else (info.message or "").strip().split("\n", 1)[0]
    return f"{line}: {reason}" if reason else line


def status(address: str, job_id: str) -> str:
    """One line on the job: its status, the run directory it writes and Ray's message, if any."""
    info = client(address).get_job_info(job_id)
    run_dir = (info.metadata or {}).get("fedsim_run_dir", "?")
    return f"{job_id}: {info.status.value} (run directory {run_dir}){': ' + info.message if info.message else ''}"


def logs(address: str, job_id: str) -> str:
    """The job's whole log so far: its entrypoint's output."""
    return client(address).get_job_logs(job_id)


def stop(address: str, job_id: str) -> bool:
    """Ask the cluster to stop the job; True if it was running and a stop was requested."""
    return client(address).stop_job(job_id)
