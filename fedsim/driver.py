"""The round loop: sample, configure, dispatch, aggregate, evaluate, record.

The driver runs where ``ray.init`` ran. It owns the sampler's RNG and the
tables; the payload itself never passes through it: the aggregator returns
the new global payload as an object ref that goes straight to the next
round's workers, put in the object store once per round.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import resource
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from itertools import groupby
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import ray
import torch
import yaml

from actors import (
    Aggregator,
    WorkerPool,
    count_finished,
    embedded_system_config,
    gpu_total_bytes,
    resolve_num_workers,
)
from actors.aggregator import instruction_refs
from aggregation.errors import ConfigError, FedsimError, RunFailed
from aggregation.messages import ClientUpdate
from aggregation.payload import PayloadLayout
from aggregation.round_fold import RoundSummary
from aggregation.routing_stats import total_variation
from aggregation.sim_clock import SimulatedClock
from fedsim import environment
from fedsim.callbacks.base import Callback, RoundRecord
from fedsim.callbacks.metrics_table import MetricsTable
from fedsim.callbacks.progress import Progress
from fedsim.callbacks.tensorboard import TensorBoardScalars, require_tensorboard
from fedsim.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedsim.config import RunConfig, load_config
from fedsim.console import debug_enabled, round_line
from fedsim.engine.torch_engine import TorchEngineSpec
from fedsim.memory import GIB, check_gpu_packing, estimate_worker_memory, measure_worker_memory, payload_nbytes
from fedsim.prepare import PreparedRun, prepare
from fedsim.quiet import quiet_libraries
from fedsim.seeds import client_seed
from fedsim.sim.availability import available, online_at_round, over_selected
from fedsim.sim.buffering import Flight, discounts, next_buffer
from fedsim.sim.clock import DeviceProfile, RoundClock
from fedsim.sim.profiles import build_availability, build_profiles, store_system
from fedsim.strategies import StrategyFactory

log = logging.getLogger("fedsim")

FILE_ONLY = {"file_only": True}  # log records the console leaves to the CLI's own error line


class ClientSampler:
    """Uniform sampling without replacement from the run's own seeded Generator."""

    def __init__(self, num_clients: int, per_round: int, seed: int) -> None:
        self.num_clients, self.per_round = num_clients, per_round
        self.rng = np.random.default_rng(np.random.SeedSequence([seed, 0x5A3]))

    def sample(self, available: list[int] | None = None, count: int | None = None) -> list[int]:
        """``count`` (default: per round) clients among ``available`` (default: all), fewer if fewer are online."""
        pool = list(range(self.num_clients)) if available is None else available
        k = min(self.per_round if count is None else count, len(pool))
        return sorted(int(pool[i]) for i in self.rng.choice(len(pool), k, replace=False)) if k else []


@dataclass(frozen=True)
class RunResult:
    """A finished run: its directory and its ``rounds``, ``clients`` and ``comm`` tables (pandas DataFrames)."""

    run_dir: Path
    rounds: Any  # pandas.DataFrame
    clients: Any
    comm: Any


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def _mean_pairwise_tv(p_bar: dict[int, list[np.ndarray]]) -> float:
    """Mean over layers and client pairs of the total variation between routing distributions."""
    ids = sorted(p_bar)
    vals = [
        total_variation(p_bar[a][layer], p_bar[b][layer])
        for i, a in enumerate(ids)
        for b in ids[i + 1 :]
        for layer in range(len(p_bar[a]))
    ]
    return float(np.mean(vals)) if vals else float("nan")


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
        cfg = load_config(run_dir / "config.yaml", [])
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
        nodes=planned,
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
        if cfg.system.policy == "async":
            _loop_async(cfg, prepared, profiles, pool, owned, cbs, run_dir)
        else:
            _loop(cfg, prepared, profiles, pool, owned, cbs, run_dir, checkpoint)
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


