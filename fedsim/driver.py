"""A run's lifecycle: checks, run directory, Ray, workers, then the rounds (``fedsim.round_loop``), then clean-up.

The driver runs where ``ray.init`` ran. ``run`` starts a run and ``resume``
continues one from its checkpoint; both check what can be checked cheaply
(config, files, resources, GPU packing) before anything slow starts, write the
run directory's records (config, manifest, status, log), start the worker pool
and the callbacks, and leave no actor and no Ray of their own behind, whether
the run completes or fails.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import torch
import yaml

from actors import (
    WorkerPool,
    embedded_system_config,
    gpu_total_bytes,
    reserved_cpus,
    resolve_num_workers,
)
from aggregation.errors import ConfigError, FedsimError
from fedsim import environment
from fedsim.callbacks.base import Callback
from fedsim.callbacks.checkpoint import CheckpointWriter
from fedsim.callbacks.metrics_table import MetricsTable
from fedsim.callbacks.progress import Progress
from fedsim.callbacks.tensorboard import TensorBoardScalars, require_tensorboard
from fedsim.checkpoint import Checkpoint, load_checkpoint
from fedsim.config import RunConfig, load_config
from fedsim.console import debug_enabled
from fedsim.engine.torch_engine import TorchEngineSpec
from fedsim.memory import GIB, check_gpu_packing, estimate_worker_memory, measure_worker_memory, payload_nbytes
from fedsim.prepare import PreparedRun, prepare
from fedsim.quiet import quiet_libraries
from fedsim.round_loop import FILE_ONLY, run_rounds
from fedsim.sim.availability import over_selected
from fedsim.sim.clock import DeviceProfile
from fedsim.sim.profiles import build_availability, build_profiles

log = logging.getLogger("fedsim")


@dataclass(frozen=True)
class RunResult:
    """A finished run: its directory and its ``rounds``, ``clients`` and ``comm`` tables (pandas DataFrames)."""

    run_dir: Path
    rounds: Any  # pandas.DataFrame
    clients: Any
    comm: Any


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _versions() -> dict[str, str]:
    names = ["torch", "transformers", "peft", "ray", "datasets", "flwr-datasets", "pandas", "numpy", "deepspeed"]
    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = "absent"
    return out


def planned_run_dir(cfg: RunConfig, out: str | Path | None) -> Path:
    """The run directory a new run will write: ``out``, or ``<out_dir>/<time>-<name>/``; checked, not created.

    Refused (ConfigError naming ``--out``): a file; a directory that already holds a run (of this config:
    ``fedsim resume`` continues it); a directory holding anything else. An empty directory is used as is.
    """
    if out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(cfg.out_dir) / f"{stamp}-{cfg.name}"
    else:
        run_dir = Path(out)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out: {run_dir} is a file, not a directory")
    if (run_dir / "status.json").exists():
        same = False
        if (run_dir / "manifest.json").is_file():
            try:
                same = json.loads((run_dir / "manifest.json").read_text()).get("config_digest") == cfg.digest()
            except (ValueError, OSError):
                pass
        hint = f"`fedsim resume {run_dir}` continues it, or choose" if same else "it is of another config; choose"
        raise ConfigError(f"--out: {run_dir} already holds a run ({hint} a new directory; nothing was written)")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise ConfigError(f"--out: {run_dir} is not empty and holds no run; choose a new or empty directory "
                          "(nothing was written)")
    return run_dir


def _write_status(run_dir: Path, status: str, **extra: Any) -> None:
    tmp = run_dir / ".status.json.tmp"
    tmp.write_text(json.dumps({"status": status, "time": datetime.now().isoformat(timespec="seconds"), **extra}))
    tmp.replace(run_dir / "status.json")


def _attach_log(run_dir: Path) -> logging.Handler:
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.setLevel(logging.DEBUG)
    log.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.DEBUG:
        log.setLevel(logging.DEBUG)
    return handler


def updates_in_flight(cfg: RunConfig) -> int:
    """The most updates one round (or, asynchronously, the clients in flight) can hold at once."""
    if cfg.system.policy == "over_select":
        return over_selected(cfg.clients_per_round, cfg.system.over_selection, cfg.data.num_clients)
    return cfg.clients_per_round


def ray_system_config(cfg: RunConfig, prepared: PreparedRun) -> dict[str, Any]:
    """The embedded Ray's system config for this run.

    Its inlining limit follows the size of a round's updates (``actors.embedded_system_config``).
    """
    return embedded_system_config(payload_nbytes(cfg, prepared.base_path), updates_in_flight(cfg))


def attach_cluster(cfg: RunConfig) -> None:
    """Connect to ``workers.ray_address`` (when set and not connected yet), so its resources can be checked."""
    environment.apply()
    if cfg.workers.ray_address and not ray.is_initialized():
        ray.init(address=cfg.workers.ray_address, logging_level=logging.WARNING)


def start_ray(cfg: RunConfig, prepared: PreparedRun) -> bool:
    """Attach to ``workers.ray_address`` or start an embedded local Ray; True if started here."""
    environment.apply()
    if ray.is_initialized():
        return False
    if cfg.workers.ray_address:
        ray.init(address=cfg.workers.ray_address, logging_level=logging.WARNING)
        return False
    system_config = ray_system_config(cfg, prepared)
    log.debug(
        "embedded Ray: %s", f"inlining limit {system_config}" if system_config else "Ray's default inlining limit"
    )
    ray.init(
        address="local",  # a new Ray of its own, even where `ray start` or RAY_ADDRESS names a cluster on this machine
        num_cpus=cfg.workers.ray_num_cpus or os.cpu_count(),
        include_dashboard=False,
        logging_level=logging.WARNING,
        # the workers' own output stays in Ray's session logs (/tmp/ray/session_latest/logs) unless debugging
        log_to_driver=debug_enabled(),
        runtime_env={"env_vars": environment.ENV},
        _system_config=system_config,
    )
    return True


def run(cfg: RunConfig, *, out: str | Path | None = None, callbacks: list[Callback] | None = None) -> RunResult:
    """Run a whole federated job; returns the run directory and its tables."""
    environment.apply()
    quiet_libraries()
    # What can be checked cheaply is checked before prepare(), which may pretrain a base for minutes:
    if cfg.logging.tensorboard:
        require_tensorboard()  # a missing extra
    profiles = build_profiles(cfg.system, cfg.data.num_clients, cfg.seed)  # a bad profiles file
    build_availability(cfg.system, cfg.data.num_clients)  # a bad availability trace
    run_dir = planned_run_dir(cfg, out)  # an --out that must not be written into
    attach_cluster(cfg)
    num_workers = _num_workers(cfg)  # resources that cannot hold the workers
    prepared = prepare(cfg)  # bad data, a partition that cannot be made (before the base is built), bad model settings
    started_ray = start_ray(cfg, prepared)
    try:
        _check_gpu_memory(cfg, prepared)  # a packing of workers onto GPUs that would run out of memory
        run_dir.mkdir(parents=True, exist_ok=True)
    except BaseException:
        if started_ray:
            ray.shutdown()
        raise
    handler = _attach_log(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    manifest = {
        "name": cfg.name,
        "seed": cfg.seed,
        "git_commit": _git_commit(),
        "partition_hash": prepared.partition_hash,
        "config_digest": cfg.digest(),
        "base_path": prepared.base_path,
        "n_train": prepared.n_train,
        "n_test": prepared.n_test,
        "label_names": list(prepared.label_names),
        "client_sizes": [int(len(p)) for p in prepared.partitions],
        "versions": _versions(),
        "started": datetime.now().isoformat(timespec="seconds"),
    }
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return _execute(
        cfg, prepared, profiles, run_dir, num_workers, started_ray, handler, MetricsTable(), callbacks, None
    )


def _read_json(path: Path) -> dict[str, Any]:
    """A run directory's JSON record; a one-line FedsimError naming the file when it is missing or corrupt."""
    if not path.is_file():
        raise FedsimError(f"{path}: missing; the run directory is incomplete and cannot be resumed")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise FedsimError(
            f"{path}: unreadable ({type(exc).__name__}); the run directory cannot be resumed"
        ) from None
    if not isinstance(record, dict):
        raise FedsimError(f"{path}: not a JSON object; the run directory cannot be resumed")
    return record


