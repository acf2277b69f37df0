"""End to end on a real local Ray: 2 workers, 6 clients, 2 rounds, tiny Mixtral."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

from aggregation.errors import RunFailed
from fedsim.callbacks.base import Callback
from fedsim.config import RunConfig
from fedsim.driver import run
from fedsim.report import compare, report
from tests.e2e.exact import EXACT, assert_same_run
from tests.fedsim.engine.test_choice_engine import write_hellaswag

pytestmark = [pytest.mark.ray, pytest.mark.slow]

METRICS = ["round", "test_loss", "test_accuracy", "train_loss", "clients_sampled", "clients_completed", "examples",
           "bytes_down", "bytes_up", "routing_tv"]


class _HalfRound(Callback):
    """A user's callback that adds a metric of its own to each round's row."""

    def after_round(self, record):  # type: ignore[no-untyped-def]
        return False, {"half_round": record.round_idx / 2}


def test_run_writes_complete_tables(ray_session, tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Execute
    result = run(tiny_config(), out=tmp_path / "run", callbacks=[_HalfRound()])
    # Assert
    d = result.run_dir
    for name in ("config.yaml", "manifest.json", "rounds.parquet", "rounds.csv", "clients.csv", "run.log"):
        assert (d / name).is_file(), name
    for name in ("clients", "comm", "routing"):  # grown by one part per round, never rewritten
        assert sorted(p.name for p in (d / f"{name}.parquet").iterdir()) == [
            "round-000001.parquet", "round-000002.parquet"
        ]
    assert len(pd.read_csv(d / "clients.csv")) == 12
    assert json.loads((d / "status.json").read_text())["status"] == "completed"
    manifest = json.loads((d / "manifest.json").read_text())
    assert manifest["partition_hash"] and manifest["versions"]["ray"] == "2.60.0"
    rounds = pd.read_parquet(d / "rounds.parquet")
    assert list(rounds["round"]) == [1, 2]
    assert rounds["half_round"].tolist() == [0.5, 1.0]  # a callback's metric reaches the table on disk
    for col in METRICS + ["wall_s", "train_wall_s"]:
        assert col in rounds and rounds[col].notna().all(), col
    acc = rounds["test_accuracy"].tolist()
    assert all(0.0 <= a <= 1.0 for a in acc)
    assert rounds["test_loss"].iloc[0] != rounds["test_loss"].iloc[1]
    assert (rounds["clients_completed"] == 6).all()
    clients = pd.read_parquet(d / "clients.parquet")
    assert len(clients) == 12
    assert set(clients.columns) >= {"round", "client", "n_examples", "train_loss", "compute_s", "bytes_down",
                                    "bytes_up"}
    assert (clients["compute_s"] > 0).all() and (clients["bytes_up"] > clients["bytes_down"]).all()
    assert ((clients["stats_s"] > 0) & (clients["stats_s"] < clients["compute_s"])).all()
    assert all(math.isfinite(v) for v in clients["train_loss"])
    # each process's peak memory: every worker's, once the run completed, and the largest in each round
    workers = pd.read_csv(d / "placement.csv")
    assert len(workers) == 2 and (workers["peak_rss_mib"] > 100).all()
    # a peak only grows: the run's end reads it after the last round did (the workers' idle calls add a little)
    assert (rounds["worker_peak_rss_mib"] <= workers["peak_rss_mib"].max()).all()
    assert rounds["worker_peak_rss_mib"].iloc[-1] >= 0.9 * workers["peak_rss_mib"].max()


def test_run_same_seed_same_metrics_with_one_or_two_workers(ray_session, tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    one = run(tiny_config("workers.num_workers=1"), out=tmp_path / "one").rounds
    two = run(tiny_config("workers.num_workers=2"), out=tmp_path / "two").rounds
    pd.testing.assert_frame_equal(one[METRICS], two[METRICS], check_exact=True)


def test_run_client_failure_marks_run_failed(ray_session, tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = tiny_config("clients_per_round=6", "faults.fail_clients=[3]", "faults.fail_rounds=[2]",
                      "workers.on_client_failure=stop")
    with pytest.raises(RunFailed, match="client 3 round 2"):
        run(cfg, out=tmp_path / "failed")
    status = json.loads((tmp_path / "failed" / "status.json").read_text())
    assert status["status"] == "failed" and "client 3 round 2" in status["error"]
    rounds = pd.read_parquet(tmp_path / "failed" / "rounds.parquet")
    assert list(rounds["round"]) == [1]  # round 1 kept, nothing written for the failed round
    # the failed run left no actor in the Ray that outlives it (this test process's: its processes are our children)
    deadline = time.monotonic() + 30
    while _actor_processes("ray::Aggregator") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _actor_processes("ray::Aggregator")


def _actor_processes(title: str) -> list[psutil.Process]:
    """The Ray processes under the test process whose title starts with ``title``."""
    found = []
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if " ".join(child.cmdline()).startswith(title):
                found.append(child)
    return found


def test_run_fedalign_moe_two_rounds_with_the_spec_gamma(ray_session, tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # the spec's γ with D on the experts' effective weights: the other FedAlign-MoE runs here take the default (no D)
    spec_gamma = ("strategy.fedalign.direction_consensus=true", "strategy.fedalign.consensus_space=function")
    result = run(tiny_config("strategy.name=fedalign_moe", "data.alpha=0.3", *spec_gamma), out=tmp_path / "fedalign")
    rounds = result.rounds
    assert list(rounds["round"]) == [1, 2] and rounds["test_accuracy"].between(0, 1).all()
    assert rounds["omega_entropy"].notna().all() and rounds["excluded_pair_frac"].between(0, 1).all()
    assert rounds["consensus_mean"].between(-1, 1).all() and rounds["consensus_negative_frac"].between(0, 1).all()
    weights = result.clients.groupby("round")["weight"].sum()
    assert np.allclose(weights.to_numpy(), 1.0)


def test_run_fedmoe_weights_clients_by_expert_usage(ray_session, tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = run(tiny_config("strategy.name=fedmoe", "data.alpha=0.3", "rounds=1"), out=tmp_path / "fedmoe")
    clients = result.clients
    assert np.isclose(clients["weight"].sum(), 1.0)
    n_share = clients["n_examples"] / clients["n_examples"].sum()
    assert not np.allclose(clients["weight"].to_numpy(), n_share.to_numpy())  # usage, not example counts


def test_run_pfl_moe_keeps_experts_on_returning_clients(ray_session, tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = run(tiny_config("strategy.name=pfl_moe"), out=tmp_path / "pfl")
    rounds, clients = result.rounds, result.clients
    assert rounds["test_accuracy"].between(0, 1).all() and rounds["personal_clients"].tolist() == [6.0, 6.0]
    # every client returns in round 2 and downloads no experts: its own stayed with it
    down = clients.pivot(index="client", columns="round", values="bytes_down")
    assert (down[2] < down[1]).all()
    comm = result.comm
    expert_down = (comm[(comm["payload_class"] == "expert") & (comm["direction"] == "down")]
                   .groupby("round")["bytes"].sum())
    assert expert_down[1] > 0 and expert_down[2] == 0


def test_a_nan_update_is_rejected_and_the_run_goes_on(ray_session, tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = run(tiny_config("faults.nan_clients=[2]", "faults.fail_rounds=[2]"), out=tmp_path / "nan")
    rounds, clients = result.rounds, result.clients
    assert rounds["clients_rejected"].tolist() == [0, 1]
    assert np.isfinite(rounds["test_accuracy"]).all() and np.isfinite(rounds["test_loss"]).all()
    bad = clients[(clients["round"] == 2) & (clients["client"] == 2)].iloc[0]
    assert bad["rejected"] == "delta has NaN or Inf values" and bad["weight"] == 0.0
    assert np.isclose(clients[clients["round"] == 2]["weight"].sum(), 1.0)
    assert "rejected the update of client 2: delta has NaN" in (tmp_path / "nan" / "run.log").read_text()


def test_a_client_that_keeps_failing_is_dropped_and_logged(ray_session, tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = run(tiny_config("faults.fail_clients=[3]", "faults.fail_rounds=[2]"), out=tmp_path / "drop")
    rounds = result.rounds
    assert rounds["clients_failed"].tolist() == [0, 1] and rounds["clients_completed"].tolist() == [6, 5]
    assert 3 not in set(result.clients[result.clients["round"] == 2]["client"])
    assert "client 3 round 2: injected fault (faults.fail_clients) (dropped from the round)" in (
        tmp_path / "drop" / "run.log").read_text()


class _KillOneWorker(Callback):
    """A callback that SIGKILLs, once, one of this run's workers inside ``train``, then finds its restarted process.

    The worker killed is one inside ``train`` for a client of round ``round_idx`` (or, if none is seen there, a
    later round); the callback then watches for the process Ray restarts it in.

    Only the run's own workers are candidates (their pids from ``placement.csv``), and a worker counts as busy
    only while Ray's process title names the method it runs (``ray::ClientWorker.train``). The restarted worker
    is a ClientWorker process under the same raylet whose pid is not in ``placement.csv``, seen inside ``train``.
    """

    def __init__(self, round_idx: int) -> None:
        self.round_idx = round_idx
        self.run_dir: Path | None = None
        self.placed: set[int] = set()
        self.killed: int | None = None
        self.in_flight: tuple[int, int, int] | None = None  # (round, done, total) when the worker was killed
        self.raylet: psutil.Process | None = None
        self.restarted: int | None = None

    def on_run_begin(self, *, run_dir: Path, total_rounds: int) -> None:
        self.run_dir = run_dir

    def on_client_progress(self, *, round_idx: int, done: int, total: int) -> None:
        if round_idx < self.round_idx:
            return
        if self.killed is None:
            self._kill_a_training_worker(round_idx, done, total)
        elif self.restarted is None and self.raylet is not None:
            self.restarted = next((p.pid for p in self.raylet.children() if p.pid not in self.placed
                                   and _title(p).startswith("ray::ClientWorker.train")), None)

    def _kill_a_training_worker(self, round_idx: int, done: int, total: int) -> None:
        assert self.run_dir is not None
        if not self.placed:
            self.placed = set(pd.read_csv(self.run_dir / "placement.csv")["pid"].astype(int))
        for pid in sorted(self.placed):
            try:
                proc = psutil.Process(pid)
            except psutil.NoSuchProcess:
                continue
            if _title(proc).startswith("ray::ClientWorker.train"):
                self.raylet = proc.parent()
                os.kill(pid, signal.SIGKILL)
                self.killed, self.in_flight = pid, (round_idx, done, total)
                return


def _title(proc: psutil.Process) -> str:
    """A process's title (Ray's ``ray::Class.method`` while a task runs), or "" once it is gone."""
    try:
        return (proc.cmdline() or [""])[0]
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return ""


def test_a_worker_killed_mid_round_is_restarted_and_the_metrics_match_a_clean_run(
    ray_session: None, tiny_config: Callable[..., RunConfig], tmp_path: Path
) -> None:
    """Ray restarts a dead worker and retries the client it was training, and the run is unchanged bit for bit.

    The restart and retry: workers.max_restarts and max_task_retries. Client seeds depend only on (seed, round,
    client), so the run must come out bit for bit as if nothing had happened.
    """
    # Prepare: rounds long enough (25 local epochs: over a second on a quiet machine, where 5 took 0.2 s and the
    # progress polls, every 0.25 s, could miss every worker inside train) for the kill to find one; FedAlign-MoE, so
    # that its own columns and cross-round state are compared too
    overrides = ("rounds=3", "train.local_epochs=25", "strategy.name=fedalign_moe", *EXACT)
    run(tiny_config(*overrides), out=tmp_path / "clean")
    killer = _KillOneWorker(round_idx=2)

    # Execute
    result = run(tiny_config(*overrides), out=tmp_path / "killed", callbacks=[killer])

    # Assert: a worker died inside train with a round's clients in flight, and a new process took its place
    assert killer.killed is not None and killer.in_flight is not None, "no worker of the run was seen inside train"
    round_idx, done, total = killer.in_flight
    assert round_idx in (2, 3) and done < total, killer.in_flight
    assert killer.restarted is not None, "no restarted ClientWorker was seen training"
    # ... the client it was training was retried: nobody failed or was dropped
    rounds = result.rounds
    assert rounds["clients_failed"].tolist() == [0, 0, 0] and rounds["clients_completed"].tolist() == [6, 6, 6]
    assert "dropped from the round" not in (tmp_path / "killed" / "run.log").read_text()
    # ... and every table and the final payload are the clean run's
    left_out = assert_same_run(tmp_path / "killed", tmp_path / "clean")
    assert "rounds.omega_entropy" not in left_out and "clients.sim_duration_s" not in left_out


def test_comm_table_splits_each_clients_bytes_by_payload_class(ray_session, tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = run(tiny_config("rounds=1"), out=tmp_path / "comm")
    comm = pd.read_parquet(tmp_path / "comm" / "comm.parquet")
    per_client = comm.groupby(["round", "client", "direction"])["bytes"].sum().unstack("direction")
    clients = result.clients.set_index(["round", "client"])
    assert (per_client["up"] == clients["bytes_up"]).all() and (per_client["down"] == clients["bytes_down"]).all()
    experts = comm[(comm["payload_class"] == "expert") & (comm["client"] == comm["client"].iloc[0])]
    assert len(experts[experts["direction"] == "up"]) == 2 * 4  # tiny model: 2 MoE layers × 4 experts
    assert set(comm["payload_class"]) == {"shared", "router", "expert", "routing_stats"}


def test_a_topk_uplink_shrinks_bytes_and_reports_its_error(ray_session, tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    plain = run(tiny_config(), out=tmp_path / "plain")
    result = run(tiny_config("compression.uplink=topk", "compression.topk_fraction=0.1"), out=tmp_path / "topk")
    rounds = result.rounds
    assert (rounds["bytes_up"] < 0.35 * plain.rounds["bytes_up"]).all()  # 10 % of values at 8 bytes + routing stats
    assert rounds["compression_error"].between(0, 1).all() and plain.rounds["compression_error"].isna().all()
    assert rounds["test_accuracy"].between(0, 1).all()


def test_report_and_compare_draw_every_plot_and_embed_it(ray_session, tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Prepare: two short runs, one FedAlign-MoE (it has strategy columns and routing statistics)
    a = run(tiny_config(), out=tmp_path / "fedavg").run_dir
    b = run(tiny_config("strategy.name=fedalign_moe"), out=tmp_path / "fedalign").run_dir

    # Execute
    page = report(b)
    compared = compare([a, b], tmp_path / "cmp")

    # Assert: every PNG exists, is a real image, and the page embeds each one
    names = {"accuracy", "accuracy_vs_time", "accuracy_vs_bytes", "bytes_by_class", "expert_utilisation",
             "client_weights", "fedalign", "failures"}
    pngs = {p.stem: p for p in (b / "report").glob("*.png")}
    assert set(pngs) == names
    text = page.read_text()
    for p in pngs.values():
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
        assert f"alt='{p.name}'" in text
    assert ("compare_accuracy.png" in compared.read_text()
            and (tmp_path / "cmp" / "compare_accuracy.png").stat().st_size > 5000)
    routing = pd.read_parquet(b / "routing.parquet")
    assert len(routing) == 2 * 2 * 4 and np.allclose(routing.groupby(["round", "layer"])["p_bar_mean"].sum(), 1.0)


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v2", "deepseek_v3"])
def test_each_family_runs_a_fedalign_moe_round(ray_session, tiny_config, tmp_path: Path, family: str) -> None:  # type: ignore[no-untyped-def]
    result = run(tiny_config(f"model.family={family}", "strategy.name=fedalign_moe", "rounds=1"), out=tmp_path / family)
    assert result.rounds["test_accuracy"].between(0, 1).all()
    assert np.isclose(result.clients["weight"].sum(), 1.0)
    experts = result.comm[(result.comm["payload_class"] == "expert") & (result.comm["direction"] == "up")]
    assert experts.groupby("client").size().eq(2 * 4).all()  # 2 MoE layers × 4 experts, each its own slice


def test_a_4bit_base_runs_rounds_on_the_workers(ray_session, tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Execute: every worker loads the base quantized (bitsandbytes' CPU kernels here), two FedAvg rounds
    result = run(tiny_config("model.quantization=4bit"), out=tmp_path / "nf4")

    # Assert: the rounds complete with real metrics, and the payload is the unquantized run's layout
    plain = run(tiny_config("rounds=1"), out=tmp_path / "plain")
    assert result.rounds["test_accuracy"].between(0, 1).all() and np.isfinite(result.rounds["train_loss"]).all()
    assert result.rounds["clients_completed"].eq(6).all()
    assert result.rounds["bytes_up"].iloc[0] == plain.rounds["bytes_up"].iloc[0]


def test_switch_transformers_runs_a_fedalign_moe_round_over_encoder_and_decoder_experts(  # type: ignore[no-untyped-def]
    ray_session, tiny_config, tmp_path: Path
) -> None:
    # Execute: encoder-decoder, top-1, text-to-text (the prompt encoded, the label word decoded)
    result = run(tiny_config("model.family=switch_transformers", "model.top_k=1", "strategy.name=fedalign_moe",
                             "rounds=1"), out=tmp_path / "switch")

    # Assert: 2 encoder + 2 decoder MoE layers, each with its routing statistics and 4 expert slices per client
    assert result.rounds["test_accuracy"].between(0, 1).all() and np.isclose(result.clients["weight"].sum(), 1.0)
    experts = result.comm[(result.comm["payload_class"] == "expert") & (result.comm["direction"] == "up")]
    assert experts.groupby("client").size().eq(4 * 4).all()
    routing = pd.read_parquet(result.run_dir / "routing.parquet")
    assert sorted(routing["layer"].unique()) == [0, 1, 2, 3]
    assert np.allclose(routing.groupby("layer")["p_bar_mean"].sum(), 1.0)


def test_a_deadline_drops_the_slow_client_on_the_simulated_clock(ray_session, tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Prepare: client 2 computes 1000× slower; a reproducible compute model (10 ms an example)
    profiles = tmp_path / "profiles.csv"
    pd.DataFrame({"client": [2], "speed_factor": [1000.0], "downlink_mbps": [100.0], "uplink_mbps": [100.0],
                  "latency_s": [0.5]}).to_csv(profiles, index=False)
    cfg = tiny_config(f"system.profiles={profiles}", "system.seconds_per_example=0.01", "system.policy=deadline",
                      "system.deadline_s=30")

    # Execute
    result = run(cfg, out=tmp_path / "deadline")

    # Assert: client 2 is the one straggler every round, merged by nobody; the clock advanced by the deadline
    rounds, clients = result.rounds, result.clients
    assert rounds["stragglers"].tolist() == [1, 1]
    late = clients[clients["straggler"]]
    assert set(late["client"]) == {2} and (late["weight"] == 0).all() and (late["sim_duration_s"] > 30).all()
    assert np.isclose(clients[~clients["straggler"]].groupby("round")["weight"].sum(), 1.0).all()
    assert rounds["sim_round_s"].tolist() == [30.0, 30.0] and rounds["sim_time_s"].tolist() == [30.0, 60.0]
    assert (tmp_path / "deadline" / "profiles.csv").exists()


def test_over_selection_keeps_the_first_k_to_finish(ray_session, tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Prepare: 4 per round, over-select by 50 % → all 6 sampled, the 4 fastest (fewest examples) kept
    cfg = tiny_config("clients_per_round=4", "system.policy=over_select", "system.over_selection=0.5",
                      "system.seconds_per_example=0.01", "rounds=1")

    # Execute
    clients = run(cfg, out=tmp_path / "over").clients

    # Assert
    assert len(clients) == 6 and (~clients["straggler"]).sum() == 4
    fastest = set(clients.sort_values(["sim_duration_s", "client"])["client"].head(4))
    assert set(clients[~clients["straggler"]]["client"]) == fastest


def test_run_writes_tensorboard_scalars(ray_session, tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Execute
    result = run(tiny_config("logging.tensorboard=true"), out=tmp_path / "run")
    # Assert: the rounds table's numbers, per round, and accuracy against simulated time and bytes
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"round/test_accuracy", "round/train_loss", "round/bytes_up", "vs_bytes_kib/test_accuracy"} <= tags
    loss = [e.value for e in events.Scalars("round/train_loss")]
    assert [e.step for e in events.Scalars("round/train_loss")] == [1, 2]
    assert loss == pytest.approx(result.rounds["train_loss"].tolist(), rel=1e-6)


@pytest.mark.parametrize("strategy", ["fedavg", "fedalign_moe"])
def test_async_buffered_rounds_discount_stale_updates(ray_session, tiny_config, tmp_path: Path, strategy: str) -> None:  # type: ignore[no-untyped-def]
    # Prepare: 4 clients in flight, a server step every 2 arrivals, half the clients 5× slower
    cfg = tiny_config("system.policy=async", "clients_per_round=4", "system.async_buffer=2", "rounds=5",
                      "system.seconds_per_example=0.01", "system.profiles=random", "system.slow_fraction=0.5",
                      "system.slow_factor=5", f"strategy.name={strategy}")
    # Execute
    result = run(cfg, out=tmp_path / "async")
    # Assert: 5 server steps of 2 updates each, on an advancing simulated clock, some of them stale
    rounds, clients = result.rounds, result.clients
    assert rounds["round"].tolist() == [1, 2, 3, 4, 5] and (rounds["clients_completed"] == 2).all()
    assert rounds["sim_time_s"].is_monotonic_increasing and (rounds["sim_round_s"] >= 0).all()
    assert rounds["staleness_mean"].iloc[0] == 0 and rounds["staleness_max"].max() >= 1
    assert (clients["staleness"] >= 0).all() and rounds["test_accuracy"].notna().all()
    if strategy == "fedavg":  # FedAvg's weight of client i is n_i·(1 + τ_i)^-0.5, normalised over the step
        for _, step in clients.groupby("round"):
            raw = step["n_examples"] * (1 + step["staleness"]) ** -0.5
            np.testing.assert_allclose(step["weight"], raw / raw.sum(), rtol=1e-6)


def test_async_with_buffer_equal_to_cohort_and_no_staleness_is_synchronous_fedavg(  # type: ignore[no-untyped-def]
    ray_session, tiny_config, tmp_path: Path
) -> None:
    # Prepare: every client holds 5 examples and computes alike, so a cohort's updates arrive together
    same = ["data.partition=iid", "data.synthetic_docs_per_label=8", "clients_per_round=3", "rounds=3",
            "system.seconds_per_example=0.01"]
    # Execute
    sync = run(tiny_config(*same), out=tmp_path / "sync").rounds
    buffered = run(tiny_config(*same, "system.policy=async", "system.async_buffer=3"), out=tmp_path / "async").rounds
    # Assert
    assert (buffered["staleness_max"] == 0).all()
    cols = ["round", "train_loss", "test_loss", "test_accuracy", "examples", "bytes_up", "sim_time_s"]
    pd.testing.assert_frame_equal(buffered[cols], sync[cols], check_exact=True)


def test_a_fedscale_availability_trace_decides_who_can_be_sampled(ray_session, tiny_config, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import pickle

    # Prepare: FedScale-style trace; clients 0-3 online from 5 s on, clients 4 and 5 never
    always = {"active": [5.0], "inactive": [1e9], "finish_time": 2e9}
    never = {"active": [], "inactive": [], "finish_time": 100.0}
    trace = tmp_path / "behave.pkl"
    trace.write_bytes(pickle.dumps({i: always if i < 4 else never for i in range(6)}))
    # Execute
    result = run(tiny_config(f"system.availability_trace={trace}", "system.seconds_per_example=0.01"),
                 out=tmp_path / "t")
    # Assert: only the four online clients, the first round waiting until they come online at 5 s
    assert set(result.clients["client"]) == {0, 1, 2, 3}
    assert (result.rounds["clients_sampled"] == 4).all()
    assert result.rounds["sim_time_s"].iloc[0] >= 5.0
    assert (result.run_dir / "availability_trace.pkl").read_bytes() == trace.read_bytes()


def test_a_hellaswag_file_runs_federated_rounds_partitioned_by_activity(  # type: ignore[no-untyped-def]
    ray_session, tiny_config, tmp_path: Path
) -> None:
    # Prepare: a local file in Rowan/hellaswag's schema; one client per activity label is what α → 0 would give
    source = write_hellaswag(tmp_path / "hellaswag.json", per_activity=20)
    cfg = tiny_config("data.format=hellaswag", f"data.source={source}", "data.num_clients=4", "clients_per_round=4",
                      "data.max_length=40", "data.max_option_length=12", "strategy.name=fedalign_moe", "rounds=2")

    # Execute
    result = run(cfg, out=tmp_path / "hs")

    # Assert: options scored per token; every round evaluated the whole test split
    assert "format: hellaswag" in (result.run_dir / "config.yaml").read_text()
    assert result.rounds["test_accuracy"].between(0, 1).all() and len(result.rounds) == 2
    assert result.clients.groupby("round")["client"].nunique().eq(4).all()