def _start_aggregator(cfg: RunConfig, layout: PayloadLayout, clock: SimulatedClock) -> Any:
    """The aggregator actor of a run, holding its strategy and the simulated clock it times every round on.

    The handle is untyped: mypy does not apply the ``@ray.remote`` class decorator.
    """
    return cast(Any, Aggregator).remote(StrategyFactory(cfg.strategy), layout, cfg.strategy.max_update_norm,
                                        measure_memory=cfg.logging.aggregator_memory, clock=clock)


def _loop(
    cfg: RunConfig, prepared: PreparedRun, profiles: dict[int, DeviceProfile], pool: WorkerPool, owned: list[Any],
    cbs: list[Callback], run_dir: Path, checkpoint: Checkpoint | None,
) -> None:
    layout, initial = pool.describe()
    system = cfg.system
    assert system.policy != "async", "_execute runs an asynchronous run with _loop_async"
    clock = RoundClock(
        profiles, system.policy, deadline_s=system.deadline_s or math.inf, keep=cfg.clients_per_round,
        seconds_per_example=system.seconds_per_example, epochs=cfg.train.local_epochs,
    )
    aggregator = _start_aggregator(cfg, layout, clock)
    owned.append(aggregator)  # the run kills it when it ends
    sampler = ClientSampler(cfg.data.num_clients, cfg.clients_per_round, cfg.seed)
    store_system(system, profiles, run_dir)
    trace = build_availability(system, cfg.data.num_clients)
    sim_time = 0.0
    first = 1
    if checkpoint is not None:
        if checkpoint.payload.shape != initial.shape:
            raise FedsimError(f"checkpoint payload has {checkpoint.payload.shape}, the model's layout {initial.shape}")
        ray.get(aggregator.load_state_dict.remote(checkpoint.strategy_state))
        sampler.rng.bit_generator.state = checkpoint.sampler_state
        initial, first, sim_time = checkpoint.payload, checkpoint.round_idx + 1, checkpoint.sim_time_s
    payload_ref = ray.put(initial)
    del initial
    chunk = cfg.eval.batch_size
    eval_chunks = [(lo, min(lo + chunk, prepared.n_test)) for lo in range(0, prepared.n_test, chunk)]
    log.info("payload: %d values (%.2f MiB) in %d entries", layout.total, layout.nbytes / 2**20, len(layout))
    for r in range(first, cfg.rounds + 1):
        t0 = time.perf_counter()
        online, sim_time = online_at_round(cfg, trace, r, sim_time)
        count = over_selected(cfg.clients_per_round, system.over_selection, len(online)) \
            if system.policy == "over_select" else cfg.clients_per_round
        cohort = sampler.sample(online, count)
        log.debug("round %d cohort %s (%d of %d clients online)", r, cohort, len(online), cfg.data.num_clients)
        instructions = instruction_refs(aggregator, r, cohort, [client_seed(cfg.seed, r, c) for c in cohort])
        rows = [prepared.partitions[c] for c in cohort]
        refs = pool.submit(payload_ref, instructions, rows, [cfg.train.client_work(len(ix)) for ix in rows])
        new_ref, summary_ref = aggregator.aggregate.remote(r, payload_ref, refs)
        done = 0
        while done < len(refs):
            done = count_finished(refs, timeout_s=0.25)
            for cb in cbs:
                cb.on_client_progress(round_idx=r, done=done, total=len(refs))
        summary: RoundSummary = ray.get(summary_ref)
        del refs
        _handle_failures(cfg, r, summary)
        payload_ref = new_ref
        t_train = time.perf_counter() - t0
        row = _round_row(r, cohort, summary, t_train, len(pool))
        sim_time += summary.sim_round_s
        row.update(sim_round_s=summary.sim_round_s, sim_time_s=sim_time, stragglers=len(summary.stragglers))
        if summary.stragglers:
            log.info("round %d: stragglers left out on the simulated clock: %s", r, summary.stragglers)
        stop = _close_round(cfg, r, row, summary, pool, payload_ref, eval_chunks, cbs, t0)
        every = cfg.checkpoint.every
        if every and (r % every == 0 or r == cfg.rounds or stop):
            state = Checkpoint(r, ray.get(payload_ref), ray.get(aggregator.state_dict.remote()),
                               sampler.rng.bit_generator.state, sim_time)
            save_checkpoint(run_dir, state)
        if stop:
            break


