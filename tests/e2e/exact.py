"""Two run directories compared exactly: every table on disk, and the final global payload byte for byte.

Only what is measured, not computed, is left out: wall-clock timings (``wall_s``, ``train_wall_s``,
``eval_wall_s``, ``compute_s``, ``compute_s_sum``, ``overhead_ratio``, ``alltoall_s``, ``stats_s``, the aggregator's
``aggregator_<phase>_s``) and memory (every
``*_mib`` column: ``*_rss_mib``, ``*_uss_mib``, ``gpu_peak_mib``). The simulated clock (``sim_*``) stays in:
it derives from measured compute time unless ``system.seconds_per_example`` fixes it, which ``EXACT`` does.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fedsim.checkpoint import load_checkpoint

TABLES = ("rounds", "clients", "comm", "routing")
# Overrides that make every computed column reproducible: a compute model for the simulated clock.
EXACT = ("system.seconds_per_example=0.01",)


def measured(column: str) -> bool:
    """Whether ``column`` is a wall-clock timing or a memory reading (it differs between identical runs)."""
    return (column.endswith(("wall_s", "_mib")) or column.startswith("compute_s")
            or (column.startswith("aggregator_") and column.endswith("_s"))
            or column in ("overhead_ratio", "alltoall_s", "stats_s"))


def read_table(run_dir: Path, name: str) -> pd.DataFrame:
    """A run's table as on disk (``rounds.parquet`` is one file, the others one part per round), in round order."""
    frame = pd.read_parquet(run_dir / f"{name}.parquet")
    return frame.sort_values("round", kind="stable").reset_index(drop=True)


def assert_same_run(got: Path, want: Path) -> list[str]:
    """Assert that ``got``'s tables and final payload are ``want``'s exactly; return the columns left out."""
    left_out: list[str] = []
    for name in TABLES:
        a, b = read_table(got, name), read_table(want, name)
        assert list(a.columns) == list(b.columns), f"{name}: columns {list(a.columns)} != {list(b.columns)}"
        drop = [c for c in b.columns if measured(c)]
        left_out += [f"{name}.{c}" for c in drop]
        pd.testing.assert_frame_equal(a.drop(columns=drop), b.drop(columns=drop), check_exact=True, obj=name)
    final_got, final_want = load_checkpoint(got), load_checkpoint(want)
    assert final_got.round_idx == final_want.round_idx
    assert final_got.payload.dtype == final_want.payload.dtype
    assert final_got.payload.tobytes() == final_want.payload.tobytes(), "the final global payloads differ"
    return left_out
