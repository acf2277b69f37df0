"""The command line: bad input exits 2 before anything expensive runs, and leaves no run behind.

Its error is one line naming the field or file.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"
# A case: (what to put in tmp_path, then the command line; the text the error line must contain)
Case = Callable[[Path], list[str]]


def _fedsim(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedsim", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def _run(*extra: str) -> Case:
    """``fedsim run`` of the demo config (pretraining on, empty cache) with ``extra`` arguments."""
    return lambda tmp: ["run", "--config", str(DEMO), f"out_dir={tmp}/runs", f"cache_dir={tmp}/cache", *extra]


def _with_file(name: str, content: bytes, *extra: str) -> Case:
    """``fedsim run`` with a file written first; ``{file}`` in ``extra`` is its path."""

    def make(tmp: Path) -> list[str]:
        (tmp / name).write_bytes(content)
        return _run(*(e.format(file=tmp / name) for e in extra))(tmp)

    return make


def _config_file(content: bytes) -> Case:
    def make(tmp: Path) -> list[str]:
        (tmp / "bad.yaml").write_bytes(content)
        return ["run", "--config", str(tmp / "bad.yaml"), f"out_dir={tmp}/runs", f"cache_dir={tmp}/cache"]

    return make


def _out_existing_file(tmp: Path) -> list[str]:
    (tmp / "taken").write_text("a user's file\n")
    return _run("--out", str(tmp / "taken"))(tmp)


def _out_foreign_directory(tmp: Path) -> list[str]:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("a user's notes\n")
    return _run("--out", str(tmp / "mine"))(tmp)


def _out_run_of_another_config(tmp: Path) -> list[str]:
    other = tmp / "other"
    other.mkdir()
    (other / "status.json").write_text(json.dumps({"status": "completed"}))
    (other / "manifest.json").write_text(json.dumps({"config_digest": "0123456789abcdef"}))
    return _run("--out", str(other))(tmp)


def _run_dir(tmp: Path, *, status: str | None = '{"status": "failed"}', manifest: bool = True,
             checkpoint: dict[str, object] | None = None) -> list[str]:
    """A run directory as a killed run leaves it, spoiled as the case says; then ``fedsim resume`` of it."""
    run_dir = tmp / "killed"
    run_dir.mkdir()
    config = yaml.safe_load(DEMO.read_text())
    (run_dir / "config.yaml").write_text(yaml.safe_dump({**config, "cache_dir": str(tmp / "cache")}))
    if status is not None:
        (run_dir / "status.json").write_text(status)
    if manifest:
        (run_dir / "manifest.json").write_text(json.dumps({"partition_hash": "x"}))
    if checkpoint is not None:
        (run_dir / "checkpoint.pkl").write_bytes(pickle.dumps(checkpoint))
    return ["resume", str(run_dir)]


# Each bad input, the text its one error line must contain.
CASES: dict[str, tuple[Case, str]] = {
    "unknown key": (_run("unknown_key=1"), "unknown_key: unknown key"),
    "negative rounds": (_run("rounds=-1"), "rounds:"),
    "function-space D left out of gamma": (
        _run("strategy.fedalign.consensus_space=function"),
        "strategy.fedalign: consensus_space='function' measures D, which γ leaves out: set direction_consensus=true",
    ),
    "unknown family": (_run("model.family=gpt2"), "model.family"),
    "missing data file": (_run("data.source=missing/file.json"), "missing/file.json"),
    "unknown strategy": (_run("strategy.name=fedbar"), "strategy.name"),
    "unknown consensus space": (_run("strategy.fedalign.consensus_space=weights"),
                                "strategy.fedalign.consensus_space: Input should be 'factors' or 'function'"),
    "negative seed": (_run("seed=-1"), "seed: Input should be greater than or equal to 0"),
    "bool rounds": (_run("rounds=true"), "rounds: expected a number, not true/false"),
    "inf lr": (_run("train.lr=.inf"), "train.lr:"),
    "nan data alpha": (_run("data.alpha=.nan"), "data.alpha:"),
    "inf lora alpha": (_run("lora.alpha=.inf"), "lora.alpha:"),
    "nan cpus per worker": (_run("workers.cpus_per_worker=.nan"), "workers.cpus_per_worker:"),
    "inf latency": (_run("system.latency_s=.inf"), "system.latency_s:"),
    "cohort over clients": (_run("clients_per_round=11"), "clients_per_round: 11 exceeds data.num_clients=10"),
    "unknown fault client": (_run("faults.fail_clients=[3,10]"), "faults.fail_clients: no client has id 10"),
    "unknown nan client": (_run("faults.nan_clients=[-1]"), "faults.nan_clients: no client has id -1"),
    "config not utf-8": (_config_file(b"rounds: 3\nname: caf\xe9\n"), "is not UTF-8 text (byte 0xe9 at offset 19)"),
    "config empty": (_config_file(b"# nothing here\n"), "is empty"),
    "config duplicate key": (_config_file(b"rounds: 3\nseed: 1\nrounds: 5\n"), "line 3: duplicate key 'rounds'"),
    "config is a directory": (lambda tmp: ["run", "--config", str(tmp)], "is a directory, not a file"),
    "data source is a directory": (_run("data.source=./"), "data.source: . is a directory, not a file"),
    "data file not utf-8": (
        _with_file("data.csv", b"text,label\nna\xefve,a\nok,b\n", "data.source={file}"),
        "data.source: {tmp}/data.csv is not UTF-8 text (byte 0xef at offset 13)",
    ),
    "out is a file": (_out_existing_file, "--out: {tmp}/taken is a file, not a directory"),
    "out is a foreign directory": (_out_foreign_directory, "--out: {tmp}/mine is not empty and holds no run"),
    "out holds another config's run": (_out_run_of_another_config, "it is of another config"),
    "resume corrupt status": (lambda tmp: _run_dir(tmp, status='{"status": "runn'), "status.json: unreadable"),
    "resume without manifest": (lambda tmp: _run_dir(tmp, manifest=False), "manifest.json: missing"),
    "resume checkpoint lacks keys": (
        lambda tmp: _run_dir(tmp, checkpoint={"format": 1, "round_idx": 2}),
        "checkpoint.pkl: incomplete checkpoint, it lacks payload, strategy_state, sampler_state",
    ),
    "resume not a run": (lambda tmp: ["resume", str(tmp)], "not a run directory (no config.yaml)"),
}
# Checked only after cheap work (reading a file, loading the corpus), but before the base is built.
PREFLIGHT: dict[str, tuple[Case, str]] = {
    "profiles file unreadable": (
        _with_file("profiles.csv", b"client,speed\n0,1\n", "system.profiles={file}"),
        "system.profiles: {tmp}/profiles.csv lacks the columns",
    ),
    "availability trace not a trace": (
        _with_file("trace.pkl", b"not a pickle", "system.availability_trace={file}"),
        "system.availability_trace:",
    ),
    "partition cannot be made": (_run("data.min_examples=5000"), "min_examples"),
    "workers do not fit": (_run("workers.num_workers=5", "workers.ray_num_cpus=2"), "workers.num_workers: 5 workers"),
}


@pytest.mark.parametrize("case", [*CASES, *PREFLIGHT])
def test_cli_bad_input_exits_2_with_one_line_before_any_work(case: str, tmp_path: Path) -> None:
    # Prepare
    make, named = {**CASES, **PREFLIGHT}[case]
    args = make(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    # Execute
    started = time.monotonic()
    proc = _fedsim(*args, cwd=tmp_path)
    seconds = time.monotonic() - started
    # Assert: one line, field or file named, exit 2, nothing built or written
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fedsim: error: "), lines[0]
    assert named.format(tmp=tmp_path) in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "building base" not in proc.stderr + proc.stdout
    assert seconds < 60, f"{case}: {seconds:.0f} s: the check ran after expensive work"
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "cache" not in p.parts)
    assert after == [p for p in before if "cache" not in p.parts], "the command wrote files"
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").glob("base-*"))


def test_cli_missing_config_file_exits_2(tmp_path: Path) -> None:
    proc = _fedsim("run", "--config", "nope.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert "nope.yaml" in proc.stderr and "Traceback" not in proc.stderr