def _close_round(
    cfg: RunConfig, r: int, row: dict[str, Any], summary: RoundSummary, pool: WorkerPool,
    payload_ref: ray.ObjectRef[np.ndarray], eval_chunks: list[tuple[int, int]], cbs: list[Callback], t0: float,
) -> bool:
    """Evaluate when due, finish the round's row and hand it to the callbacks; True if one asks to stop."""
    if r % cfg.eval.every == 0 or r == cfg.rounds:
        t1 = time.perf_counter()
        chunks = pool.evaluate(payload_ref, eval_chunks)
        n = sum(c.count for c in chunks)
        row["test_loss"] = sum(c.loss_sum for c in chunks) / n
        row["test_accuracy"] = sum(c.correct for c in chunks) / n
        row["eval_wall_s"] = time.perf_counter() - t1
    row["wall_s"] = time.perf_counter() - t0
    row["driver_peak_rss_mib"] = _peak_rss_mib()
    # a worker answers after its current client: read only when none is in flight (not between async steps)
    idle = cfg.system.policy != "async"
    row["worker_peak_rss_mib"] = max(m["peak_rss_mib"] for m in pool.memory()) if idle else float("nan")
    at = {"sim_time_s": row.get("sim_time_s", float("nan"))}  # simulated time is a column of every table
    record = RoundRecord(r, row, [{**c, **at} for c in summary.clients], [{**c, **at} for c in summary.comm],
                         [{**c, **at} for c in _routing_rows(summary.routing_p_bar)])
    stop = False
    for cb in cbs:
        s, extra = cb.after_round(record)
        row.update(extra)
        stop = stop or s
    for cb in cbs:
        cb.on_round_closed(record, stopping=stop)
    log.info("%s", round_line(r, cfg.rounds, row, step=cfg.system.policy == "async"))
    return stop


