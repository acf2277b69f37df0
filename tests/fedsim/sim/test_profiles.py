"""The run's device profiles: seeded, written to the run directory and read back."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

from fedsim.config import load_config
from fedsim.sim.profiles import build_profiles, random_profiles, store_system


def test_random_profiles_slow_down_a_seeded_share_of_clients():
    profiles = random_profiles(10, seed=1, slow_fraction=0.3, slow_factor=5.0, uplink_bps=1e6)
    slow = [c for c, p in profiles.items() if p.speed_factor == 5.0]
    assert len(slow) == 3 and slow == [
        c for c, p in random_profiles(10, seed=1, slow_fraction=0.3, slow_factor=5.0).items() if p.speed_factor == 5.0
    ]
    assert all(p.uplink_bps == 1e6 and math.isinf(p.downlink_bps) for p in profiles.values())


def test_stored_profiles_read_back_as_the_same_profiles_and_the_trace_is_copied(tmp_path: Path) -> None:
    # Prepare: random profiles with finite and free links, and a trace file
    trace = tmp_path / "behave.pkl"
    trace.write_bytes(pickle.dumps({0: {"active": [0.0], "inactive": [5.0], "finish_time": 10.0}}))
    cfg = load_config(None, ["system.profiles=random", "system.slow_fraction=0.5", "system.slow_factor=4",
                             "system.uplink_mbps=2", "system.latency_s=0.25", f"system.availability_trace={trace}"])
    profiles = build_profiles(cfg.system, 6, seed=3)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # Execute
    store_system(cfg.system, profiles, run_dir)
    # Assert
    again = load_config(None, [f"system.profiles={run_dir / 'profiles.csv'}"])
    assert build_profiles(again.system, 6, seed=0) == profiles
    assert (run_dir / "availability_trace.pkl").read_bytes() == trace.read_bytes()
