"""The rounds of a run: sample, configure, dispatch, aggregate, evaluate, record.

Two loops, one setup and one round-closing step: synchronous rounds
(``system.policy`` wait_all, deadline or over_select) and FedBuff-style
asynchronous steps. Both hand each finished round to ``Rounds.close``, which
checks its failures, builds its row, evaluates when due and runs the callbacks
(the tables and the checkpoint are callbacks too). The payload never passes
through the driver: the aggregator returns the new global payload as an
object ref that goes straight to the next round's workers, and each client's
instructions go from the aggregator to its worker by reference.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, cast

import numpy as np
import ray

from actors import Aggregator, WorkerPool
from actors.aggregator import aggregator_options, deliver_updates, instruction_refs
from aggregation.errors import FedsimError, RunFailed
from aggregation.messages import ClientUpdate
from aggregation.payload import PayloadLayout
from aggregation.round_fold import RoundSummary
from aggregation.routing_stats import total_variation
from aggregation.sim_clock import SimulatedClock
from fedsim import environment
from fedsim.callbacks.base import Callback, RoundRecord
from fedsim.checkpoint import Checkpoint
from fedsim.config import RunConfig
from fedsim.console import round_line
from fedsim.prepare import PreparedRun
from fedsim.seeds import client_seed
from fedsim.sim.availability import AvailabilityTrace, available, online_at_round, over_selected
from fedsim.sim.buffering import Flight, discounts, next_buffer
from fedsim.sim.clock import DeviceProfile, RoundClock
from fedsim.sim.profiles import build_availability, store_system
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


def run_rounds(
    cfg: RunConfig, prepared: PreparedRun, profiles: dict[int, DeviceProfile], pool: WorkerPool, owned: list[Any],
    cbs: list[Callback], run_dir: Path, checkpoint: Checkpoint | None,
) -> None:
    """The run's rounds on ``pool``, from ``checkpoint`` when given; the actors started here are added to ``owned``."""
    layout, initial = pool.describe()
    system = cfg.system
    if system.policy == "async":
        clock = RoundClock(
            profiles, "wait_all", seconds_per_example=system.seconds_per_example, epochs=cfg.train.local_epochs
        )
    else:
        clock = RoundClock(
            profiles, system.policy, deadline_s=system.deadline_s or math.inf, keep=cfg.clients_per_round,
            seconds_per_example=system.seconds_per_example, epochs=cfg.train.local_epochs,
        )
    aggregator = _start_aggregator(cfg, layout, clock)
    owned.append(aggregator)  # the run kills it when it ends
    store_system(system, profiles, run_dir)
    chunk = cfg.eval.batch_size
    rounds = Rounds(
        cfg, prepared, pool, cbs, aggregator, ClientSampler(cfg.data.num_clients, cfg.clients_per_round, cfg.seed),
        build_availability(system, cfg.data.num_clients),
        [(lo, min(lo + chunk, prepared.n_test)) for lo in range(0, prepared.n_test, chunk)],
    )
    if system.policy == "async":
        rounds.asynchronous(initial)
    else:
        log.info("payload: %d values (%.2f MiB) in %d entries", layout.total, layout.nbytes / 2**20, len(layout))
        rounds.synchronous(initial, checkpoint)


def _start_aggregator(cfg: RunConfig, layout: PayloadLayout, clock: SimulatedClock) -> Any:
    """The aggregator actor of a run, holding its strategy and the simulated clock it times every round on.

    The handle is untyped: mypy does not apply the ``@ray.remote`` class decorator.
    """
    cpus = cfg.workers.aggregator_cpus
    options = aggregator_options(cpus, {**environment.ENV, **environment.thread_env(cpus)})
    return cast(Any, Aggregator).options(**options).remote(
        StrategyFactory(cfg.strategy), layout, cfg.strategy.max_update_norm,
        measure_memory=cfg.logging.aggregator_memory, clock=clock,
    )