def resume(run_dir: str | Path, *, callbacks: list[Callback] | None = None) -> RunResult:
    """Continue a run from its last checkpoint; the tables come out as an uninterrupted run's would."""
    environment.apply()
    quiet_libraries()
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FedsimError(f"{run_dir}: not a directory")
    if not (run_dir / "config.yaml").exists():
        raise FedsimError(f"{run_dir}: not a run directory (no config.yaml)")
    if (run_dir / "status.json").exists() and _read_json(run_dir / "status.json").get("status") == "completed":
        raise FedsimError(f"{run_dir}: the run is already completed; nothing to resume")
    try:
        cfg = load_config(run_dir / "config.yaml", [], migrate=True)  # written by this or an earlier release
    except ConfigError as exc:
        raise FedsimError(f"{run_dir / 'config.yaml'}: {exc}") from None
    if cfg.system.policy == "async":
        raise FedsimError(f"{run_dir}: an asynchronous run (system.policy: async) cannot be resumed")
    manifest = _read_json(run_dir / "manifest.json")
    checkpoint = load_checkpoint(run_dir)
    # the cheap checks before prepare(), as for a new run
    profiles = build_profiles(cfg.system, cfg.data.num_clients, cfg.seed)
    build_availability(cfg.system, cfg.data.num_clients)
    attach_cluster(cfg)
    num_workers = _num_workers(cfg)
    prepared = prepare(cfg)
    if manifest.get("partition_hash") != prepared.partition_hash:
        raise FedsimError(f"{run_dir}: the data partition changed since the run started; cannot resume exactly")
    started_ray = start_ray(cfg, prepared)
    handler = _attach_log(run_dir)
    log.info("resuming %s after round %d", run_dir, checkpoint.round_idx)
    manifest.setdefault("resumed", []).append(
        {
            "time": datetime.now().isoformat(timespec="seconds"),
            "after_round": checkpoint.round_idx,
            "git_commit": _git_commit(),
        }
    )
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    table = MetricsTable.read(run_dir, up_to_round=checkpoint.round_idx)
    return _execute(cfg, prepared, profiles, run_dir, num_workers, started_ray, handler, table, callbacks, checkpoint)