def _loop_async(
    cfg: RunConfig, prepared: PreparedRun, profiles: dict[int, DeviceProfile], pool: WorkerPool, owned: list[Any],
    cbs: list[Callback], run_dir: Path,
) -> None:
    """FedBuff-style asynchronous rounds (fedsim/sim/buffering.py).

    ``clients_per_round`` clients train at once, each from the version current when it started on the
    simulated clock; every ``system.async_buffer`` arrivals make one server step (a row of the rounds table),
    their weights discounted by staleness.

    Arrival order is decided on the simulated clock, so the next step waits until every client in flight has
    finished for real; a client that arrives is replaced at its arrival time, from the version then current:
    arrivals before the step's last start from the version being merged, while it is merged. With
    K = clients in flight and simultaneous arrivals this is synchronous FedAvg, round for round.
    """
    layout, initial = pool.describe()
    system = cfg.system
    clock = RoundClock(
        profiles, "wait_all", seconds_per_example=system.seconds_per_example, epochs=cfg.train.local_epochs
    )
    aggregator = _start_aggregator(cfg, layout, clock)
    owned.append(aggregator)  # the run kills it when it ends
    sampler = ClientSampler(cfg.data.num_clients, cfg.clients_per_round, cfg.seed)
    store_system(system, profiles, run_dir)
    buffer_size = system.async_buffer or max(1, cfg.clients_per_round // 2)
    trace = build_availability(system, cfg.data.num_clients)
    versions = {0: ray.put(initial)}
    del initial
    eval_chunks = [
        (lo, min(lo + cfg.eval.batch_size, prepared.n_test)) for lo in range(0, prepared.n_test, cfg.eval.batch_size)
    ]
    flights: list[Flight[ray.ObjectRef[ClientUpdate]]] = []

    def launch(count: int, start_s: float, version: int) -> None:
        busy = {f.client for f in flights}
        online = trace.online(start_s) if trace is not None else \
            available(cfg.data.num_clients, round_idx=version + 1, seed=cfg.seed, probability=system.availability)
        if trace is not None and not [c for c in online if c not in busy]:  # wait for somebody to come online
            start_s = trace.next_online(start_s)
            online = trace.online(start_s) if math.isfinite(start_s) else []
        clients = sampler.sample([c for c in online if c not in busy], count)
        if not clients:
            return
        seeds = [client_seed(cfg.seed, version + 1, c) for c in clients]
        instructions = instruction_refs(aggregator, version + 1, clients, seeds)
        rows = [prepared.partitions[c] for c in clients]
        refs = pool.submit(versions[version], instructions, rows, [cfg.train.client_work(len(ix)) for ix in rows])
        flights.extend(Flight(c, start_s, version, ref) for c, ref in zip(clients, refs, strict=True))

    launch(cfg.clients_per_round, 0.0, 0)
    previous_step_s = 0.0
    log.info("async: %d clients in flight, a server step every %d arrivals, staleness discount (1 + τ)^-%g",
             cfg.clients_per_round, buffer_size, system.staleness_exponent)
    for r in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        if not flights:
            raise RunFailed(f"step {r}: no client is training and none can start (nobody online)")
        durations = ray.get(aggregator.durations.remote([f.handle for f in flights]))
        arrivals = next_buffer(flights, durations, buffer_size)
        merged = [f for f, _ in arrivals]
        flights = [f for f in flights if f not in merged]
        new_ref, summary_ref = aggregator.aggregate.remote(
            r, versions[r - 1], [f.handle for f in merged],
            discounts([r - 1 - f.version for f in merged], system.staleness_exponent),
        )
        versions[r] = new_ref
        step_s = arrivals[-1][1]
        # replacements, from the version current at their arrival: those that arrived before the step get the
        # version being merged, those arriving with it the new one; simultaneous arrivals are sampled together
        for (at, _), group in groupby(arrivals, key=lambda a: (a[1], a[1] >= step_s)):
            launch(len(list(group)), at, r if at >= step_s else r - 1)
        summary: RoundSummary = ray.get(summary_ref)
        _handle_failures(cfg, r, summary)
        for v in [v for v in versions if v < r and all(f.version != v for f in flights)]:
            del versions[v]  # no client trains from it any more
        row = _round_row(r, [f.client for f in merged], summary, time.perf_counter() - t0, len(pool))
        staleness = [r - 1 - f.version for f in merged]
        row.update(sim_round_s=step_s - previous_step_s, sim_time_s=step_s, stragglers=0,
                   staleness_mean=float(np.mean(staleness)), staleness_max=int(max(staleness)))
        previous_step_s = step_s
        if _close_round(cfg, r, row, summary, pool, new_ref, eval_chunks, cbs, t0):
            break
    if cfg.checkpoint.every:
        log.info("async runs write no checkpoint: the clients in flight are not part of one (resume is not supported)")


def _handle_failures(cfg: RunConfig, r: int, summary: RoundSummary) -> None:
    """Log the round's failed and rejected clients; raise RunFailed when the run cannot go on.

    That is when the policy says stop, or when a round that had clients merged none of them: each failed, was
    rejected or came after the deadline. A run never carries on (or ends ``completed``) from a round that
    changed nothing because nothing usable arrived.
    """
    for reason in summary.rejected:
        log.warning("round %d: rejected the update of %s", r, reason)
    late = [c["client"] for c in summary.clients if c["straggler"]]
    total = len(summary.failures) + len(summary.clients)
    merged_none = total > 0 and all(c["rejected"] or c["straggler"] for c in summary.clients)
    stop = bool(summary.failures) and (cfg.workers.on_client_failure == "stop" or merged_none)
    for f in summary.failures:
        if stop:
            log.error("round %d: %s", r, f, extra=FILE_ONLY)
        else:
            log.warning("round %d: %s (dropped from the round)", r, f)
    if summary.failures and cfg.workers.on_client_failure == "stop" and summary.clients:
        raise RunFailed(f"round {r}: {len(summary.failures)} client(s) failed; first: {summary.failures[0]}")
    if not merged_none:
        return
    kinds = {"failed": summary.failures, "rejected": summary.rejected, "late": late}
    present = [k for k, v in kinds.items() if v]
    if present == ["failed"]:
        raise RunFailed(f"round {r}: every client failed; first: {summary.failures[0]}")
    if present == ["rejected"]:
        raise RunFailed(f"round {r}: every update was rejected ({len(summary.rejected)} of {total}); "
                        f"first: {summary.rejected[0]}")
    if present == ["late"]:
        raise RunFailed(f"round {r}: every update came after the deadline (system.deadline_s="
                        f"{cfg.system.deadline_s}) on the simulated clock ({len(late)} of {total}): clients {late}")
    counts = ", ".join(f"{len(kinds[k])} {k}" for k in present)
    firsts = "; ".join(f"first {k}: {kinds[k][0]}" for k in ("rejected", "failed") if kinds[k])
    raise RunFailed(f"round {r}: no update was merged ({counts}; {total} clients); {firsts}")


def _routing_rows(p_bar: dict[int, list[np.ndarray]]) -> list[dict[str, Any]]:
    """Per MoE layer and expert: the merged clients' mean p̄ (expert utilisation) and its spread across them."""
    if not p_bar:
        return []
    stacked = np.stack([np.stack(layers) for layers in p_bar.values()])  # [clients, L, E]
    mean, spread = stacked.mean(axis=0), stacked.std(axis=0)
    return [{"layer": layer, "expert": e, "p_bar_mean": float(mean[layer, e]), "p_bar_std": float(spread[layer, e])}
            for layer in range(mean.shape[0]) for e in range(mean.shape[1])]


def _round_row(r: int, cohort: list[int], s: RoundSummary, train_wall: float, workers: int) -> dict[str, Any]:
    clients = s.clients
    trusted = [c for c in clients if not c["rejected"]]  # a rejected update's n_examples and metrics may be NaN
    n = sum(c["n_examples"] for c in trusted)
    compute = sum(c["compute_s"] for c in clients)
    return {
        "round": r,
        "test_loss": float("nan"),
        "test_accuracy": float("nan"),
        "train_loss": s.metric("train_loss"),  # Σ loss over the rows trained / Σ rows trained, trusted clients
        "clients_sampled": len(cohort),
        "clients_completed": len(clients),
        "clients_failed": len(s.failures),
        "clients_rejected": len(s.rejected),
        "examples": n,
        "bytes_down": sum(c["bytes_down"] for c in clients),
        "bytes_up": sum(c["bytes_up"] for c in clients),
        "routing_tv": _mean_pairwise_tv(s.routing_p_bar),
        "compression_error": s.metric("compression_error"),
        "compute_s_sum": compute,
        "train_wall_s": train_wall,
        "overhead_ratio": train_wall / (compute / workers) if compute else float("nan"),
        "eval_wall_s": 0.0,
        "wall_s": 0.0,
        "aggregator_peak_rss_mib": s.aggregator_peak_rss_mib,
        "aggregator_uss_mib": s.aggregator_uss_mib,
        "driver_peak_rss_mib": 0.0,
        "worker_peak_rss_mib": 0.0,
        **s.report,  # the strategy's own columns (e.g. FedAlign-MoE's omega_entropy, excluded_pair_frac)
    }