@dataclass
class Rounds:
    """What both loops share: the run's config and data, its workers, callbacks, aggregator, sampler and trace."""

    cfg: RunConfig
    prepared: PreparedRun
    pool: WorkerPool
    cbs: list[Callback]
    aggregator: Any  # the Aggregator actor's handle
    sampler: ClientSampler
    trace: AvailabilityTrace | None
    eval_chunks: list[tuple[int, int]]

    def synchronous(self, initial: np.ndarray, checkpoint: Checkpoint | None) -> None:
        """Rounds that each wait for their cohort (or its deadline, or its first ``clients_per_round``)."""
        cfg, system = self.cfg, self.cfg.system
        sim_time = 0.0
        first = 1
        if checkpoint is not None:
            if checkpoint.payload.shape != initial.shape:
                raise FedsimError(
                    f"checkpoint payload has {checkpoint.payload.shape}, the model's layout {initial.shape}"
                )
            ray.get(self.aggregator.load_state_dict.remote(checkpoint.strategy_state))
            self.sampler.rng.bit_generator.state = checkpoint.sampler_state
            initial, first, sim_time = checkpoint.payload, checkpoint.round_idx + 1, checkpoint.sim_time_s
        payload_ref = ray.put(initial)
        del initial
        for r in range(first, cfg.rounds + 1):
            t0 = time.perf_counter()
            online, sim_time = online_at_round(cfg, self.trace, r, sim_time)
            count = over_selected(cfg.clients_per_round, system.over_selection, len(online)) \
                if system.policy == "over_select" else cfg.clients_per_round
            cohort = self.sampler.sample(online, count)
            log.debug("round %d cohort %s (%d of %d clients online)", r, cohort, len(online), cfg.data.num_clients)
            refs = self._dispatch(r, cohort, payload_ref)
            new_ref, summary_ref = self.aggregator.aggregate.remote(r, payload_ref, len(refs))

            def progress(done: int, total: int, round_idx: int = r) -> None:
                for cb in self.cbs:
                    cb.on_client_progress(round_idx=round_idx, done=done, total=total)

            deliver_updates(self.aggregator, r, refs, progress)  # takes the refs over: each goes once folded
            summary: RoundSummary = ray.get(summary_ref)
            payload_ref = new_ref
            sim_time += summary.sim_round_s
            if summary.stragglers:
                log.info("round %d: stragglers left out on the simulated clock: %s", r, summary.stragglers)
            extra = {"sim_round_s": summary.sim_round_s, "sim_time_s": sim_time, "stragglers": len(summary.stragglers)}
            if self.close(r, cohort, summary, payload_ref, t0, extra, self._snapshot(r, payload_ref, sim_time)):
                break

    def asynchronous(self, initial: np.ndarray) -> None:
        """FedBuff-style asynchronous steps (fedsim/sim/buffering.py).

        ``clients_per_round`` clients train at once, each from the version current when it started on the
        simulated clock; every ``system.async_buffer`` arrivals make one server step (a row of the rounds table),
        their weights discounted by staleness.

        Arrival order is decided on the simulated clock, so the next step waits until every client in flight has
        finished for real; a client that arrives is replaced at its arrival time, from the version then current:
        arrivals before the step's last start from the version being merged, while it is merged. With
        K = clients in flight and simultaneous arrivals this is synchronous FedAvg, round for round.
        """
        cfg, system = self.cfg, self.cfg.system
        buffer_size = system.async_buffer or max(1, cfg.clients_per_round // 2)
        versions = {0: ray.put(initial)}
        del initial
        flights: list[Flight[ray.ObjectRef[ClientUpdate]]] = []

        def launch(count: int, start_s: float, version: int) -> None:
            busy = {f.client for f in flights}
            trace = self.trace
            online = trace.online(start_s) if trace is not None else \
                available(cfg.data.num_clients, round_idx=version + 1, seed=cfg.seed, probability=system.availability)
            if trace is not None and not [c for c in online if c not in busy]:  # wait for somebody to come online
                start_s = trace.next_online(start_s)
                online = trace.online(start_s) if math.isfinite(start_s) else []
            clients = self.sampler.sample([c for c in online if c not in busy], count)
            if not clients:
                return
            refs = self._dispatch(version + 1, clients, versions[version])
            flights.extend(Flight(c, start_s, version, ref) for c, ref in zip(clients, refs, strict=True))

        launch(cfg.clients_per_round, 0.0, 0)
        previous_step_s = 0.0
        log.info("async: %d clients in flight, a server step every %d arrivals, staleness discount (1 + τ)^-%g",
                 cfg.clients_per_round, buffer_size, system.staleness_exponent)
        for r in range(1, cfg.rounds + 1):
            t0 = time.perf_counter()
            if not flights:
                raise RunFailed(f"step {r}: no client is training and none can start (nobody online)")
            durations = ray.get(self.aggregator.durations.remote([f.handle for f in flights]))
            arrivals = next_buffer(flights, durations, buffer_size)
            merged = [f for f, _ in arrivals]
            flights = [f for f in flights if f not in merged]
            staleness = [r - 1 - f.version for f in merged]
            new_ref, summary_ref = self.aggregator.aggregate.remote(
                r, versions[r - 1], [f.handle for f in merged], discounts(staleness, system.staleness_exponent),
            )
            versions[r] = new_ref
            step_s = arrivals[-1][1]
            # replacements, from the version current at their arrival: those that arrived before the step get the
            # version being merged, those arriving with it the new one; simultaneous arrivals are sampled together
            for (at, _), group in groupby(arrivals, key=lambda a: (a[1], a[1] >= step_s)):
                launch(len(list(group)), at, r if at >= step_s else r - 1)
            summary: RoundSummary = ray.get(summary_ref)
            for v in [v for v in versions if v < r and all(f.version != v for f in flights)]:
                del versions[v]  # no client trains from it any more
            extra = {"sim_round_s": step_s - previous_step_s, "sim_time_s": step_s, "stragglers": 0,
                     "staleness_mean": float(np.mean(staleness)), "staleness_max": int(max(staleness))}
            previous_step_s = step_s
            # no snapshot: the clients in flight are not part of a checkpoint
            if self.close(r, [f.client for f in merged], summary, new_ref, t0, extra, None):
                break

    def _dispatch(self, round_idx: int, clients: list[int], payload_ref: ray.ObjectRef[np.ndarray]) -> list[Any]:
        """Start ``clients`` training from ``payload_ref``: their instructions by reference, one task each."""
        seeds = [client_seed(self.cfg.seed, round_idx, c) for c in clients]
        instructions = instruction_refs(self.aggregator, round_idx, clients, seeds)
        rows = [self.prepared.partitions[c] for c in clients]
        return self.pool.submit(payload_ref, instructions, rows, [self.cfg.train.client_work(len(ix)) for ix in rows])

    def _snapshot(self, r: int, payload_ref: ray.ObjectRef[np.ndarray], sim_time: float) -> Callable[[], Checkpoint]:
        """The state after round ``r``, read only when a callback saves it (before the next round samples)."""
        sampler_state = self.sampler.rng.bit_generator.state

        def read() -> Checkpoint:
            return Checkpoint(r, ray.get(payload_ref), ray.get(self.aggregator.state_dict.remote()), sampler_state,
                              sim_time)

        return read

    def close(
        self, r: int, cohort: list[int], summary: RoundSummary, payload_ref: ray.ObjectRef[np.ndarray], t0: float,
        extra: dict[str, Any], snapshot: Callable[[], Checkpoint] | None,
    ) -> bool:
        """Close round ``r``, the step both loops share; True if a callback asks to stop.

        Its failures (``_handle_failures`` raises when the run cannot go on), its row (``extra`` after the
        common columns), evaluation when due, then the callbacks: ``after_round``, whose metrics join the row,
        and ``on_round_closed`` with the final row (the tables, the checkpoint).
        """
        cfg = self.cfg
        _handle_failures(cfg, r, summary)
        row = _round_row(r, cohort, summary, time.perf_counter() - t0, len(self.pool))
        row.update(extra)
        if r % cfg.eval.every == 0 or r == cfg.rounds:
            t1 = time.perf_counter()
            chunks = self.pool.evaluate(payload_ref, self.eval_chunks)
            n = sum(c.count for c in chunks)
            row["test_loss"] = sum(c.loss_sum for c in chunks) / n
            row["test_accuracy"] = sum(c.correct for c in chunks) / n
            row["eval_wall_s"] = time.perf_counter() - t1
        row["wall_s"] = time.perf_counter() - t0
        row["driver_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        # a worker answers after its current client: read only when none is in flight (not between async steps)
        idle = cfg.system.policy != "async"
        row["worker_peak_rss_mib"] = max(m["peak_rss_mib"] for m in self.pool.memory()) if idle else float("nan")
        at = {"sim_time_s": row.get("sim_time_s", float("nan"))}  # simulated time is a column of every table
        record = RoundRecord(r, row, [{**c, **at} for c in summary.clients], [{**c, **at} for c in summary.comm],
                             [{**c, **at} for c in _routing_rows(summary.routing_p_bar)], snapshot)
        stop = False
        for cb in self.cbs:
            s, more = cb.after_round(record)
            row.update(more)
            stop = stop or s
        for cb in self.cbs:
            cb.on_round_closed(record, stopping=stop)
        log.info("%s", round_line(r, cfg.rounds, row, step=cfg.system.policy == "async"))
        return stop


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
        # the aggregator's seconds: waiting for updates, fetching them (transfer, restore), folding, merging
        **{f"aggregator_{phase}_s": s.aggregator_seconds.get(phase, float("nan"))
           for phase in ("wait", "get", "fold", "merge")},
        "aggregator_spool_mib": s.spooled_bytes / 2**20,
        "driver_peak_rss_mib": 0.0,
        "worker_peak_rss_mib": 0.0,
        **s.report,  # the strategy's own columns (e.g. FedAlign-MoE's omega_entropy, excluded_pair_frac)
    }


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
