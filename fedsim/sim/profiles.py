"""Device profiles of a run's clients: built from the config (seeded) or read from a file, and stored.

A ``.pkl`` file is a FedScale device-capacity trace (``fedsim.sim.fedscale``). The
table form takes one row per client with columns ``client``,
``speed_factor``, ``downlink_mbps``, ``uplink_mbps`` and ``latency_s`` (csv,
json records or parquet, read with pandas); clients it leaves out get a
speed-1 device with free links. The profiles a run used are written to its
directory as ``profiles.csv``, so a run can be re-timed or repeated, beside a
copy of the availability trace it used, if any (``store_system``).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from aggregation.errors import ConfigError
from fedsim.config import SystemConfig
from fedsim.sim.availability import AvailabilityTrace
from fedsim.sim.clock import DeviceProfile
from fedsim.sim.fedscale import fedscale_availability, fedscale_profiles

COLUMNS = ("client", "speed_factor", "downlink_mbps", "uplink_mbps", "latency_s")


def _bps(mbps: float | None) -> float:
    return math.inf if mbps is None or not math.isfinite(mbps) else mbps * 1e6 / 8


def random_profiles(
    num_clients: int, *, seed: int, slow_fraction: float = 0.0, slow_factor: float = 1.0,
    downlink_bps: float = math.inf, uplink_bps: float = math.inf, latency_s: float = 0.0,
) -> dict[int, DeviceProfile]:
    """Profiles where a seeded ``slow_fraction`` of the clients compute ``slow_factor`` times slower."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC10C]))
    slow = set(rng.choice(num_clients, size=round(slow_fraction * num_clients), replace=False).tolist())
    return {
        c: DeviceProfile(slow_factor if c in slow else 1.0, downlink_bps, uplink_bps, latency_s)
        for c in range(num_clients)
    }


def build_profiles(system: SystemConfig, num_clients: int, seed: int) -> dict[int, DeviceProfile]:
    """Profiles for clients 0..num_clients-1; a bad file is a one-line error naming ``system.profiles``."""
    if system.profiles in ("uniform", "random"):
        return random_profiles(
            num_clients, seed=seed, slow_fraction=system.slow_fraction if system.profiles == "random" else 0.0,
            slow_factor=system.slow_factor, downlink_bps=_bps(system.downlink_mbps),
            uplink_bps=_bps(system.uplink_mbps), latency_s=system.latency_s,
        )
    path = Path(system.profiles)
    if path.suffix == ".pkl":
        return fedscale_profiles(str(path), num_clients)
    readers = {".csv": pd.read_csv, ".json": pd.read_json, ".parquet": pd.read_parquet}
    if path.suffix not in readers:
        raise ConfigError(f"system.profiles: {path} is neither uniform, random nor a .csv/.json/.parquet/.pkl file")
    if not path.exists():
        raise ConfigError(f"system.profiles: file not found: {path}")
    try:
        table = readers[path.suffix](path)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"system.profiles: cannot read {path} ({type(exc).__name__})") from None
    missing = [c for c in COLUMNS if c not in table]
    if missing:
        raise ConfigError(f"system.profiles: {path} lacks the columns {missing}")
    if (table["speed_factor"] <= 0).any() or (table[["downlink_mbps", "uplink_mbps"]] <= 0).any().any():
        raise ConfigError(f"system.profiles: {path} has a non-positive speed_factor or link speed")
    return {
        int(r.client): DeviceProfile(
            float(r.speed_factor), _bps(r.downlink_mbps), _bps(r.uplink_mbps), float(r.latency_s)
        )
        for r in table.itertuples()
        if 0 <= int(r.client) < num_clients
    }


def build_availability(system: SystemConfig, num_clients: int) -> AvailabilityTrace | None:
    """The clients' availability trace, when ``system.availability_trace`` names one."""
    return None if system.availability_trace is None else fedscale_availability(system.availability_trace, num_clients)


def write_profiles(profiles: dict[int, DeviceProfile], path: Path) -> None:
    """Write ``profiles`` to ``path`` as a csv table in the form ``build_profiles`` reads (links in Mbit/s)."""
    rows = [{"client": c, "speed_factor": p.speed_factor,
             "downlink_mbps": p.downlink_bps * 8 / 1e6, "uplink_mbps": p.uplink_bps * 8 / 1e6, "latency_s": p.latency_s}
            for c, p in sorted(profiles.items())]
    pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(path, index=False)


def store_system(system: SystemConfig, profiles: dict[int, DeviceProfile], run_dir: Path) -> None:
    """The device profiles and any availability trace the run used, kept in its directory."""
    write_profiles(profiles, run_dir / "profiles.csv")
    if system.availability_trace:
        shutil.copyfile(system.availability_trace, run_dir / "availability_trace.pkl")
