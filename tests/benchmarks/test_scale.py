"""benchmarks/scale.py --shape olmoe: a cohort larger than the object store completes, and the table says how."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_olmoe_cohort_over_a_small_object_store_completes_with_fedalign_moe_reading_its_spool(tmp_path: Path) -> None:
    # Execute: 30 updates of ~4 MiB a round against an 82 MiB store, at tiny OLMoE widths; RAY_ADDRESS names a
    # cluster that is not there (as a stale `ray start` or another job on the machine would): the embedded Ray
    # is the benchmark's own all the same
    done = subprocess.run(
        [sys.executable, "benchmarks/scale.py", "--shape", "olmoe", "--quick", "--clients", "60", "--per-round", "30",
         "--rounds", "2", "--object-store-gib", "0.08", "--strategies", "fedalign_moe", "--out", str(tmp_path)],
        cwd=ROOT, env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}, capture_output=True, text=True, check=False,
    )  # fmt: skip

    # Assert: both rounds closed; each copied its cohort, more than the store holds, to the aggregator's spool,
    # so the store held only what waited to be folded: less than a cohort spilled, nothing restored
    assert done.returncode == 0, done.stderr[-2000:]
    table = pd.read_csv(tmp_path / "scale_olmoe_quick.csv")
    assert list(table["round"]) == [1, 2] and (table["strategy"] == "fedalign_moe").all()
    spool = table["aggregator_spool_mib"]
    assert spool.nunique() == 1 and spool.iloc[0] > 0.08 * 1024
    assert (table["spilled_mib"] < spool).all() and (table["restored_mib"] == 0).all()
    assert (table["aggregator_uss_mib"] > 0).all() and (table["train_wall_s"] > 0).all()
    # the aggregator's round split by phase: fetching and merging took time, training took the most
    assert (table["aggregator_merge_s"] > 0).all() and (table["aggregator_get_s"] > 0).all()
    assert (table["aggregator_wait_s"] > table["aggregator_merge_s"]).all()
