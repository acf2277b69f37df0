"""A run's state after a finished round, written atomically so that ``fedsim resume`` continues exactly.

What a round's outcome depends on besides the config: the global payload, the
strategy's cross-round state (server optimiser moments, FedAlign-MoE's p_g
and α per client, personalised experts) and the client sampler's generator.
Client seeds are functions of (run seed, round, client) and workers hold no
state between rounds, so nothing else is needed for a resumed run to produce
the same tables as an uninterrupted one. The tables themselves are on disk
already (rewritten after every round); resume cuts them back to the
checkpoint's round.

The file is a pickle written by this program into the run directory; load
checkpoints only from run directories you trust, as with any pickle.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from aggregation.errors import FedsimError

FORMAT = 1
FILENAME = "checkpoint.pkl"


@dataclass(frozen=True)
class Checkpoint:
    """Everything needed to run round ``round_idx + 1`` as the uninterrupted run would."""

    round_idx: int
    payload: np.ndarray
    strategy_state: dict[str, Any]
    sampler_state: Mapping[str, Any]  # the sampler's numpy bit generator state
    sim_time_s: float = 0.0  # the simulated clock after round_idx


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint.pkl`` via a temporary file and an atomic rename: a kill leaves the old one intact."""
    path = run_dir / FILENAME
    tmp = run_dir / f".{FILENAME}.tmp"
    with open(tmp, "wb") as f:
        pickle.dump({"format": FORMAT, **checkpoint.__dict__}, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path


def load_checkpoint(run_dir: Path) -> Checkpoint:
    """Read a run directory's checkpoint; a missing or unreadable one is a one-line error naming the file."""
    path = Path(run_dir) / FILENAME
    if not path.exists():
        raise FedsimError(f"{path}: no checkpoint (was checkpoint.every 0, or did the run stop before its first?)")
    try:
        with open(path, "rb") as f:
            raw = pickle.load(f)
    except Exception as exc:  # a truncated or foreign file fails in many ways inside pickle
        raise FedsimError(f"{path}: unreadable checkpoint ({type(exc).__name__})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise FedsimError(f"{path}: not a fedsim checkpoint of format {FORMAT}")
    missing = [f.name for f in fields(Checkpoint) if f.name not in raw and f.default is MISSING]
    if missing:
        raise FedsimError(f"{path}: incomplete checkpoint, it lacks {', '.join(missing)}")
    if not isinstance(raw["payload"], np.ndarray) or not isinstance(raw["round_idx"], int):
        raise FedsimError(f"{path}: incomplete checkpoint, its payload or round is not what fedsim writes")
    return Checkpoint(raw["round_idx"], raw["payload"], raw["strategy_state"], raw["sampler_state"],
                      raw.get("sim_time_s", 0.0))
