"""FedScale's device and availability traces, read from local pickles without running code from them.

- Device capacity (FedScale's ``client_device_capacity``): ``{client: {"computation": ms per sample,
  "communication": kbit/s}}``. A client's ``speed_factor`` is its computation time over the median
  client's, so the measured (or modelled) compute time is scaled relative to a typical device; both
  links run at its ``communication`` rate.
- Behaviour (FedScale's ``client_behave_trace``): ``{client: {"active": [s, ...], "inactive": [s, ...],
  "finish_time": s}}``: the client is online from each active time stamp to the next inactive one, in a
  cycle of ``finish_time`` seconds.

FedScale's client ids (any integers) are taken in sorted order and dealt to fedsim's clients 0, 1, …
(cycling when the trace holds fewer). The pickles hold only dicts, lists and numbers, so they are read
with an unpickler that refuses every global: a file that needs one is rejected, not executed.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from aggregation.errors import ConfigError
from fedsim.safe_pickle import NO_GLOBALS, load_pickle
from fedsim.sim.availability import AvailabilityTrace
from fedsim.sim.clock import DeviceProfile


def load_trace(path: str, field: str) -> dict[Any, dict[str, Any]]:
    """Read a FedScale trace pickle as a dict of dicts; ConfigError naming ``field`` otherwise."""
    file = Path(path)
    if not file.exists():
        raise ConfigError(f"{field}: file not found: {file}")
    try:
        data = load_pickle(file.read_bytes(), allow=NO_GLOBALS)
    except (OSError, pickle.UnpicklingError) as exc:
        raise ConfigError(f"{field}: {file} is not a FedScale trace pickle ({exc})") from None
    if not isinstance(data, dict) or not data or not all(isinstance(v, dict) for v in data.values()):
        raise ConfigError(f"{field}: {file} does not map client ids to records")
    return data


def _dealt(data: dict[Any, Any], num_clients: int) -> list[Any]:
    keys = sorted(data)
    return [keys[c % len(keys)] for c in range(num_clients)]


def fedscale_profiles(path: str, num_clients: int) -> dict[int, DeviceProfile]:
    """Device profiles of clients 0 … ``num_clients`` − 1 from a FedScale device capacity pickle at ``path``.

    ``speed_factor`` is a client's computation time over the median's; both links run at its ``communication``
    rate (kbit/s, as bytes/s); no latency.
    """
    data = load_trace(path, "system.profiles")
    try:
        ms = {k: float(v["computation"]) for k, v in data.items()}
        kbps = {k: float(v["communication"]) for k, v in data.items()}
    except (KeyError, TypeError, ValueError):
        raise ConfigError(
            f"system.profiles: {path}: every record needs numbers 'computation' and 'communication'"
        ) from None
    if min(ms.values()) <= 0 or min(kbps.values()) <= 0:
        raise ConfigError(f"system.profiles: {path} has a non-positive computation or communication value")
    typical = float(np.median(list(ms.values())))
    return {c: DeviceProfile(ms[k] / typical, kbps[k] * 1000 / 8, kbps[k] * 1000 / 8, 0.0)
            for c, k in enumerate(_dealt(data, num_clients))}


def fedscale_availability(path: str, num_clients: int) -> AvailabilityTrace:
    """The online intervals (s) and cycle of clients 0 … ``num_clients`` − 1 from a FedScale behaviour trace.

    An active time stamp without a matching inactive one stays online until ``finish_time``.
    """
    data = load_trace(path, "system.availability_trace")
    intervals, period = {}, {}
    for c, k in enumerate(_dealt(data, num_clients)):
        record = data[k]
        try:
            active = [float(t) for t in record["active"]]
            inactive = [float(t) for t in record["inactive"]]
            finish = float(record["finish_time"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"system.availability_trace: {path}: client {k} needs 'active', 'inactive' and "
                              f"'finish_time'") from None
        if not math.isfinite(finish) or finish <= 0:
            raise ConfigError(f"system.availability_trace: {path}: client {k} has finish_time {finish}")
        ends = inactive + [finish] * (len(active) - len(inactive))
        # ends is longer than active when a record lists more inactive than active stamps: zip drops the extra
        intervals[c] = tuple((a, b) for a, b in zip(active, ends, strict=False) if b > a)
        period[c] = finish
    return AvailabilityTrace(intervals, period)
