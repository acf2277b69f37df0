"""FedScale's device-capacity and behaviour traces, read from hand-made pickles."""

from __future__ import annotations

import os
import pickle
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from aggregation.errors import ConfigError
from fedsim.config import load_config
from fedsim.sim.fedscale import fedscale_availability, fedscale_profiles
from fedsim.sim.profiles import build_profiles


def _write(path: Path, obj: object) -> str:
    path.write_bytes(pickle.dumps(obj))
    return str(path)


def test_device_capacity_becomes_speed_relative_to_the_median_and_link_rates(tmp_path: Path) -> None:
    # Prepare: three devices at 10, 20 and 40 ms a sample, links of 800, 1600 and 8000 kbit/s
    path = _write(tmp_path / "cap.pkl", {7: {"computation": 20.0, "communication": 1600.0},
                                          3: {"computation": 10.0, "communication": 800.0},
                                          12: {"computation": 40.0, "communication": 8000.0}})
    # Execute: four fedsim clients dealt ids 3, 7, 12, 3
    profiles = fedscale_profiles(path, 4)
    # Assert
    assert [profiles[c].speed_factor for c in range(4)] == [0.5, 1.0, 2.0, 0.5]
    assert profiles[0].uplink_bps == profiles[0].downlink_bps == 800 * 1000 / 8
    assert profiles[2].uplink_bps == 8000 * 1000 / 8
    cfg = load_config(None, [f"system.profiles={path}"])
    assert build_profiles(cfg.system, 4, seed=0) == profiles  # the config's path to it


def test_behaviour_trace_gives_who_is_online_and_when_next(tmp_path: Path) -> None:
    # Prepare: client a online [0, 10) and [50, 60) of a 100 s cycle; client b online [20, 30) of 40 s
    path = _write(tmp_path / "behave.pkl", {"a": {"active": [0, 50], "inactive": [10, 60], "finish_time": 100},
                                            "b": {"active": [20], "inactive": [30], "finish_time": 40}})
    trace = fedscale_availability(path, 2)
    # Assert
    assert trace.online(5.0) == [0]
    assert trace.online(15.0) == []
    assert trace.online(25.0) == [1] and trace.online(65.0) == [1]  # b's cycle repeats at 60 + 5
    assert trace.online(155.0) == [0]  # a's cycle repeats, b offline (155 mod 40 = 35)
    assert trace.next_online(12.0) == 20.0
    assert trace.next_online(31.0) == 50.0


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize(("value", "name"), [
    (np.float64(3.0), r"numpy\._?core\.multiarray\.scalar"),
    (np.array([3.0]), r"numpy\._?core\.multiarray\._reconstruct"),
    (OrderedDict(computation=3.0), r"collections\.OrderedDict"),
    (_Exploit, r"(posix|nt)\.system"),
], ids=["numpy-scalar", "numpy-array", "dict-subclass", "os-system"])
def test_a_trace_that_needs_a_global_is_refused_not_run(tmp_path: Path, value: object, name: str) -> None:
    """FedScale's traces are dicts, lists and numbers: any global at all means the file is not one."""
    # Prepare
    marker = tmp_path / "pwned"
    computation = value(marker) if value is _Exploit else value
    path = _write(tmp_path / "cap.pkl", {1: {"computation": computation, "communication": 5.0}})

    # Execute / Assert
    with pytest.raises(ConfigError, match=rf"^system.profiles: {re.escape(path)} is not a FedScale trace pickle "
                                          rf"\(global {name} is not allowed in this pickle\)$"):
        fedscale_profiles(path, 2)
    assert not marker.exists()


def test_a_trace_that_is_malformed_or_incomplete_raises_config_error_naming_the_field(tmp_path: Path) -> None:
    truncated = tmp_path / "cap.pkl"
    truncated.write_bytes(pickle.dumps({1: {"computation": 1.0, "communication": 5.0}})[:-3])
    with pytest.raises(ConfigError, match=r"^system.profiles: .* is not a FedScale trace pickle \("):
        fedscale_profiles(str(truncated), 2)
    with pytest.raises(ConfigError, match="system.availability_trace: file not found"):
        fedscale_availability(str(tmp_path / "nope.pkl"), 2)
    bad = _write(tmp_path / "behave.pkl", {1: {"active": [1.0]}})
    with pytest.raises(ConfigError, match="client 1 needs 'active', 'inactive' and 'finish_time'"):
        fedscale_availability(bad, 2)