def _check_gpu_memory(cfg: RunConfig, prepared: PreparedRun) -> None:
    """Refuse, before any actor starts, workers per GPU whose estimated memory exceeds the GPU's."""
    if cfg.workers.gpus_per_worker <= 0:
        return
    gpu = (
        cfg.workers.gpu_memory_gib * GIB if cfg.workers.gpu_memory_gib else gpu_total_bytes(cfg.workers.gpus_per_worker)
    )
    if gpu is None:
        return  # no GPU in the cluster: the resource check names that
    need = estimate_worker_memory(cfg, prepared.base_path, num_options=max(1, prepared.num_options))
    if cfg.engine.backend == "torch" and torch.cuda.is_available():  # calibrate on the driver's GPU
        need = measure_worker_memory(cfg, prepared)
    log.info("GPU memory per worker: %s; GPU %.1f GiB", need.describe(), gpu / GIB)
    check_gpu_packing(cfg, need, gpu)


def _num_workers(cfg: RunConfig) -> int:
    """The workers (or groups) the run gets: on the running cluster, or on the one node an embedded Ray will have."""
    w = cfg.workers
    group_size = cfg.engine.group_size if cfg.engine.backend == "deepspeed" else None
    planned = None if ray.is_initialized() else [
        {"CPU": float(w.ray_num_cpus or os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
    ]
    return resolve_num_workers(
        w.num_workers, cpus_per_worker=w.cpus_per_worker, gpus_per_worker=w.gpus_per_worker, group_size=group_size,
        reserve_cpus=reserved_cpus(w.aggregator_cpus), nodes=planned,
    )


def _execute(
    cfg: RunConfig,
    prepared: PreparedRun,
    profiles: dict[int, DeviceProfile],
    run_dir: Path,
    num_workers: int,
    started_ray: bool,
    handler: logging.Handler,
    table: MetricsTable,
    callbacks: list[Callback] | None,
    checkpoint: Checkpoint | None,
) -> RunResult:
    """The rounds of a run (from its checkpoint when given), with status, callbacks and clean-up."""
    _write_status(run_dir, "running")
    # the user's callbacks first: a metric one returns is in the row the built-in ones show and the table writes
    cbs: list[Callback] = [*(callbacks or []), Progress(enabled=cfg.progress)]
    if cfg.logging.tensorboard:
        cbs.append(TensorBoardScalars())
    cbs.append(table)
    if cfg.checkpoint.every and cfg.system.policy != "async":
        cbs.append(CheckpointWriter(every=cfg.checkpoint.every, rounds=cfg.rounds))  # after the tables are written
    elif cfg.checkpoint.every:
        log.info("async runs write no checkpoint: the clients in flight are not part of one (resume is not supported)")
    pool: WorkerPool | None = None
    owned: list[Any] = []  # the actors a loop starts besides the pool (the aggregator)
    status = "failed"
    try:
        for cb in cbs:
            cb.on_run_begin(run_dir=run_dir, total_rounds=cfg.rounds)
        pool = make_pool(cfg, prepared, num_workers)
        placement = pd.DataFrame(pool.placement())
        placement.to_csv(run_dir / "placement.csv", index=False)
        log.info("%d workers on %d node(s)", len(placement), placement["node_id"].nunique())
        run_rounds(cfg, prepared, profiles, pool, owned, cbs, run_dir, checkpoint)
        status = "completed"
        memory = pd.DataFrame(pool.memory())  # a restarted worker's row carries its new process
        placement.assign(pid=memory["pid"], peak_rss_mib=memory["peak_rss_mib"]).to_csv(
            run_dir / "placement.csv", index=False
        )
    except Exception as exc:
        log.error("run failed: %s", exc, extra=FILE_ONLY)
        _write_status(run_dir, "failed", error=str(exc))
        raise
    finally:
        for cb in cbs:
            cb.on_run_end(status=status)
        for actor in owned:  # a run, even a failed one, leaves no actor in a Ray that outlives it
            ray.kill(actor)
        if pool is not None:
            pool.shutdown()
        if started_ray:
            ray.shutdown()
        log.removeHandler(handler)
        handler.close()
    _write_status(run_dir, "completed", rounds=cfg.rounds)
    return RunResult(run_dir, table.rounds_frame(), table.clients_frame(), table.comm_frame())


def engine_spec(cfg: RunConfig, prepared: PreparedRun) -> TorchEngineSpec:
    """The recipe each worker builds its engine from: the torch engine's, or the deepspeed engine's."""
    w, engine = cfg.workers, cfg.engine
    common: dict[str, Any] = dict(
        base_path=prepared.base_path,
        train_path=prepared.train_path,
        test_path=prepared.test_path,
        label_token_ids=prepared.label_token_ids,
        task=prepared.task,
        option_score=cfg.data.scoring,
        lora=cfg.lora,
        train=cfg.train,
        threads=max(1, int(w.cpus_per_worker)),
        lora_seed=cfg.seed,
        device="cuda" if w.gpus_per_worker > 0 else "cpu",
        faults=cfg.faults,
        compression=cfg.compression,
        precision=engine.precision if engine.precision != "auto" else ("bf16" if w.gpus_per_worker > 0 else "fp32"),
        quantization=cfg.model.quantization,
    )
    if engine.backend == "torch":
        return TorchEngineSpec(**common)
    from fedsim.engine.deepspeed_engine import DeepSpeedEngineSpec  # deepspeed is imported only when used

    return DeepSpeedEngineSpec(**common, zero_stage=engine.zero_stage, profile_alltoall=engine.profile_alltoall)


def make_pool(cfg: RunConfig, prepared: PreparedRun, n: int) -> WorkerPool:
    """The run's worker pool: n torch workers, or n deepspeed groups of engine.group_size workers."""
    w, engine = cfg.workers, cfg.engine
    spec = engine_spec(cfg, prepared)
    if engine.backend == "torch":
        log.info(
            "starting %d workers (%g CPU, %g GPU each, %s)", n, w.cpus_per_worker, w.gpus_per_worker, spec.precision
        )
        return WorkerPool(spec, num_workers=n, cpus_per_worker=w.cpus_per_worker, gpus_per_worker=w.gpus_per_worker,
                          spread=w.placement == "spread", max_restarts=w.max_restarts,
                          max_task_retries=w.max_task_retries)
    log.info("starting %d deepspeed groups of %d workers (%g CPU, %g GPU each; ZeRO %d, %s)", n, engine.group_size,
             w.cpus_per_worker, w.gpus_per_worker, engine.zero_stage, spec.precision)
    return WorkerPool(spec, num_workers=n, cpus_per_worker=w.cpus_per_worker, gpus_per_worker=w.gpus_per_worker,
                      group_size=engine.group_size)
